"""Records of the pattern-detection area: the alert on the ``alerts`` topic."""

from __future__ import annotations

from typing import Any

import faust

from app.models.output import object_builder, to_json_dict


class Alert(faust.Record, serializer="json", include_metadata=False):
    """One pattern match: which pattern, for which key, when, and the evidence. These
    fields, in this order, are its JSON on the alerts topic (``alert_object``).

    ``alert_id`` is derived from the pattern, key and evidence, so a match re-detected
    after a crash (at-least-once redelivery) carries the same id and readers can
    drop the copy; ``GET /api/v1/alerts`` does.
    """

    alert_id: str
    pattern: str
    kind: str
    key_by: str
    key: str
    #: Event time of the match (epoch seconds); for absence, the missed deadline.
    at: float
    #: Wall-clock time the worker detected it (epoch seconds).
    detected_at: float
    #: The matching events: ``{"event_id", "ts", ...}`` each (step name, value ...).
    evidence: list[dict[str, Any]]
    detail: dict[str, Any]
    source: str

    def to_json_dict(self) -> dict[str, Any]:
        """The plain JSON object written to the alerts topic."""
        return to_json_dict(self)


#: ``alert_object(alert_id=..., ..., source=...)``: the JSON object of one alert, as a
#: dict in ``Alert``'s field order, without constructing the Record.
alert_object = object_builder(Alert)

__all__ = ["Alert", "alert_object"]
