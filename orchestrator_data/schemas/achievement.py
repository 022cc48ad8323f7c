"""Validation and serialization of achievements."""

from __future__ import annotations

from typing import Any

import marshmallow

from orchestrator_data.models.achievement import Achievement
from orchestrator_data.schemas.base import EntitySchema, JSONObject, field_for

#: ``metadata.task_id`` is part of a unique B-tree index (per-task awards,
#: migration 004), and B-tree entries are limited to about 2.7 kB.
TASK_ID_MAX_LENGTH = 255


def _indexable_task_id(metadata: dict[str, Any]) -> None:
    task_id = metadata.get("task_id")
    if task_id is not None and (not isinstance(task_id, str) or len(task_id) > TASK_ID_MAX_LENGTH):
        raise marshmallow.ValidationError(
            f"task_id must be a string of at most {TASK_ID_MAX_LENGTH} characters."
        )


class AchievementSchema(EntitySchema):
    id = field_for(Achievement.id)
    agent_id = field_for(Achievement.agent_id, required=True)
    achievement_type = field_for(Achievement.achievement_type, required=True, min_length=1)
    # CHECK constraint: points >= 0.
    points = field_for(Achievement.points, low=0)
    completed_at = field_for(Achievement.completed_at)
    metadata = JSONObject(attribute="metadata_", data_key="metadata", validate=_indexable_task_id)
    created_at = field_for(Achievement.created_at, dump_only=True)
