"""Serialization of audit rows (read-only: they are written by the audit hooks).

The fields carry the columns' rules all the same: the audit repository's
filters validate with them.
"""

from __future__ import annotations

from orchestrator_data.models.audit_log import AuditLog
from orchestrator_data.schemas.base import EntitySchema, JSONObject, JSONValue, field_for


class AuditLogSchema(EntitySchema):
    id = field_for(AuditLog.id, dump_only=True)
    action = field_for(AuditLog.action, dump_only=True)
    actor_type = field_for(AuditLog.actor_type, dump_only=True, min_length=1)
    actor_id = field_for(AuditLog.actor_id, dump_only=True, min_length=1)
    resource_type = field_for(AuditLog.resource_type, dump_only=True)
    resource_id = field_for(AuditLog.resource_id, dump_only=True, min_length=1)
    old_value = JSONValue(dump_only=True)
    new_value = JSONValue(dump_only=True)
    metadata = JSONObject(attribute="metadata_", data_key="metadata", dump_only=True)
    ip_address = field_for(AuditLog.ip_address, dump_only=True)
    timestamp = field_for(AuditLog.timestamp, dump_only=True)
