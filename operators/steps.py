"""Step specs (the language of ``/api/v1/process`` and live pipelines) and the runner.

A step is written as a name (``"deduplicate"``) or an object with parameters
(``{"op": "filter", "where": "value > 10"}``). ``parse_steps`` checks every step
before anything runs and raises ``StepSpecError`` naming the step index, op and
parameter. ``run_record`` pushes one record through the steps; the caller supplies
state (what deduplication remembers, reference data) through a ``StepContext``.

Other modules may add an op to ``STEP_PARSERS`` (e.g. a terminal ``window`` step).

A ``cdc`` first step makes the input a Debezium change stream (``run_change``): each
record is a change event (or a tombstone), and the other steps work on its row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from operators.cdc import UPSERT, ChangeError, delete_of, envelope, message_key, parse_change
from operators.expr import ExprError, compile_expr
from operators.joins import JOIN_TYPES, BatchJoin, JoinSpec
from operators.table_join import (
    AS_OF,
    TABLE_FORMATS,
    TABLE_JOIN_TYPES,
    BatchTableJoin,
    TableJoinSpec,
)
from operators.transform import (
    SCHEMA_TYPES,
    EnrichSpec,
    FieldSchema,
    MapSpec,
    NormalizeSpec,
    RecordFailure,
    Seen,
    dedupe_key,
    duration_seconds,
    enrich,
    epoch_seconds,
    is_duplicate,
    keep,
    map_record,
    normalize,
)


class StepSpecError(ValueError):
    """A step spec is invalid; names the step (index and op) and the parameter."""

    def __init__(self, index: int, op: str | None, param: str | None, message: str) -> None:
        where = f"step {index}" + (f" ({op})" if op else "") + (f", parameter {param!r}" if param else "")
        super().__init__(f"{where}: {message}")
        self.index, self.op, self.param, self.reason = index, op, param, message

    def details(self) -> dict[str, Any]:
        return {"step": self.index, "op": self.op, "parameter": self.param}


class DedupeMemory(Protocol):
    """What deduplication remembers: key → when it was admitted, as a ``Seen`` or the
    ``[at, seq]`` pair it is stored as (read by position)."""

    def get(self, key: str) -> Seen | Sequence[Any] | None: ...

    def put(self, key: str, at: float, seq: int) -> None: ...


class StepContext(Protocol):
    """State and clocks a step may use."""

    def memory(self, step_index: int) -> DedupeMemory: ...

    def lookup(self, source: str, key: str) -> Mapping[str, Any] | None: ...

    def now(self) -> float: ...

    def next_seq(self) -> int: ...


@dataclass(frozen=True)
class Step:
    """One parsed step: its position, op, and what it does to a record.

    ``apply(record, ctx)`` returns the record after the step, or None when the step
    drops it, for the one reason the step drops records (``drops``: a duplicate, a
    filtered record); it raises ``RecordFailure`` when the record cannot pass. (A
    (record, reason) pair per step cost a tuple per step per record.)"""

    index: int
    op: str
    params: Any
    apply: Callable[[dict[str, Any], StepContext], dict[str, Any] | None]
    drops: str | None = None
    terminal: bool = False

    @property
    def label(self) -> str:
        return f"{self.index}:{self.op}"


# ---------------------------------------------------------------- parsers

_COMMON = {"op", "name"}


def _check_params(index: int, op: str, spec: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(spec) - allowed - _COMMON
    if unknown:
        raise StepSpecError(index, op, sorted(unknown)[0], f"unknown parameter; allowed: {sorted(allowed)}")


def _str_list(index: int, op: str, spec: Mapping[str, Any], param: str) -> tuple[str, ...] | None:
    value = spec.get(param)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise StepSpecError(index, op, param, "must be a list of field names")
    return tuple(value)


def _positive(index: int, op: str, spec: Mapping[str, Any], param: str, kind: type) -> Any:
    value = spec.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and not isinstance(value, int)):
        raise StepSpecError(index, op, param, f"must be a positive {'integer' if kind is int else 'number'}")
    return value


def parse_deduplicate(index: int, spec: Mapping[str, Any]) -> Step:
    op = "deduplicate"
    _check_params(index, op, spec, {"fields", "horizon_seconds", "horizon_count", "time_field"})
    fields = _str_list(index, op, spec, "fields")
    horizon_seconds = _positive(index, op, spec, "horizon_seconds", float)
    horizon_count = _positive(index, op, spec, "horizon_count", int)
    time_field = spec.get("time_field")
    if time_field is not None and (not isinstance(time_field, str) or not time_field):
        raise StepSpecError(index, op, "time_field", "must be a field name")
    if horizon_seconds is None and horizon_count is None:
        horizon_seconds = 24 * 3600.0  # a day, unless told otherwise

    def apply(record: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        key = dedupe_key(record, fields)
        now = ctx.now()
        if time_field is not None:
            if record.get(time_field) is None:
                raise RecordFailure(f"time field {time_field!r} is missing")
            now = epoch_seconds(record[time_field])
        seq = ctx.next_seq()
        memory = ctx.memory(index)
        if is_duplicate(memory.get(key), now, seq, horizon_seconds, horizon_count):
            return None
        memory.put(key, now, seq)
        return record

    params = {"fields": fields, "horizon_seconds": horizon_seconds, "horizon_count": horizon_count, "time_field": time_field}
    return Step(index, op, params, apply, drops="duplicate")


def parse_normalize(index: int, spec: Mapping[str, Any]) -> Step:
    op = "normalize"
    _check_params(index, op, spec, {"snake_case", "trim", "lowercase", "timestamps", "schema"})
    for flag in ("snake_case", "trim"):
        if flag in spec and not isinstance(spec[flag], bool):
            raise StepSpecError(index, op, flag, "must be true or false")
    schema: dict[str, FieldSchema] = {}
    raw_schema = spec.get("schema")
    if raw_schema is not None:
        if not isinstance(raw_schema, dict):
            raise StepSpecError(index, op, "schema", "must be an object of field name → {type, required, default}")
        fields = raw_schema.get("fields", raw_schema)
        if not isinstance(fields, dict):
            raise StepSpecError(index, op, "schema.fields", "must be an object")
        for name, fs in fields.items():
            if isinstance(fs, str):
                fs = {"type": fs}
            if not isinstance(fs, dict) or set(fs) - {"type", "required", "default"}:
                raise StepSpecError(index, op, f"schema.{name}", "must be a type name or {type, required, default}")
            type_name = fs.get("type", "any")
            if type_name not in SCHEMA_TYPES:
                raise StepSpecError(index, op, f"schema.{name}.type", f"must be one of {list(SCHEMA_TYPES)}")
            if not isinstance(fs.get("required", False), bool):
                raise StepSpecError(index, op, f"schema.{name}.required", "must be true or false")
            schema[name] = FieldSchema(type_name, fs.get("required", False), fs.get("default"), "default" in fs)
    ns = NormalizeSpec(
        snake_case=spec.get("snake_case", True),
        trim=spec.get("trim", True),
        lowercase=_str_list(index, op, spec, "lowercase") or (),
        timestamps=_str_list(index, op, spec, "timestamps") or (),
        schema=schema,
    )
    return Step(index, op, ns, lambda record, ctx: normalize(record, ns))


def parse_enrich(index: int, spec: Mapping[str, Any]) -> Step:
    op = "enrich"
    _check_params(index, op, spec, {"from", "key", "fields", "prefix", "on_missing", "overwrite", "processing_time"})
    source, key = spec.get("from"), spec.get("key")
    if (source is None) != (key is None):
        raise StepSpecError(index, op, "key" if key is None else "from", "'from' (reference data name) and 'key' (record field) go together")
    for param, value in (("from", source), ("key", key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise StepSpecError(index, op, param, "must be a non-empty string")
    on_missing = spec.get("on_missing", "keep")
    if on_missing not in ("keep", "drop", "fail"):
        raise StepSpecError(index, op, "on_missing", "must be keep, drop or fail")
    prefix = spec.get("prefix", "")
    if not isinstance(prefix, str):
        raise StepSpecError(index, op, "prefix", "must be a string")
    processing_time = spec.get("processing_time", None if source else "processed_at")
    if processing_time is not None and (not isinstance(processing_time, str) or not processing_time):
        raise StepSpecError(index, op, "processing_time", "must be a field name")
    es = EnrichSpec(source, key, _str_list(index, op, spec, "fields"), prefix, on_missing,
                    bool(spec.get("overwrite", False)), processing_time)

    return Step(index, op, es, lambda record, ctx: enrich(record, es, ctx.lookup, ctx.now()),
                drops="no_reference_row")


def _expr(index: int, op: str, param: str, text: Any):
    try:
        return compile_expr(text)
    except ExprError as exc:
        raise StepSpecError(index, op, param, str(exc)) from None


def parse_filter(index: int, spec: Mapping[str, Any]) -> Step:
    op = "filter"
    _check_params(index, op, spec, {"where"})
    if "where" not in spec:
        raise StepSpecError(index, op, "where", "is required, e.g. \"value > 10\"")
    where = _expr(index, op, "where", spec["where"])
    return Step(index, op, where.text, lambda record, ctx: record if keep(record, where) else None,
                drops="filtered")


def parse_map(index: int, spec: Mapping[str, Any]) -> Step:
    op = "map"
    _check_params(index, op, spec, {"set", "rename", "drop", "select"})
    sets = spec.get("set") or {}
    if not isinstance(sets, dict):
        raise StepSpecError(index, op, "set", "must be an object of field → expression")
    renames = spec.get("rename") or {}
    if not isinstance(renames, dict) or not all(isinstance(v, str) and v for v in renames.values()):
        raise StepSpecError(index, op, "rename", "must be an object of old name → new name")
    ms = MapSpec(
        set=tuple((name, _expr(index, op, f"set.{name}", text)) for name, text in sets.items()),
        rename=tuple(renames.items()),
        drop=_str_list(index, op, spec, "drop") or (),
        select=_str_list(index, op, spec, "select"),
    )
    if not (ms.set or ms.rename or ms.drop or ms.select is not None):
        raise StepSpecError(index, op, None, "needs at least one of set, rename, drop, select")
    return Step(index, op, spec, lambda record, ctx: map_record(record, ms))


def _duration(index: int, op: str, spec: Mapping[str, Any], param: str, allow_zero: bool = False) -> float | None:
    if spec.get(param) is None:
        return None
    try:
        return duration_seconds(spec[param], allow_zero=allow_zero)
    except ValueError as exc:
        raise StepSpecError(index, op, param, str(exc)) from None


def parse_join(index: int, spec: Mapping[str, Any]) -> Step:
    """An interval join with a second stream (operators/joins.py, docs/joins.md): the
    other side is a topic (``with``, live pipelines) or given inline (``with_records``,
    ``POST /api/v1/process``). Its ``params`` are ``(JoinSpec, with, with_records)``."""
    op = "join"
    if "with_table" in spec or "table_records" in spec:
        return parse_table_join(index, spec)
    _check_params(index, op, spec, {"with", "with_records", "on", "within", "before", "after", "grace",
                                    "type", "time_field", "max_matches", "prefix", "idle_close", "repartition"})
    other, inline = spec.get("with"), spec.get("with_records")
    for live_only in ("idle_close", "repartition"):
        if inline is not None and live_only in spec:
            raise StepSpecError(index, op, live_only, "applies to a live join ('with' a topic) only")
    repartition = spec.get("repartition", False)
    if not isinstance(repartition, bool):
        raise StepSpecError(index, op, "repartition", "must be true or false")
    if (other is None) == (inline is None):
        raise StepSpecError(index, op, "with", "give the other side: 'with' (a topic) or 'with_records' (a list)")
    if other is not None and (not isinstance(other, str) or not other):
        raise StepSpecError(index, op, "with", "must be a topic name")
    if inline is not None and (not isinstance(inline, list)):
        raise StepSpecError(index, op, "with_records", "must be a list of records")
    on = _str_list(index, op, spec, "on")
    if not on:
        raise StepSpecError(index, op, "on", "is required: the key field(s) both sides share")
    within = _duration(index, op, spec, "within", allow_zero=True)
    before = _duration(index, op, spec, "before", allow_zero=True)
    after = _duration(index, op, spec, "after", allow_zero=True)
    if within is None and (before is None or after is None):
        raise StepSpecError(index, op, "within", "is required (or both 'before' and 'after'), e.g. \"10m\"")
    before = within if before is None else before
    after = within if after is None else after
    kind = spec.get("type", "inner")
    if kind not in JOIN_TYPES:
        raise StepSpecError(index, op, "type", f"must be one of {list(JOIN_TYPES)}")
    time_field = _time_field(index, op, spec)
    max_matches = _positive(index, op, spec, "max_matches", int) or 1000
    prefixes = _prefixes(index, op, spec)
    js = JoinSpec(on, before, after, _duration(index, op, spec, "grace", allow_zero=True) or 0.0, kind,
                  time_field, max_matches, prefixes,
                  _duration(index, op, spec, "idle_close", allow_zero=True) or 0.0, repartition)

    def apply(record: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        raise RuntimeError("a join is run by run_batch or a live join, not record by record")

    return Step(index, op, (js, other, inline), apply, drops="late")


def _time_field(index: int, op: str, spec: Mapping[str, Any]) -> str:
    """A join's ``time_field`` (default ``ts``)."""
    time_field = spec.get("time_field", "ts")
    if not isinstance(time_field, str) or not time_field:
        raise StepSpecError(index, op, "time_field", "must be a field name")
    return time_field


def _prefixes(index: int, op: str, spec: Mapping[str, Any]) -> tuple[str, str] | None:
    prefix = spec.get("prefix")
    if prefix is None:
        return None
    if (not isinstance(prefix, dict) or set(prefix) - {"left", "right"}
            or not all(isinstance(v, str) for v in prefix.values())):
        raise StepSpecError(index, op, "prefix", "must be an object {left: text, right: text}")
    prefixes = (prefix.get("left", ""), prefix.get("right", ""))
    if prefixes[0] == prefixes[1]:
        raise StepSpecError(index, op, "prefix", "left and right need different prefixes")
    return prefixes


def parse_table_join(index: int, spec: Mapping[str, Any]) -> Step:
    """A temporal stream-table join (operators/table_join.py, docs/joins.md): the table
    is a topic or materialized table (``with_table``, live pipelines) or given inline
    (``table_records``, ``POST /api/v1/process``). Its ``params`` are
    ``(TableJoinSpec, with_table, table_records)``."""
    op = "join"
    _check_params(index, op, spec, {"with_table", "table_records", "on", "table_key", "as_of", "history", "type",
                                    "time_field", "format", "prefix"})
    other, inline = spec.get("with_table"), spec.get("table_records")
    if (other is None) == (inline is None):
        raise StepSpecError(index, op, "with_table",
                            "give the table: 'with_table' (a topic or materialized table) or 'table_records' (a list)")
    if other is not None and (not isinstance(other, str) or not other):
        raise StepSpecError(index, op, "with_table", "must be a topic or materialized table name")
    if inline is not None and not isinstance(inline, list):
        raise StepSpecError(index, op, "table_records", "must be a list of {key, value, timestamp}")
    on = _str_list(index, op, spec, "on")
    if not on:
        raise StepSpecError(index, op, "on", "is required: the stream's key field(s)")
    table_key = _str_list(index, op, spec, "table_key")
    if table_key is not None and len(table_key) != len(on):
        raise StepSpecError(index, op, "table_key", f"needs {len(on)} field(s), one per 'on' field")
    as_of = spec.get("as_of", "latest")
    if as_of not in AS_OF:
        raise StepSpecError(index, op, "as_of", f"must be one of {list(AS_OF)}")
    history = _duration(index, op, spec, "history")
    if history is not None and as_of != "event_time":
        raise StepSpecError(index, op, "history", "applies to as_of: event_time (versions kept back that far)")
    kind = spec.get("type", "inner")
    if kind not in TABLE_JOIN_TYPES:
        raise StepSpecError(index, op, "type", f"must be one of {list(TABLE_JOIN_TYPES)} for a stream-table join")
    time_field = _time_field(index, op, spec)
    fmt = spec.get("format", "json")
    if fmt not in TABLE_FORMATS:
        raise StepSpecError(index, op, "format", f"must be one of {list(TABLE_FORMATS)}")
    ts = TableJoinSpec(on, table_key or on, as_of, 86400.0 if history is None else history, kind, time_field, fmt,
                       _prefixes(index, op, spec))

    def apply(record: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        raise RuntimeError("a join is run by run_batch or a live join, not record by record")

    return Step(index, op, (ts, other, inline), apply, drops="no_row")


@dataclass(frozen=True)
class CdcSpec:
    """The ``cdc`` step: the key fields of the change stream (None: the message key's)."""

    key: tuple[str, ...] | None = None


def parse_cdc(index: int, spec: Mapping[str, Any]) -> Step:
    """``{op: cdc, key: [id]}``: the input is a Debezium change stream. Its records are
    read by ``run_change`` before any step; in the step list it passes the row on."""
    op = "cdc"
    _check_params(index, op, spec, {"key"})
    if index != 0:
        raise StepSpecError(index, op, "op", "must be the first step (it reads the change events)")
    return Step(index, op, CdcSpec(_str_list(index, op, spec, "key")), lambda record, ctx: record)


#: op name → parser(index, spec) -> Step. Other modules may register more ops.
STEP_PARSERS: dict[str, Callable[[int, Mapping[str, Any]], Step]] = {
    "cdc": parse_cdc,
    "deduplicate": parse_deduplicate,
    "normalize": parse_normalize,
    "enrich": parse_enrich,
    "filter": parse_filter,
    "map": parse_map,
    "join": parse_join,
}

MAX_STEPS = 64


def parse_steps(specs: Any) -> list[Step]:
    """Every step checked before anything runs; StepSpecError names the first bad one."""
    if not isinstance(specs, list):
        raise StepSpecError(0, None, None, "steps must be a list")
    if len(specs) > MAX_STEPS:
        raise StepSpecError(MAX_STEPS, None, None, f"at most {MAX_STEPS} steps")
    steps = []
    for index, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = {"op": spec}
        if not isinstance(spec, dict):
            raise StepSpecError(index, None, None, "a step is an op name or an object with 'op'")
        op = spec.get("op")
        if op not in STEP_PARSERS:
            raise StepSpecError(index, op if isinstance(op, str) else None, "op",
                                f"unknown op {op!r}; known: {sorted(STEP_PARSERS)}")
        step = STEP_PARSERS[op](index, spec)
        if step.terminal and index != len(specs) - 1:
            raise StepSpecError(index, op, "op", "must be the last step")
        if op == "join" and any(s.op == "join" for s in steps):
            raise StepSpecError(index, op, "op", "one join per pipeline")
        if op == "join" and steps and steps[0].op == "cdc":
            raise StepSpecError(index, op, "op", "a change stream (cdc) cannot be joined yet")
        steps.append(step)
    return steps


# ---------------------------------------------------------------- running


@dataclass(slots=True)
class Outcome:
    """What became of one record: an output, or where and why it stopped."""

    record: dict[str, Any] | None
    step: Step | None = None
    dropped: str | None = None  # reason code of an intended drop (duplicate, filtered)
    failed: str | None = None  # message of a failure (to report / dead-letter)


def runnable(steps: Sequence[Step]) -> list[Step]:
    """The steps a record is pushed through: those before the first terminal one (a
    terminal step, e.g. ``window``, is run by its own agent)."""
    out = []
    for step in steps:
        if step.terminal:
            break
        out.append(step)
    return out


def pass_record(steps: Sequence[Step], record: dict[str, Any], ctx: StepContext) -> dict[str, Any] | Outcome:
    """Push one record through ``steps`` (``runnable``, no terminal step): the output
    record itself when it came through them all, else the ``Outcome`` saying where and
    why it stopped (tell them apart by ``.__class__ is Outcome``).

    Why not always an ``Outcome``: most records come through, and a live pipeline
    pushes each one; building an object for each only to unwrap it cost 2.6 % of the
    instructions per record of ``bench.transform_micro`` (81,421 against 79,290)."""
    for step in steps:
        try:
            out = step.apply(record, ctx)
        except RecordFailure as exc:
            return Outcome(None, step, failed=str(exc))
        if out is None:
            return Outcome(None, step, dropped=step.drops)
        record = out
    return record


def run_record(steps: Sequence[Step], record: dict[str, Any], ctx: StepContext) -> Outcome:
    """Push one record through the non-terminal steps; what became of it."""
    result = pass_record(runnable(steps), record, ctx)
    return result if result.__class__ is Outcome else Outcome(result)  # type: ignore[return-value]


#: Drops that leave the row where it is: a duplicate change was applied already. A row
#: any other step drops (filtered, no reference row) no longer belongs to the output.
_KEEPS_ROW = frozenset({"duplicate"})


@dataclass(slots=True)
class ChangeResult:
    """What became of one change event in a cdc pipeline: ``output`` the envelope to
    write (keyed by ``key``), or None; ``outcome`` where its row stopped (None: it came
    through the steps, or had none to go through); ``reason`` the dead-letter reason of
    an event that failed (``invalid_json``, ``unknown_op``, ``missing_key``, ...,
    ``step_failed``)."""

    output: dict[str, Any] | None
    key: bytes | None = None
    outcome: Outcome | None = None
    reason: str | None = None


def run_change(steps: Sequence[Step], key: Any, value: Any, ctx: StepContext) -> ChangeResult:
    """One record of a cdc pipeline (``steps``: ``runnable``, a ``cdc`` step first).

    Upserts run the row through the steps and write the resulting row; a row a step
    drops (a filter) becomes a delete of its key, so the output table never keeps a row
    that stopped matching; a duplicate changes nothing. Deletes, tombstones and
    truncates pass on unchanged (there is no row to run). The steps must keep the key
    fields as they are: a change whose output row lost or changed one fails."""
    cdc = steps[0]
    try:
        change = parse_change(key, value, cdc.params.key)
    except ChangeError as exc:
        return ChangeResult(None, outcome=Outcome(None, cdc, failed=str(exc)), reason=exc.reason)
    if change.op != UPSERT:
        return ChangeResult(envelope(change), message_key(change))
    out = pass_record(steps, change.row, ctx)  # type: ignore[arg-type]
    if out.__class__ is Outcome:
        if out.dropped in _KEEPS_ROW:  # type: ignore[union-attr]
            return ChangeResult(None, outcome=out)  # type: ignore[arg-type]
        if out.dropped:  # type: ignore[union-attr]
            gone = delete_of(change)
            return ChangeResult(envelope(gone), message_key(gone), out)  # type: ignore[arg-type]
        return ChangeResult(None, outcome=out, reason="step_failed")  # type: ignore[arg-type]
    for name, was in zip(change.fields, change.key or (), strict=True):
        if out.get(name, _MISSING) != was:  # type: ignore[union-attr]
            failed = Outcome(None, cdc, failed=f"the steps changed key field {name!r}: a cdc pipeline's "
                                               "steps must keep the key as it is")
            return ChangeResult(None, outcome=failed, reason="key_changed")
    return ChangeResult(envelope(change, out), message_key(change))  # type: ignore[arg-type]


_MISSING = object()


@dataclass
class StepCounts:
    """One step's counters: in, out, dropped by reason, failed."""

    index: int
    op: str
    into: int = 0
    out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.index, "op": self.op, "in": self.into, "out": self.out,
                "dropped": dict(self.dropped), "failed": self.failed}


class StepTally:
    """Per-step counters of every record run through ``steps``, at O(1) per record.

    Why not a counter update per step per record: only where a record stopped is
    news; it passed every step before that one. So ``add`` notes where each record
    stopped (or that it came through), and ``counts`` derives in/out per step."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = runnable(steps)
        #: index of the first step (the steps after a join start past 0)
        self.first = self.steps[0].index if self.steps else 0
        self.completed = 0
        self.dropped: list[dict[str, int]] = [{} for _ in self.steps]
        self.failed = [0] * len(self.steps)

    def add(self, outcome: Outcome) -> None:
        """Count one record's outcome (a record that came through: ``completed += 1``)."""
        step = outcome.step
        if step is None:
            self.completed += 1
        elif outcome.dropped:
            dropped = self.dropped[step.index - self.first]
            dropped[outcome.dropped] = dropped.get(outcome.dropped, 0) + 1
        else:
            self.failed[step.index - self.first] += 1

    def counts(self) -> list[StepCounts]:
        """Each step's counters; a step's ``in`` is what every later step saw plus
        what stopped at it, its ``out`` what reached the next step."""
        result: list[StepCounts] = []
        passed = self.completed
        for step in reversed(self.steps):
            i = step.index - self.first
            stopped = sum(self.dropped[i].values()) + self.failed[i]
            result.append(StepCounts(step.index, step.op, passed + stopped, passed, dict(self.dropped[i]),
                                     self.failed[i]))
            passed += stopped
        return result[::-1]


class MemoryContext:
    """A StepContext over plain dicts: one HTTP batch, or a unit test."""

    def __init__(self, lookup: Callable[[str, str], Mapping[str, Any] | None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self._memories: dict[int, dict[str, Seen]] = {}
        self._lookup = lookup or (lambda source, key: None)
        self._clock = clock or time.time
        self._seq = 0

    def memory(self, step_index: int) -> DedupeMemory:
        return _DictMemory(self._memories.setdefault(step_index, {}))

    def lookup(self, source: str, key: str) -> Mapping[str, Any] | None:
        return self._lookup(source, key)

    def now(self) -> float:
        return self._clock()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq


class _DictMemory:
    def __init__(self, data: dict[str, Seen]) -> None:
        self.data = data

    def get(self, key: str) -> Seen | None:
        return self.data.get(key)

    def put(self, key: str, at: float, seq: int) -> None:
        self.data[key] = Seen(at, seq)


@dataclass
class BatchResult:
    records: list[dict[str, Any]]
    counts: list[StepCounts]
    dropped: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    #: the input index of each output record
    origin: list[int] = field(default_factory=list)


def run_batch(steps: Sequence[Step], records: Sequence[Any], ctx: StepContext,
              keys: Sequence[Any] | None = None) -> BatchResult:
    """Run a batch (``/api/v1/process``): outputs, per-step counts, and every record
    that did not come out, with its index, step and reason.

    With a ``cdc`` first step each record is a change event (null: a tombstone) and
    ``keys`` holds the message keys (JSON values, None where a record has none); the
    outputs are the envelopes a pipeline would write.

    With a ``join`` step the records are its left side and its ``with_records`` the
    right one (operators.joins.BatchJoin); the steps after it run over the joined
    records, and what they drop is named by ``"side": "joined"`` and its output index."""
    before_terminal = runnable(steps)
    if before_terminal and before_terminal[0].op == "cdc":
        return _run_change_batch(before_terminal, records, ctx, keys, StepTally(steps))
    join_at = next((i for i, step in enumerate(steps) if step.op == "join"), None)
    if join_at is None:
        return _run_steps(steps, records, ctx)
    join = steps[join_at]
    spec, _, inline = join.params
    if isinstance(spec, TableJoinSpec):
        return _run_table_join(steps, join_at, records, ctx)
    before = _run_steps(steps[:join_at], records, ctx, side="left")
    left = before.records
    origin = before.origin
    right, failures = [], list(before.failures)
    right_origin = []
    for j, record in enumerate(inline or ()):
        if isinstance(record, dict):
            right.append(record)
            right_origin.append(j)
        else:
            failures.append({"index": j, "side": "right", "step": join.index, "op": "join",
                             "reason": f"record is {type(record).__name__}, not an object"})
    batch = BatchJoin(spec)
    counts = batch.run(left, right)
    where = {"l": ("left", origin), "r": ("right", right_origin)}
    dropped = list(before.dropped)
    for side, i in batch.late:
        name, positions = where[side]
        dropped.append({"index": positions[i], "side": name, "step": join.index, "op": "join", "reason": "late"})
    for side, i, reason in batch.failures:
        name, positions = where[side]
        failures.append({"index": positions[i], "side": name, "step": join.index, "op": "join", "reason": reason})
    after = _run_steps(steps[join_at + 1:], batch.outputs, ctx, side="joined")
    join_dropped = {"late": counts.late} if counts.late else {}
    if counts.limited:
        join_dropped["max_matches"] = counts.limited
    join_count = StepCounts(join.index, "join", len(left) + len(right), len(batch.outputs), join_dropped,
                            len(batch.failures))
    return BatchResult(after.records, before.counts + [join_count] + after.counts,
                       dropped + after.dropped, failures + after.failures)


def _run_table_join(steps: Sequence[Step], join_at: int, records: Sequence[Any], ctx: StepContext) -> BatchResult:
    """A stream-table join over HTTP: the records are the stream, ``table_records`` the
    table (operators.table_join.BatchTableJoin)."""
    join = steps[join_at]
    spec, _, inline = join.params
    before = _run_steps(steps[:join_at], records, ctx, side="stream")
    origin = before.origin
    batch = BatchTableJoin(spec)
    counts = batch.run(before.records, inline or ())
    dropped, failures = list(before.dropped), list(before.failures)
    for side, i, reason in batch.dropped:
        dropped.append({"index": origin[i] if side == "stream" else i, "side": side, "step": join.index,
                        "op": "join", "reason": reason})
    for side, i, reason in batch.failures:
        failures.append({"index": origin[i] if side == "stream" else i, "side": side, "step": join.index,
                         "op": "join", "reason": reason})
    after = _run_steps(steps[join_at + 1:], batch.outputs, ctx, side="joined")
    join_dropped = {}
    for _, _, reason in batch.dropped:
        join_dropped[reason] = join_dropped.get(reason, 0) + 1
    stream_failed = sum(1 for side, _, _ in batch.failures if side == "stream")
    join_count = StepCounts(join.index, "join", len(before.records), len(batch.outputs),
                            {k: v for k, v in join_dropped.items() if k != "late"}, stream_failed)
    if counts.table_late:
        join_count.dropped["table_late"] = counts.table_late
    return BatchResult(after.records, before.counts + [join_count] + after.counts,
                       dropped + after.dropped, failures + after.failures)


def _run_steps(steps: Sequence[Step], records: Sequence[Any], ctx: StepContext,
               side: str | None = None) -> BatchResult:
    tally = StepTally(steps)
    before_terminal = runnable(steps)
    outputs, origin, dropped, failures = [], [], [], []
    named = {} if side is None else {"side": side}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            failures.append({"index": i, **named, "step": None, "op": "parse",
                             "reason": f"record is {type(record).__name__}, not an object"})
            continue
        outcome = pass_record(before_terminal, record, ctx)
        if outcome.__class__ is not Outcome:
            tally.completed += 1
            outputs.append(outcome)
            origin.append(i)
            continue
        tally.add(outcome)
        if outcome.dropped:
            dropped.append({"index": i, **named, "step": outcome.step.index, "op": outcome.step.op,
                            "reason": outcome.dropped})
        else:
            failures.append({"index": i, **named, "step": outcome.step.index, "op": outcome.step.op,
                             "reason": outcome.failed})
    return BatchResult(outputs, tally.counts(), dropped, failures, origin)


def _run_change_batch(steps: Sequence[Step], records: Sequence[Any], ctx: StepContext,
                      keys: Sequence[Any] | None, tally: StepTally) -> BatchResult:
    outputs, dropped, failures = [], [], []
    for i, record in enumerate(records):
        result = run_change(steps, None if keys is None or i >= len(keys) else keys[i], record, ctx)
        if result.output is not None:
            outputs.append(result.output)
        outcome = result.outcome
        if outcome is None:
            tally.completed += 1
            continue
        tally.add(outcome)
        assert outcome.step is not None
        if result.output is not None:
            continue  # a dropped row, written on as a delete of its key
        if outcome.dropped:
            dropped.append({"index": i, "step": outcome.step.index, "op": outcome.step.op, "reason": outcome.dropped})
        else:
            failures.append({"index": i, "step": outcome.step.index, "op": outcome.step.op,
                             "reason": outcome.failed, "code": result.reason})
    return BatchResult(outputs, tally.counts(), dropped, failures)
