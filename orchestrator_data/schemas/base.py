"""Schema plumbing: strict marshmallow schemas that raise our ValidationError."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import marshmallow
from marshmallow import RAISE, Schema, fields

from orchestrator_data.errors import ValidationError


class JSONValue(fields.Raw):
    """Any value that serializes to JSON (objects, arrays, strings, numbers, ...)."""

    default_error_messages = {"invalid": "Not JSON-serializable."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise self.make_error("invalid") from err
        return value


class JSONObject(fields.Dict):
    """A JSON object (string keys, JSON-serializable values)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        result = super()._deserialize(value, attr, data, **kwargs)  # type: ignore[no-untyped-call]
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise marshmallow.ValidationError("Not JSON-serializable.") from err
        return result


class IPAddress(fields.String):
    """An IPv4 or IPv6 address (or CIDR network), stored as its canonical text."""

    default_error_messages = {"invalid_ip": "Not a valid IP address."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return str(ipaddress.ip_interface(text)).removesuffix("/32").removesuffix("/128")
        except ValueError as err:
            raise self.make_error("invalid_ip") from err


class EntitySchema(Schema):
    """Base of the entity schemas: unknown fields are an error, and load
    returns model attribute names (``metadata`` -> ``metadata_``)."""

    #: Fields a caller may not set on create or update.
    read_only_fields: ClassVar[frozenset[str]] = frozenset({"id", "created_at", "updated_at"})

    class Meta:
        unknown = RAISE


def load(
    schema: EntitySchema, data: Mapping[str, Any], *, partial: bool, entity: str
) -> dict[str, Any]:
    """Validate ``data``; return it keyed by model attribute names.

    Raises :class:`ValidationError` naming every bad field.
    """
    try:
        result: dict[str, Any] = schema.load(dict(data), partial=partial)
    except marshmallow.ValidationError as err:
        messages = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
        raise ValidationError(messages, entity=entity) from None
    return result
