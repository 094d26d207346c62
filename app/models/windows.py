"""Records of the windowing area: a window result on a sink topic, and the
request the aggregate API sends to the agent that owns a window_id."""

from __future__ import annotations

from typing import Any

import faust

from app.models.output import json_template, to_json_dict


class WindowResult(faust.Record, serializer="json", include_metadata=False):
    """One window's aggregate, as written to a window's sink topic: these fields, in
    this order, are its JSON (``result_template`` makes the bytes the worker writes).

    ``final`` is true when the window closed (``closed_by`` says why: event_time,
    count or idle); with ``emit: update`` every change is written with final false.
    ``superseded`` marks a session that merged into a bigger one (update mode only).
    """

    source: str
    window: str
    key: str
    window_type: str
    start: int
    end: int
    count: int
    aggregates: dict[str, Any] | None
    final: bool
    closed_by: str | None = None
    superseded: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        """The plain JSON object written to the sink topic."""
        return to_json_dict(self)


def result_template(**values: Any) -> bytes:
    """A ``WindowResult``'s JSON with the values that differ per result left as
    placeholders (``app.models.output.JSON``/``INT``): every field by name."""
    return json_template(WindowResult, **values)


class AggregateRequest(faust.Record, serializer="json"):
    """What ``POST /api/v1/aggregate`` and ``GET /api/v1/aggregate/{id}`` ask the owner
    of ``window_id``'s partition. ``spec`` is the canonical window spec (see
    ``app.windows.canonical_api_spec``); op ``get`` carries no spec or record."""

    op: str
    window_id: str
    spec: dict[str, Any] | None = None
    record: dict[str, Any] | None = None


__all__ = ["AggregateRequest", "WindowResult", "result_template"]
