"""Pattern definitions: parsing and validation, and the ``patterns:`` config section.

A definition is a JSON/YAML mapping (see docs/patterns.md). ``parse_definition``
turns it into a ``Pattern`` holding a pure matcher from ``operators.patterns``, or
raises ``PatternError`` naming the offending field (``steps[1].where``), which the web
layer answers as a 422.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import orjson

from app.config_file import section
from operators import patterns as ops
from operators.expr import ExprError, compile_expr
from operators.transform import duration_seconds

#: The condition language (named in 422 details): the project's one expression language.
EXPR_LANGUAGE = "operators.expr"

NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
KINDS = ("threshold", "frequency", "trend", "anomaly", "sequence", "absence")


class PatternError(ValueError):
    """An invalid pattern definition; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class EngineConfig:
    """What the pattern engine consumes: source topics, their record key, time field."""

    sources: tuple[str, ...] = ("events",)
    #: The field the source topics are keyed by (e.g. produced with key_field=user_id).
    #: Patterns keyed by this field are matched in place; others are repartitioned.
    source_key: str | None = None
    time_field: str = "ts"
    #: How often the timer scans due absence / not-followed-by timers (seconds).
    timer_interval: float = 0.5
    #: Alerts kept per partition for GET /api/v1/alerts scans.
    alerts_scan: int = 5000


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern definition."""

    name: str
    kind: str
    key_by: str
    source: str
    time_field: str
    matcher: ops.Matcher = field(compare=False)
    definition: dict[str, Any] = field(compare=False)
    origin: str = "config"  # or "runtime"

    @cached_property
    def fingerprint(self) -> str:
        """Changes when the definition changes (state of an old version is dropped).
        Cached: the engine compares it for every pattern on every event, and a SHA-1 of
        the definition's JSON each time cost a third of the matching time."""
        raw = orjson.dumps(self.definition, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha1(raw).hexdigest()[:10]


def duration(value: Any, where: str) -> float:
    """Seconds from a number or a string like ``90``, ``60s``, ``10m``, ``1h``."""
    try:
        return duration_seconds(value)
    except ValueError as exc:
        raise PatternError(where, str(exc)) from None


def event_time(value: Any) -> float | None:
    """Epoch seconds from epoch seconds, epoch milliseconds or an ISO-8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            return None
        # Anything past year 5138 in seconds is really milliseconds.
        return seconds / 1000.0 if abs(seconds) > 1e11 else seconds
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def condition(text: Any, where: str) -> ops.Predicate:
    """A predicate from a condition string; PatternError names the field if invalid."""
    if not isinstance(text, str) or not text.strip():
        raise PatternError(where, "must be a non-empty condition string")
    try:
        expr = compile_expr(text)
    except ExprError as exc:
        raise PatternError(where, f"invalid condition: {exc}") from None

    evaluate = expr.evaluate  # bound once: this runs for every pattern on every event
    if expr.is_condition:
        # Always a bool, never an error (fields compared with scalar literals, in,
        # exists, and/or/not of those: most pattern conditions): no wrapper call per
        # event. Field against field keeps the wrapper (operators.expr.always_boolean).
        return evaluate

    def predicate(record: Mapping[str, Any]) -> bool:
        try:
            return bool(evaluate(record))
        except Exception:  # a condition that cannot be evaluated on this record is false
            return False

    return predicate


def _int(d: Mapping[str, Any], key: str, default: int | None, minimum: int, where: str) -> int:
    value = d.get(key, default)
    if value is None:
        raise PatternError(f"{where}{key}", "is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PatternError(f"{where}{key}", f"must be an integer >= {minimum}")
    return value


def _number(d: Mapping[str, Any], key: str, default: float | None, where: str,
            low: float = 0.0, low_inclusive: bool = True, high: float | None = None) -> float:
    value = d.get(key, default)
    if value is None:
        raise PatternError(f"{where}{key}", "is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PatternError(f"{where}{key}", "must be a number")
    if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise PatternError(f"{where}{key}", f"must be {bound}")
    return float(value)


def _field_name(d: Mapping[str, Any], key: str, where: str = "") -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise PatternError(f"{where}{key}", "must be a non-empty field name")
    return value


def _choice(d: Mapping[str, Any], key: str, options: tuple[str, ...], default: str | None) -> str:
    value = d.get(key, default)
    if value not in options:
        raise PatternError(key, f"must be one of {list(options)}, not {value!r}")
    return value  # type: ignore[return-value]


COMMON = {"name", "type", "key_by", "source", "description", "where"}
FIELDS = {
    "threshold": set(),
    "frequency": {"count", "within"},
    "trend": {"field", "direction", "min_slope", "points", "within", "min_points", "per"},
    "anomaly": {"field", "method", "threshold", "warmup", "window", "alpha"},
    "sequence": {"steps", "within"},
    "absence": {"trigger", "expect", "within"},
}


def _where(d: Mapping[str, Any]) -> ops.Predicate:
    return condition(d["where"], "where") if d.get("where") is not None else ops.always


def build_matcher(kind: str, d: Mapping[str, Any]) -> ops.Matcher:
    """The pure matcher of one (already type-checked) definition."""
    if kind == "threshold":
        if d.get("where") is None:
            raise PatternError("where", "is required for a threshold pattern")
        return ops.Threshold(condition(d["where"], "where"))
    if kind == "frequency":
        return ops.Frequency(_where(d), _int(d, "count", None, 1, ""), duration(d.get("within"), "within"))
    if kind == "trend":
        points, within = d.get("points"), d.get("within")
        if (points is None) == (within is None):
            raise PatternError("points", "give exactly one of points (last N values) or within (time window)")
        return ops.Trend(
            field=_field_name(d, "field"),
            direction=_choice(d, "direction", ("rising", "falling"), "rising"),
            min_slope=_number(d, "min_slope", None, ""),
            points=_int(d, "points", None, 2, "") if points is not None else None,
            within=duration(within, "within") if within is not None else None,
            min_points=_int(d, "min_points", 3, 2, ""),
            per=_choice(d, "per", ("second", "point"), "second"),
            where=_where(d),
        )
    if kind == "anomaly":
        warmup = _int(d, "warmup", 10, 2, "")
        window = _int(d, "window", 100, 2, "")
        if warmup > window:
            raise PatternError("warmup", f"must be <= window ({window})")
        return ops.Anomaly(
            field=_field_name(d, "field"),
            method=_choice(d, "method", ("zscore", "ewma"), "zscore"),
            threshold=_number(d, "threshold", 3.0, "", low_inclusive=False),
            warmup=warmup, window=window,
            alpha=_number(d, "alpha", 0.1, "", low_inclusive=False, high=1.0),
            where=_where(d),
        )
    if kind == "sequence":
        steps = _steps(d.get("steps"))
        return ops.Sequence(steps, duration(d.get("within"), "within"),
                            bind_fields=bound_fields(d.get("steps"), [s.name for s in steps]))
    if kind == "absence":
        return ops.Absence(condition(d.get("trigger"), "trigger"), condition(d.get("expect"), "expect"),
                           duration(d.get("within"), "within"))
    raise PatternError("type", f"must be one of {list(KINDS)}")


def _match_paths(node: Any, out: list[tuple[str, ...]]) -> None:
    """Every field path under ``match`` that an expression tree reads."""
    if not isinstance(node, (tuple, list)) or not node:
        return
    if isinstance(node[0], str):  # a node: (kind, ...)
        if node[0] == "field":
            if node[1] and node[1][0] == ops.BOUND_KEY:
                out.append(tuple(node[1]))
            return
        children = node[1:]
    else:  # a tuple or list of nodes (call arguments, list items)
        children = node
    for child in children:
        _match_paths(child, out)


def bound_fields(raw_steps: list[Mapping[str, Any]],
                 names: list[str]) -> dict[str, tuple[str, ...] | None]:
    """Which fields of which step's event the steps' conditions read as
    ``match.<step>.<field>``: only those are kept in a partial match (None = the whole
    event, when a condition reads ``match`` or ``match.<step>`` itself)."""
    paths: list[tuple[str, ...]] = []
    for s in raw_steps:
        _match_paths(compile_expr(s["where"]).tree, paths)
    out: dict[str, tuple[str, ...] | None] = {}
    for path in paths:
        if len(path) < 2:
            return {name: None for name in names}  # ``match`` as a whole
        step = path[1]
        if len(path) < 3:
            out[step] = None
        elif step not in out or out[step] is not None:
            out[step] = tuple(sorted({*(out.get(step) or ()), path[2]}))
    return out


def _steps(steps: Any) -> list[ops.SeqStep]:
    if not isinstance(steps, list) or len(steps) < 1:
        raise PatternError("steps", "must be a non-empty list of {name, where, times?, not?}")
    out: list[ops.SeqStep] = []
    names: set[str] = set()
    for i, s in enumerate(steps):
        where = f"steps[{i}]."
        if not isinstance(s, Mapping):
            raise PatternError(f"steps[{i}]", "must be an object")
        unknown = set(s) - {"name", "where", "times", "not"}
        if unknown:
            raise PatternError(f"steps[{i}].{sorted(unknown)[0]}", "unknown field")
        name = s.get("name", f"step{i}")
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise PatternError(f"{where}name", "must be a unique name of letters, digits, '.', '_', '-'")
        names.add(name)
        negated = s.get("not", False)
        if not isinstance(negated, bool):
            raise PatternError(f"{where}not", "must be true or false")
        if negated and i == 0:
            raise PatternError(f"{where}not", "a sequence cannot start with a 'not' step")
        times = _int(s, "times", 1, 1, where)
        if negated and times != 1:
            raise PatternError(f"{where}times", "a 'not' step cannot repeat")
        out.append(ops.SeqStep(name, condition(s.get("where"), f"{where}where"), times, negated))
    if all(s.negated for s in out):
        raise PatternError("steps", "needs at least one positive step")
    return out


def parse_definition(raw: Any, engine: EngineConfig, origin: str = "config") -> Pattern:
    """Validate one definition and compile it; PatternError names the bad field."""
    if not isinstance(raw, Mapping):
        raise PatternError("definition", "must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise PatternError("name", "must be 1-100 letters, digits, '.', '_', '-'")
    kind = raw.get("type")
    if kind not in KINDS:
        raise PatternError("type", f"must be one of {list(KINDS)}, not {kind!r}")
    unknown = set(raw) - COMMON - FIELDS[kind]
    if unknown:
        raise PatternError(sorted(unknown)[0], f"unknown field for a {kind} pattern")
    key_by = _field_name(raw, "key_by")
    source = raw.get("source", engine.sources[0])
    if source not in engine.sources:
        raise PatternError(
            "source", f"the pattern engine consumes {list(engine.sources)}, not {source!r}"
        )
    # One event time per source record: the engine's time_field, for every pattern.
    time_field = engine.time_field
    if raw.get("description") is not None and not isinstance(raw["description"], str):
        raise PatternError("description", "must be a string")
    matcher = build_matcher(kind, raw)
    definition = dict(raw)
    definition["source"] = source
    return Pattern(name, kind, key_by, source, time_field, matcher, definition, origin)


def engine_config(raw: Any = None) -> EngineConfig:
    """The engine settings of the ``patterns:`` config section."""
    raw = section("patterns") if raw is None else raw
    if not isinstance(raw, Mapping):
        return EngineConfig()
    defaults = EngineConfig()
    sources = raw.get("sources", list(defaults.sources))
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise PatternError("patterns.sources", "must be a non-empty list of topic names")
    source_key = raw.get("source_key")
    if source_key is not None and (not isinstance(source_key, str) or not source_key):
        raise PatternError("patterns.source_key", "must be a field name")
    return EngineConfig(
        sources=tuple(sources),
        source_key=source_key,
        time_field=str(raw.get("time_field", defaults.time_field)),
        timer_interval=float(raw.get("timer_interval", defaults.timer_interval)),
        alerts_scan=int(raw.get("alerts_scan", defaults.alerts_scan)),
    )


def config_patterns(engine: EngineConfig, raw: Any = None) -> dict[str, Pattern]:
    """The patterns declared in the config file, by name."""
    raw = section("patterns") if raw is None else raw
    if isinstance(raw, Mapping):
        raw = raw.get("definitions", [])
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise PatternError("patterns.definitions", "must be a list of pattern definitions")
    out: dict[str, Pattern] = {}
    for i, d in enumerate(raw):
        try:
            p = parse_definition(d, engine, "config")
        except PatternError as exc:
            raise PatternError(f"patterns.definitions[{i}].{exc.field}", exc.message) from None
        if p.name in out:
            raise PatternError(f"patterns.definitions[{i}].name", f"duplicate pattern {p.name!r}")
        out[p.name] = p
    return out


__all__ = [
    "EXPR_LANGUAGE", "EngineConfig", "KINDS", "Pattern", "PatternError", "condition",
    "config_patterns", "duration", "engine_config", "event_time", "parse_definition",
]
