"""A resource's audit history as a plain-text table, one line per changed field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator_data.jsonsafe import json_safe
from orchestrator_data.models import AuditLog

HEADERS = ("TIME (UTC)", "ACTION", "ACTOR", "FIELD", "OLD", "NEW")
MAX_VALUE_WIDTH = 48
_ABSENT = object()


def history_lines(rows: Iterable[AuditLog]) -> list[str]:
    """The table for ``rows`` (oldest first): a header, then per row the
    fields it touched with their old and new values; ``-`` where a side has
    no value (create, delete)."""
    table: list[tuple[str, ...]] = [HEADERS]
    for row in rows:
        when = row.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")
        actor = row.actor_type + (f":{row.actor_id}" if row.actor_id else "")
        if row.ip_address:
            actor += f"@{row.ip_address}"
        first = True
        for field, old, new in _field_changes(row.old_value, row.new_value):
            lead = (when, row.action, actor) if first else ("", "", "")
            table.append((*lead, field, _show(old), _show(new)))
            first = False
        if first:  # no field-level detail (e.g. an empty change)
            table.append((when, row.action, actor, "", "", ""))
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
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
