"""Validation and serialization of session metadata rows."""

from __future__ import annotations

from orchestrator_data.models.session import Session
from orchestrator_data.schemas.base import EntitySchema, JSONObject, field_for


class SessionSchema(EntitySchema):
    id = field_for(Session.id)
    session_key = field_for(Session.session_key, required=True, min_length=1)
    user_id = field_for(Session.user_id)
    data = JSONObject()
    ip_address = field_for(Session.ip_address)
    user_agent = field_for(Session.user_agent)
    expires_at = field_for(Session.expires_at)
    version = field_for(Session.version, dump_only=True)
    created_at = field_for(Session.created_at, dump_only=True)
    updated_at = field_for(Session.updated_at, dump_only=True)
