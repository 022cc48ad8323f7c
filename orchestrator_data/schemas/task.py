"""Validation and serialization of tasks."""

from __future__ import annotations

from marshmallow import fields, validate

from orchestrator_data.models.task import PRIORITY_MAX, PRIORITY_MIN, TASK_STATUSES
from orchestrator_data.schemas.base import EntitySchema, JSONObject, JSONValue


class TaskSchema(EntitySchema):
    id = fields.UUID()
    agent_id = fields.UUID(allow_none=True)
    type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    payload = JSONObject(required=True)
    priority = fields.Integer(
        strict=True, validate=validate.Range(min=PRIORITY_MIN, max=PRIORITY_MAX)
    )
    status = fields.String(validate=validate.OneOf(TASK_STATUSES))
    result = JSONValue(allow_none=True)
    error_message = fields.String(allow_none=True)
    retry_count = fields.Integer(strict=True, validate=validate.Range(min=0))
    max_retries = fields.Integer(strict=True, validate=validate.Range(min=0))
    started_at = fields.AwareDateTime(allow_none=True)
    completed_at = fields.AwareDateTime(allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
