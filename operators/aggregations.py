"""Aggregations over window contents: built-ins and a registry of custom ones.

Every aggregator is four pure functions over a JSON-serializable state, so a window's
state can be written to a changelog as JSON and merged when session windows join:

- ``init() -> state``
- ``add(state, value, ts) -> state`` (``ts`` is the event time in ms; most ignore it)
- ``merge(a, b) -> state`` (order-insensitive except for first/last, which use ``ts``)
- ``result(state) -> JSON value``

Built-ins: count, sum, mean, min, max, first, last, distinct_count, percentiles (a
DDSketch-style log-bucket sketch: mergeable, relative error about 1%).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import orjson


class AggregationError(ValueError):
    """An aggregation spec is invalid, or a value cannot be aggregated by it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Aggregator:
    """The four functions of one aggregation; ``numeric`` demands number inputs."""

    init: Callable[[], Any]
    add: Callable[[Any, Any, int], Any]
    merge: Callable[[Any, Any], Any]
    result: Callable[[Any], Any]
    numeric: bool = False
    needs_field: bool = True
    #: A built-in whose ``add`` ``AggregateSet`` may run as inline code (see
    #: ``_fused_adder``), and whose ``result(state)`` is the state itself.
    builtin: str | None = None


def _is_number(v: Any) -> bool:
    # bool is an int subclass, but True is not a measurement.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _count() -> Aggregator:
    return Aggregator(lambda: 0, lambda s, v, ts: s + 1, lambda a, b: a + b, lambda s: s,
                      needs_field=False, builtin="count")


def _sum() -> Aggregator:
    return Aggregator(lambda: 0, lambda s, v, ts: s + v, lambda a, b: a + b, lambda s: s,
                      numeric=True, builtin="sum")


def _mean() -> Aggregator:
    return Aggregator(
        lambda: [0, 0],
        lambda s, v, ts: [s[0] + v, s[1] + 1],
        lambda a, b: [a[0] + b[0], a[1] + b[1]],
        lambda s: s[0] / s[1] if s[1] else None,
        numeric=True,
    )


def _extreme(pick: Callable[[Any, Any], Any], builtin: str) -> Aggregator:
    def add(s: Any, v: Any, ts: int) -> Any:
        return v if s is None else pick(s, v)

    def merge(a: Any, b: Any) -> Any:
        if a is None:
            return b
        return a if b is None else pick(a, b)

    return Aggregator(lambda: None, add, merge, lambda s: s, numeric=True, builtin=builtin)


def _first() -> Aggregator:
    # State [ts, value]: the earliest event time wins; on ties the one seen first stays.
    def add(s: Any, v: Any, ts: int) -> Any:
        return [ts, v] if s is None or ts < s[0] else s

    def merge(a: Any, b: Any) -> Any:
        if a is None:
            return b
        return a if b is None or a[0] <= b[0] else b

    return Aggregator(lambda: None, add, merge, lambda s: None if s is None else s[1])


def _last() -> Aggregator:
    # The latest event time wins; on ties the one seen last wins (arrival order).
    def add(s: Any, v: Any, ts: int) -> Any:
        return [ts, v] if s is None or ts >= s[0] else s

    def merge(a: Any, b: Any) -> Any:
        if a is None:
            return b
        return b if b is not None and b[0] >= a[0] else a

    return Aggregator(lambda: None, add, merge, lambda s: None if s is None else s[1])


def _canonical(v: Any) -> str:
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


def _distinct() -> Aggregator:
    # Exact: a JSON object whose keys are the canonical JSON of each distinct value.
    def add(s: dict, v: Any, ts: int) -> dict:
        s[_canonical(v)] = 1
        return s

    def merge(a: dict, b: dict) -> dict:
        return {**a, **b}

    return Aggregator(dict, add, merge, len)


#: Relative accuracy of the percentile sketch: every quantile is within 1% of a true value.
SKETCH_ACCURACY = 0.01
_GAMMA = (1 + SKETCH_ACCURACY) / (1 - SKETCH_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)


def sketch_init() -> dict:
    """An empty sketch: positive and negative log buckets, zeros, total."""
    return {"pos": {}, "neg": {}, "zero": 0, "n": 0}


def sketch_add(s: dict, v: float) -> dict:
    """Count ``v`` in its bucket: index ceil(log_gamma(|v|))."""
    if v == 0:
        s["zero"] += 1
    else:
        side = s["pos"] if v > 0 else s["neg"]
        idx = str(math.ceil(math.log(abs(v)) / _LOG_GAMMA))
        side[idx] = side.get(idx, 0) + 1
    s["n"] += 1
    return s


def sketch_merge(a: dict, b: dict) -> dict:
    """The sketch of both inputs' values (bucket counts add)."""
    out = {"pos": dict(a["pos"]), "neg": dict(a["neg"]), "zero": a["zero"] + b["zero"],
           "n": a["n"] + b["n"]}
    for side in ("pos", "neg"):
        for idx, c in b[side].items():
            out[side][idx] = out[side].get(idx, 0) + c
    return out


def sketch_quantile(s: dict, q: float) -> float | None:
    """The value at quantile ``q`` (0..1), within SKETCH_ACCURACY relative error."""
    if s["n"] == 0:
        return None
    rank = q * (s["n"] - 1)
    # Walk from the most negative value up: negative buckets by descending index.
    seen = 0
    for idx in sorted((int(i) for i in s["neg"]), reverse=True):
        seen += s["neg"][str(idx)]
        if seen > rank:
            return -2 * _GAMMA**idx / (_GAMMA + 1)
    seen += s["zero"]
    if seen > rank:
        return 0.0
    for idx in sorted(int(i) for i in s["pos"]):
        seen += s["pos"][str(idx)]
        if seen > rank:
            # The bucket (gamma^(i-1), gamma^i] is represented by its relative midpoint.
            return 2 * _GAMMA**idx / (_GAMMA + 1)
    return None


def _percentiles(params: Mapping[str, Any]) -> Aggregator:
    qs = params.get("percentiles", [50, 90, 95, 99])
    if (
        not isinstance(qs, list) or not qs
        or not all(_is_number(q) and 0 <= q <= 100 for q in qs)
    ):
        raise AggregationError("invalid_spec", "percentiles must be a non-empty list of numbers 0..100")

    def result(s: dict) -> dict:
        return {f"p{q:g}": sketch_quantile(s, q / 100) for q in qs}

    return Aggregator(sketch_init, lambda s, v, ts: sketch_add(s, v), sketch_merge, result,
                      numeric=True)


_BUILTINS: dict[str, Callable[[Mapping[str, Any]], Aggregator]] = {
    "count": lambda p: _count(),
    "sum": lambda p: _sum(),
    "mean": lambda p: _mean(),
    "avg": lambda p: _mean(),
    "min": lambda p: _extreme(min, "min"),
    "max": lambda p: _extreme(max, "max"),
    "first": lambda p: _first(),
    "last": lambda p: _last(),
    "distinct_count": lambda p: _distinct(),
    "percentiles": _percentiles,
}

_CUSTOM: dict[str, Aggregator] = {}


def register_aggregator(
    name: str, *, init: Callable[[], Any], add: Callable[[Any, Any], Any],
    merge: Callable[[Any, Any], Any], result: Callable[[Any], Any], numeric: bool = False,
) -> None:
    """Register a custom aggregation usable as ``type: <name>`` in window specs.

    ``add(state, value)`` and ``merge(a, b)`` must return the new state, which must be
    JSON-serializable (it is written to the changelog).
    """
    if name in _BUILTINS:
        raise AggregationError("invalid_spec", f"{name!r} is a built-in aggregation")
    _CUSTOM[name] = Aggregator(init, lambda s, v, ts: add(s, v), merge, result, numeric=numeric)


def aggregation_names() -> list[str]:
    """Every aggregation type known now (built-ins and registered ones)."""
    return sorted({*_BUILTINS, *_CUSTOM})


def make_aggregator(kind: str, params: Mapping[str, Any] | None = None) -> Aggregator:
    """The aggregator for ``kind``; AggregationError for an unknown one."""
    if kind in _BUILTINS:
        return _BUILTINS[kind](params or {})
    if kind in _CUSTOM:
        return _CUSTOM[kind]
    raise AggregationError(
        "unknown_aggregation", f"unknown aggregation {kind!r}; known: {', '.join(aggregation_names())}"
    )


def get_field(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a record, or a KeyError naming the path."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


@dataclass(frozen=True)
class AggSpec:
    """One named aggregation of a window: its type, input field and parameters."""

    name: str
    kind: str
    field: str | None = None
    params: Mapping[str, Any] = dc_field(default_factory=dict)


_MISSING = object()

#: Inline code of the built-ins' ``add`` (``{k}``: the aggregation's name as a literal),
#: equal to their functions: ``min(s, v)`` keeps ``s`` unless ``v < s``.
_INLINE_ADD = {
    "count": "    state[{k}] = state[{k}] + 1\n",
    "sum": "    state[{k}] = state[{k}] + values[{k}]\n",
    "min": "    s = state[{k}]; v = values[{k}]\n    if s is None or v < s: state[{k}] = v\n",
    "max": "    s = state[{k}]; v = values[{k}]\n    if s is None or v > s: state[{k}] = v\n",
}

#: Immutable initial states: a window's initial state can then be a copy of a template.
_SCALARS = (int, float, str, bool, type(None))


def _fused_adder(names_kinds: Sequence[tuple[str, str]]) -> Callable[[dict, Mapping, int], dict]:
    """One function adding a record to every aggregation of a set of built-ins.

    Why: the generic ``add`` calls one lambda per aggregation per window per record;
    this is one call with the additions inline (about a third of the cost). The source
    holds only the names as ``repr`` literals and the fixed snippets above."""
    body = "".join(_INLINE_ADD[kind].format(k=repr(name)) for name, kind in names_kinds)
    namespace: dict[str, Any] = {}
    exec(f"def add(state, values, ts):\n{body}    return state\n", namespace)  # noqa: S102
    return namespace["add"]


def _fused_extractor(plain: Sequence[tuple[str, str | None, bool]],
                     checked: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """``AggregateSet.extract`` for plain (undotted) fields as one function: each field
    read with one lookup, numbers checked by exact type, the values dict built as one
    literal. Anything else (not a dict, a missing field, a non-number, NaN/inf, bool)
    goes to ``checked``, which returns the same values or raises the precise error.

    Why: the per-aggregation loop with its tuple unpacking cost about twice this on the
    hot path of every window record. The source holds only the names and fields as
    ``repr`` literals (as ``_fused_adder``)."""
    lines, items = [], []
    for i, (name, fld, numeric) in enumerate(plain):
        if fld is None:
            items.append(f"{name!r}: None")
            continue
        lines.append(f"    v{i} = record.get({fld!r}, missing)\n")
        if numeric:
            # As AggregateSet.extract's fast path: exact int, or a finite float.
            lines.append(f"    if not (type(v{i}) is int or (type(v{i}) is float and v{i} - v{i} == 0)):"
                         f" return checked(record)\n")
        else:
            lines.append(f"    if v{i} is missing: return checked(record)\n")
        items.append(f"{name!r}: v{i}")
    source = ("def extract(record):\n    if type(record) is not dict: return checked(record)\n"
              + "".join(lines) + "    return {" + ", ".join(items) + "}\n")
    namespace: dict[str, Any] = {"missing": _MISSING, "checked": checked}
    exec(source, namespace)  # noqa: S102
    return namespace["extract"]


class AggregateSet:
    """Several named aggregations computed together over one window's records."""

    def __init__(self, specs: Sequence[AggSpec]) -> None:
        if not specs:
            raise AggregationError("invalid_spec", "at least one aggregation is required")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise AggregationError("invalid_spec", f"aggregation names must be unique: {names}")
        self.specs = tuple(specs)
        self.aggs = []
        for s in specs:
            agg = make_aggregator(s.kind, s.params)
            if agg.needs_field and not s.field:
                raise AggregationError("invalid_spec", f"aggregation {s.name!r} ({s.kind}) needs a field")
            self.aggs.append(agg)
        self._items = list(zip(self.specs, self.aggs, strict=True))
        #: True when ``result(state)`` equals ``state`` (a caller that only encodes the
        #: result may then encode the state without the copy).
        self.result_is_state = False
        # Hot-path tables (one lookup per aggregation per record, no attribute walks).
        self._adders = tuple((s.name, a.add) for s, a in self._items)
        self._inits = tuple((s.name, a.init) for s, a in self._items)
        self._results = tuple((s.name, a.result) for s, a in self._items)
        #: (name, top-level field or None, numeric) when every field is a plain name
        #: (no dots): ``extract`` then reads it with one dict lookup.
        self._plain = (
            tuple((s.name, s.field or None, a.numeric) for s, a in self._items)
            if all(not s.field or "." not in s.field for s in self.specs) else None
        )
        # Hot-path shortcuts, each equal to the general method it replaces (as instance
        # attributes, so ``aggs.init()`` etc. cost no Python frame):
        # - every initial state immutable: a window's states are a copy of a template;
        if self._plain is not None:
            # - plain fields: one generated function (the method below is its fallback).
            self.extract = _fused_extractor(self._plain, self._checked_extract)  # type: ignore[method-assign]
        first = {s.name: a.init() for s, a in self._items}
        if all(type(v) in _SCALARS for v in first.values()):
            self.init = first.copy  # type: ignore[method-assign]
        if all(a.builtin in _INLINE_ADD for a in self.aggs):
            # - only count/sum/min/max: their additions inline in one function, and
            #   their results are the states themselves (a copy: the caller may keep it).
            self.add = _fused_adder([(s.name, a.builtin) for s, a in self._items])  # type: ignore[method-assign]
            self.result = dict  # type: ignore[method-assign,assignment]
            self.result_is_state = True

    def extract(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The input value of each aggregation from one record; AggregationError if
        a field is missing or a numeric aggregation gets a non-number."""
        return self._checked_extract(record)

    def _checked_extract(self, record: Mapping[str, Any]) -> dict[str, Any]:
        plain = self._plain
        if plain is not None and type(record) is dict:
            fast: dict[str, Any] = {}
            for name, fld, numeric in plain:
                if fld is None:
                    fast[name] = None
                    continue
                v = record.get(fld, _MISSING)
                # Exact types: bool (an int subclass), NaN/inf and missing fields take
                # the checked path below, which raises the precise error.
                if v is _MISSING or (numeric and not (
                        type(v) is int or (type(v) is float and v - v == 0))):
                    break
                fast[name] = v
            else:
                return fast
        values: dict[str, Any] = {}
        for spec, agg in self._items:
            if not spec.field:
                values[spec.name] = None
                continue
            try:
                v = get_field(record, spec.field)
            except KeyError:
                raise AggregationError(
                    "missing_field", f"record has no field {spec.field!r} for aggregation {spec.name!r}"
                ) from None
            if agg.numeric and not _is_number(v):
                raise AggregationError(
                    "not_numeric",
                    f"aggregation {spec.name!r} ({spec.kind}) needs a number in {spec.field!r}, got {v!r}",
                )
            values[spec.name] = v
        return values

    def init(self) -> dict[str, Any]:
        """The empty state of every aggregation."""
        return {name: init() for name, init in self._inits}

    def add(self, state: dict[str, Any], values: Mapping[str, Any], ts: int) -> dict[str, Any]:
        """Add one record's extracted values (from ``extract``) to ``state`` in place."""
        for name, add in self._adders:
            state[name] = add(state[name], values[name], ts)
        return state

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """The state of two windows merged (session windows joining)."""
        return {spec.name: agg.merge(a[spec.name], b[spec.name]) for spec, agg in self._items}

    def result(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The output value of every aggregation."""
        return {name: result(state[name]) for name, result in self._results}


def parse_agg_specs(raw: Any) -> list[AggSpec]:
    """Aggregations from config/API form: a list of ``{name, type, field, ...params}``."""
    if not isinstance(raw, list) or not raw:
        raise AggregationError("invalid_spec", "aggregations must be a non-empty list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise AggregationError("invalid_spec", f"aggregations[{i}] must be an object")
        kind = item.get("type")
        if not isinstance(kind, str):
            raise AggregationError("invalid_spec", f"aggregations[{i}].type must be a string")
        name = item.get("name", kind if item.get("field") is None else f"{kind}_{item['field']}")
        fld = item.get("field")
        if not isinstance(name, str) or not name or (fld is not None and not isinstance(fld, str)):
            raise AggregationError("invalid_spec", f"aggregations[{i}]: name and field must be strings")
        params = {k: v for k, v in item.items() if k not in {"name", "type", "field"}}
        make_aggregator(kind, params)
        out.append(AggSpec(name, kind, fld, params))
    return out
