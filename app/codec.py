"""JSON in and out of Kafka, with orjson, and the one error type for bad records."""

from __future__ import annotations

from typing import Any

import orjson


class RecordError(ValueError):
    """A record cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def dumps(value: Any) -> bytes:
    """Serialize a JSON value (non-str dict keys allowed) to bytes."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def loads_object(raw: bytes | str | None) -> dict[str, Any]:
    """Parse one topic record that must be a JSON object, or raise RecordError."""
    if raw is None:
        raise RecordError("empty_value", "record has no value")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError("invalid_json", f"value is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RecordError("not_an_object", f"value is JSON {type(value).__name__}, not an object")
    return value
