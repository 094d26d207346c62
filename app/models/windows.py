"""Records of the windowing area: a window result on a sink topic, and the
request the aggregate API sends to the agent that owns a window_id."""

from __future__ import annotations

from typing import Any

import faust


class WindowResult(faust.Record, serializer="json", include_metadata=False):
    """One window's aggregate, as written to a window's sink topic.

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
        return {
            "source": self.source, "window": self.window, "key": self.key,
            "window_type": self.window_type, "start": self.start, "end": self.end,
            "count": self.count, "aggregates": self.aggregates, "final": self.final,
            "closed_by": self.closed_by, "superseded": self.superseded,
        }


class AggregateRequest(faust.Record, serializer="json"):
    """What ``POST /api/v1/aggregate`` and ``GET /api/v1/aggregate/{id}`` ask the owner
    of ``window_id``'s partition. ``spec`` is the canonical window spec (see
    ``app.windows.canonical_api_spec``); op ``get`` carries no spec or record."""

    op: str
    window_id: str
    spec: dict[str, Any] | None = None
    record: dict[str, Any] | None = None


__all__ = ["AggregateRequest", "WindowResult"]
