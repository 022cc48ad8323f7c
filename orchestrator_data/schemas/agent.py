"""Validation and serialization of agents."""

from __future__ import annotations

from marshmallow import validate

from orchestrator_data.models.agent import AGENT_STATUSES, Agent
from orchestrator_data.schemas.base import EntitySchema, JSONArray, JSONObject, Text, field_for

#: Length limit of one capability (the column is a JSONB array of strings).
CAPABILITY_MAX_LENGTH = 255


class AgentSchema(EntitySchema):
    id = field_for(Agent.id)
    name = field_for(Agent.name, required=True, min_length=1)
    role = field_for(Agent.role, required=True, min_length=1)
    status = field_for(Agent.status, validate=validate.OneOf(AGENT_STATUSES))
    capabilities = JSONArray(Text(min_length=1, max_length=CAPABILITY_MAX_LENGTH))
    metadata = JSONObject(attribute="metadata_", data_key="metadata")
    created_at = field_for(Agent.created_at, dump_only=True)
    updated_at = field_for(Agent.updated_at, dump_only=True)
