"""Validation and serialization of agents."""

from __future__ import annotations

from marshmallow import fields, validate

from orchestrator_data.models.agent import AGENT_STATUSES
from orchestrator_data.schemas.base import EntitySchema, JSONObject


class AgentSchema(EntitySchema):
    id = fields.UUID()
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    role = fields.String(required=True, validate=validate.Length(min=1, max=100))
    status = fields.String(validate=validate.OneOf(AGENT_STATUSES))
    capabilities = fields.List(fields.String(validate=validate.Length(min=1, max=255)))
    metadata = JSONObject(attribute="metadata_", data_key="metadata")
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
