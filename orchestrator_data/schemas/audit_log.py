"""Serialization of audit rows (read-only: they are written by the audit hooks)."""

from __future__ import annotations

from marshmallow import fields

from orchestrator_data.schemas.base import EntitySchema, JSONObject, JSONValue


class AuditLogSchema(EntitySchema):
    id = fields.UUID(dump_only=True)
    action = fields.String(dump_only=True)
    actor_type = fields.String(dump_only=True)
    actor_id = fields.String(dump_only=True)
    resource_type = fields.String(dump_only=True)
    resource_id = fields.String(dump_only=True)
    old_value = JSONValue(dump_only=True)
    new_value = JSONValue(dump_only=True)
    metadata = JSONObject(attribute="metadata_", data_key="metadata", dump_only=True)
    ip_address = fields.String(dump_only=True)
    timestamp = fields.AwareDateTime(dump_only=True)
