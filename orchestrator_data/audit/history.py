"""The audit trail as plain-text tables for the CLI: a resource's history,
one line per changed field (``audit show``), and the newest rows of all
resources, one line per row (``audit recent``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator_data.audit.jsonsafe import json_safe
from orchestrator_data.models import AuditLog

HEADERS = ("TIME (UTC)", "ACTION", "ACTOR", "FIELD", "OLD", "NEW")
RECENT_HEADERS = ("TIME (UTC)", "ACTION", "TYPE", "RESOURCE ID", "ACTOR", "FIELDS")
MAX_VALUE_WIDTH = 48
_ABSENT = object()


def history_lines(rows: Iterable[AuditLog]) -> list[str]:
    """The table for ``rows`` (oldest first): a header, then per row the
    fields it touched with their old and new values; ``-`` where a side has
    no value (create, delete)."""
    table: list[tuple[str, ...]] = [HEADERS]
    for row in rows:
        when, actor = _when(row), _actor(row)
        first = True
        for field, old, new in _field_changes(row.old_value, row.new_value):
            lead = (when, row.action, actor) if first else ("", "", "")
            table.append((*lead, field, _show(old), _show(new)))
            first = False
        if first:  # no field-level detail (e.g. an empty change)
            table.append((when, row.action, actor, "", "", ""))
    return _aligned(table)


def recent_lines(rows: Iterable[AuditLog]) -> list[str]:
    """The table for ``rows`` as given (newest first from ``audit recent``):
    one line per row with its resource type and id (what ``audit show``
    takes) and the fields it touched; a prune row says how many rows it
    removed and from when."""
    table: list[tuple[str, ...]] = [RECENT_HEADERS]
    for row in rows:
        if row.action == "prune":
            old = row.old_value if isinstance(row.old_value, dict) else {}
            cutoff = (row.metadata_ or {}).get("cutoff", "?")
            detail = f"{old.get('rows', '?')} rows written before {cutoff}"
        else:
            detail = ", ".join(
                field for field, _, _ in _field_changes(row.old_value, row.new_value)
            )
        if len(detail) > MAX_VALUE_WIDTH:
            detail = detail[: MAX_VALUE_WIDTH - 1] + "…"
        resource = row.resource_id or "-"
        table.append((_when(row), row.action, row.resource_type, resource, _actor(row), detail))
    return _aligned(table)


def _when(row: AuditLog) -> str:
    return row.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")


def _actor(row: AuditLog) -> str:
    actor = row.actor_type + (f":{row.actor_id}" if row.actor_id else "")
    return actor + (f"@{row.ip_address}" if row.ip_address else "")


def _aligned(table: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]


def _field_changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    old_map = old if isinstance(old, dict) else {}
    new_map = new if isinstance(new, dict) else {}
    if not isinstance(old, (dict, type(None))) or not isinstance(new, (dict, type(None))):
        return [("(value)", old, new)]
    fields: Sequence[str] = list(dict.fromkeys([*old_map, *new_map]))
    return [(f, old_map.get(f, _ABSENT), new_map.get(f, _ABSENT)) for f in fields]


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "-"
    text = json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False)
    return text if len(text) <= MAX_VALUE_WIDTH else text[: MAX_VALUE_WIDTH - 1] + "…"
