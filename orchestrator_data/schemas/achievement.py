"""Validation and serialization of achievements."""

from __future__ import annotations

from marshmallow import fields, validate

from orchestrator_data.schemas.base import EntitySchema, JSONObject


class AchievementSchema(EntitySchema):
    id = fields.UUID()
    agent_id = fields.UUID(required=True)
    achievement_type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    points = fields.Integer(strict=True, validate=validate.Range(min=0))
    completed_at = fields.AwareDateTime()
    metadata = JSONObject(attribute="metadata_", data_key="metadata")
    created_at = fields.AwareDateTime(dump_only=True)
