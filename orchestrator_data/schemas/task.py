"""Validation and serialization of tasks."""

from __future__ import annotations

from marshmallow import validate

from orchestrator_data.models.task import PRIORITY_MAX, PRIORITY_MIN, TASK_STATUSES, Task
from orchestrator_data.schemas.base import EntitySchema, JSONObject, JSONValue, field_for
from orchestrator_data.schemas.rules import MAX_SEARCHABLE_JSON_SIZE


class TaskSchema(EntitySchema):
    id = field_for(Task.id)
    agent_id = field_for(Task.agent_id)
    type = field_for(Task.type, required=True, min_length=1)
    # Full-text indexed (ix_tasks_search): the smaller size limit.
    payload = JSONObject(required=True, max_size=MAX_SEARCHABLE_JSON_SIZE)
    # CHECK constraints: priority BETWEEN 1 AND 10, retry_count / max_retries >= 0.
    priority = field_for(Task.priority, low=PRIORITY_MIN, high=PRIORITY_MAX)
    status = field_for(Task.status, validate=validate.OneOf(TASK_STATUSES))
    result = JSONValue(allow_none=True)
    error_message = field_for(Task.error_message)
    retry_count = field_for(Task.retry_count, low=0)
    max_retries = field_for(Task.max_retries, low=0)
    started_at = field_for(Task.started_at)
    completed_at = field_for(Task.completed_at)
    created_at = field_for(Task.created_at, dump_only=True)
    updated_at = field_for(Task.updated_at, dump_only=True)
