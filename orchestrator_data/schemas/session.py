"""Validation and serialization of session metadata rows."""

from __future__ import annotations

from marshmallow import fields, validate

from orchestrator_data.schemas.base import EntitySchema, IPAddress, JSONObject


class SessionSchema(EntitySchema):
    id = fields.UUID()
    session_key = fields.String(required=True, validate=validate.Length(min=1, max=255))
    user_id = fields.String(allow_none=True, validate=validate.Length(max=255))
    data = JSONObject()
    ip_address = IPAddress(allow_none=True)
    user_agent = fields.String(allow_none=True)
    expires_at = fields.AwareDateTime(allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
