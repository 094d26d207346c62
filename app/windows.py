"""The ``windows:`` section of the config file, parsed into WindowDefs, and the
record decoding every window agent shares.

One entry::

    windows:
      - name: clicks_per_user          # unique; names the agent, table and topics
        source: events                 # logical topic (settings.topic_prefix applies)
        key_by: user_id                # field the windows are grouped by
        time_field: ts                 # event time field; omit to use the Kafka timestamp
        time_unit: s                   # s (default) or ms, for numeric time fields
        window: {type: tumbling, size: 10, grace: 5}    # seconds; count: records
        aggregations:
          - {name: clicks, type: count}
          - {name: total, type: sum, field: value}
        emit: final                    # or update
        sink: clicks_per_user.aggregates   # default <name>.aggregates
        late_topic: clicks_per_user.late   # default <name>.late
        idle_close: 30                 # seconds without input before a partition's
                                       # windows are closed; 0 = never
        repartition: true              # false only if source is an app-owned topic
                                       # already keyed by key_by

The API (``POST /api/v1/aggregate``) uses ``parse_api_spec`` on its request body.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from app.codec import RecordError, loads_object
from app.config_file import section
from operators.aggregations import (
    AggregateSet,
    AggregationError,
    AggSpec,
    get_field,
    parse_agg_specs,
)
from operators.windows import WindowSpec, WindowSpecError, parse_window_spec


class WindowConfigError(ValueError):
    """A ``windows:`` entry is invalid; the message names the entry and the field."""


@dataclass(frozen=True)
class WindowDef:
    """One configured window aggregation."""

    name: str
    source: str
    key_by: str
    time_field: str | None
    time_unit: str
    spec: WindowSpec
    agg_specs: tuple[AggSpec, ...]
    emit: str
    sink: str
    late_topic: str
    idle_close: float
    repartition: bool

    @property
    def aggs(self) -> AggregateSet:
        """The aggregations (built on each call; callers keep one)."""
        return AggregateSet(self.agg_specs)

    @property
    def keyed_topic(self) -> str:
        """The internal topic (keyed by key_by) the window agent reads when repartitioning."""
        return f"{self.name}.keyed"

    @property
    def input_topic(self) -> str:
        """The logical topic the window agent itself reads."""
        return self.keyed_topic if self.repartition else self.source


_FIELDS = {"name", "source", "key_by", "time_field", "time_unit", "window", "aggregations",
           "emit", "sink", "late_topic", "idle_close", "repartition"}


def parse_window_def(raw: Any, where: str = "windows entry") -> WindowDef:
    """Validate one ``windows:`` entry; WindowConfigError names what is wrong."""
    if not isinstance(raw, Mapping):
        raise WindowConfigError(f"{where}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise WindowConfigError(f"{where}: name must be letters, digits, '.', '_' or '-'")
    where = f"windows[{name}]"
    unknown = set(raw) - _FIELDS
    if unknown:
        raise WindowConfigError(f"{where}: unknown fields {sorted(unknown)}")
    for f in ("source", "key_by"):
        if not isinstance(raw.get(f), str) or not raw[f]:
            raise WindowConfigError(f"{where}: {f} must be a non-empty string")
    time_field = raw.get("time_field")
    if time_field is not None and (not isinstance(time_field, str) or not time_field):
        raise WindowConfigError(f"{where}: time_field must be a string (omit it for the Kafka timestamp)")
    time_unit = raw.get("time_unit", "s")
    if time_unit not in ("s", "ms"):
        raise WindowConfigError(f"{where}: time_unit must be s or ms")
    try:
        spec = parse_window_spec(raw.get("window"))
        agg_specs = tuple(parse_agg_specs(raw.get("aggregations")))
        AggregateSet(agg_specs)
    except (WindowSpecError, AggregationError) as exc:
        raise WindowConfigError(f"{where}: {exc}") from None
    emit = raw.get("emit", "final")
    if emit not in ("update", "final"):
        raise WindowConfigError(f"{where}: emit must be update or final")
    idle = raw.get("idle_close", 0)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle < 0:
        raise WindowConfigError(f"{where}: idle_close must be seconds >= 0")
    repartition = raw.get("repartition", True)
    if not isinstance(repartition, bool):
        raise WindowConfigError(f"{where}: repartition must be true or false")
    sink = raw.get("sink", f"{name}.aggregates")
    late = raw.get("late_topic", f"{name}.late")
    for f, v in (("sink", sink), ("late_topic", late)):
        if not isinstance(v, str) or not v:
            raise WindowConfigError(f"{where}: {f} must be a topic name")
    return WindowDef(name, raw["source"], raw["key_by"], time_field, time_unit, spec, agg_specs,
                     emit, sink, late, float(idle), repartition)


def load_window_defs(raw: Any | None = None) -> list[WindowDef]:
    """Every entry of the ``windows:`` section (or of ``raw``), names unique."""
    raw = section("windows") if raw is None else raw
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise WindowConfigError("windows: must be a list of window definitions")
    defs = [parse_window_def(item, f"windows[{i}]") for i, item in enumerate(raw)]
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise WindowConfigError(f"windows: names must be unique: {names}")
    return defs


def event_time_ms(value: Any, unit: str = "s") -> int:
    """An event time (epoch number in ``unit``, or an ISO-8601 string) as epoch ms."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return round(value * 1000) if unit == "s" else round(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return round(parsed.timestamp() * 1000)
    raise RecordError("invalid_time", f"event time must be epoch {unit} or an ISO-8601 time with zone, got {value!r}")


def decode_source(defn: WindowDef, aggs: AggregateSet, raw: bytes | None,
                  kafka_ts: float | None) -> tuple[str, int, dict[str, Any]]:
    """(key, event time ms, aggregation inputs) of one source record, or RecordError."""
    record = loads_object(raw)
    try:
        key = get_field(record, defn.key_by)
    except KeyError:
        raise RecordError("missing_key", f"record has no key field {defn.key_by!r}") from None
    if key is None or isinstance(key, dict | list):
        raise RecordError("invalid_key", f"key field {defn.key_by!r} must be a scalar, got {key!r}")
    key_s = key if isinstance(key, str) else orjson.dumps(key).decode()
    if defn.time_field is None:
        if kafka_ts is None:
            raise RecordError("invalid_time", "record has no Kafka timestamp")
        ts = round(kafka_ts * 1000)
    else:
        try:
            ts = event_time_ms(get_field(record, defn.time_field), defn.time_unit)
        except KeyError:
            raise RecordError("missing_time", f"record has no time field {defn.time_field!r}") from None
    try:
        values = aggs.extract(record)
    except AggregationError as exc:
        raise RecordError(exc.reason, str(exc)) from None
    return key_s, ts, values


def make_decoder(defn: WindowDef, aggs: AggregateSet) -> Callable[[bytes | None, float | None],
                                                                 tuple[str, int, dict[str, Any]]]:
    """``decode_source`` for one window, specialised for the hot path: plain (undotted)
    ``key_by``/``time_field`` are read with one dict lookup each, a string key and a
    finite numeric time are taken as they are. Anything else (and every error) goes
    through ``decode_source`` itself, so results and RecordErrors are the same."""
    key_by, time_field = defn.key_by, defn.time_field
    if "." in key_by or time_field is None or "." in time_field:
        return functools.partial(decode_source, defn, aggs)
    scale = 1000 if defn.time_unit == "s" else 1
    extract = aggs.extract
    loads = orjson.loads

    def decode(raw: bytes | None, kafka_ts: float | None) -> tuple[str, int, dict[str, Any]]:
        try:
            record = loads(raw)
            key = record[key_by]
            t = record[time_field]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return decode_source(defn, aggs, raw, kafka_ts)
        tt = type(t)
        if type(key) is not str or not (tt is int or (tt is float and t - t == 0)):
            return decode_source(defn, aggs, raw, kafka_ts)
        try:
            values = extract(record)
        except AggregationError as exc:
            raise RecordError(exc.reason, str(exc)) from None
        return key, round(t * scale), values

    return decode


# --- the aggregate API --------------------------------------------------------------

_API_FIELDS = {"window_id", "record", "window_type", "window_size", "step", "gap",
               "max_difference", "grace", "aggregation", "aggregations", "value_key", "time_key"}


def parse_api_spec(body: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical spec of a ``POST /api/v1/aggregate`` body (what must stay the same
    for a window_id): ``{"window": {...}, "aggregations": [...], "time_key": ...}``.

    ``window_size`` without ``window_type`` means a count window of that many records.
    Raises ValueError subclasses whose message names the field.
    """
    unknown = set(body) - _API_FIELDS
    if unknown:
        raise WindowConfigError(f"unknown fields: {sorted(unknown)}")
    kind = body.get("window_type", "count" if "window_size" in body else None)
    if kind is None:
        raise WindowConfigError("window_type or window_size is required")
    window: dict[str, Any] = {"type": kind}
    if "window_size" in body:
        window["size"] = body["window_size"]
    for f in ("step", "gap", "max_difference", "grace"):
        if f in body:
            window[f] = body[f]
    spec = parse_window_spec(window)
    if "aggregations" in body:
        if "aggregation" in body or "value_key" in body:
            raise WindowConfigError("give either aggregation (+ value_key) or aggregations, not both")
        agg_specs = parse_agg_specs(body["aggregations"])
    else:
        kind_a = body.get("aggregation", "count")
        value_key = body.get("value_key")
        if not isinstance(kind_a, str):
            raise WindowConfigError("aggregation must be a string")
        if value_key is not None and not isinstance(value_key, str):
            raise WindowConfigError("value_key must be a string")
        item: dict[str, Any] = {"name": kind_a, "type": kind_a}
        if value_key is not None:
            item["field"] = value_key
        agg_specs = parse_agg_specs([item])
    AggregateSet(agg_specs)
    time_key = body.get("time_key")
    if time_key is not None and (not isinstance(time_key, str) or not time_key):
        raise WindowConfigError("time_key must be a field name")
    return {
        "window": spec.describe(),
        "aggregations": [
            {"name": a.name, "type": a.kind, **({"field": a.field} if a.field else {}), **dict(a.params)}
            for a in agg_specs
        ],
        "time_key": time_key,
    }


def spec_from_canonical(canonical: Mapping[str, Any]) -> tuple[WindowSpec, AggregateSet]:
    """The WindowSpec and AggregateSet of a canonical API spec."""
    return WindowSpec(**canonical["window"]), AggregateSet(parse_agg_specs(canonical["aggregations"]))


__all__ = [
    "WindowConfigError", "WindowDef", "decode_source", "event_time_ms", "load_window_defs",
    "make_decoder",
    "parse_api_spec", "parse_window_def", "spec_from_canonical",
]
