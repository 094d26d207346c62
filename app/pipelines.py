"""Live pipelines declared in the config file's ``pipelines:`` section.

    pipelines:
      - name: clean_events
        source: events            # logical topic (STREAMETL_TOPIC_PREFIX is prepended)
        steps: [deduplicate, normalize, {op: filter, where: "value > 0"}]
        sink: events.clean
        key_by: user_id           # optional: the sink message key comes from this field

The steps use exactly the language of ``POST /api/v1/process``. A bad entry stops the
worker at start with a message naming the pipeline, step and parameter.

A pipeline may end in a **window step** (only in live pipelines)::

    steps: [normalize, {op: filter, where: "action == 'click'"},
            {op: window, key_by: user_id, time_field: ts, window: {type: tumbling, size: 10},
             aggregations: [{name: clicks, type: count}], emit: final}]

It takes the fields of a ``windows:`` entry (app/windows.py) except ``name``, ``source``,
``sink`` and ``repartition``. It becomes a window named ``pipeline.<name>`` whose source
is the internal topic ``pipeline.<name>.windowed`` the pipeline writes its records to,
and whose results go to the pipeline's ``sink``. The window rekeys that topic by
``key_by`` (``repartition: true``). That costs one extra hop, but it keeps a key's
records in one partition under both guarantees: under exactly_once the pipeline's
outputs keep their input partition.

A pipeline may start with a **join step** (docs/joins.md, "Live")::

    source: orders
    steps: [{op: join, with: payments, on: order_id, within: 10m, grace: 1m, type: left},
            {op: filter, where: "right == null or right.amount > 0"}]

Its source is the left side and ``with`` the right one; both must be keyed by the join
key (the same key in the same partition number: co-partitioned), with the same
partition count (checked before the first batch). The steps after it run on each
joined record and must be stateless (normalize, enrich, filter, map). The joined
records go to ``sink`` keyed by the join key; records past the grace go to the late
topic ``pipeline.<name>.late``.

A pipeline's ``sink`` may be a database table instead of a topic::

    sink: {type: postgres, dsn: "postgresql://…", table: customers, key: [id], mode: upsert}
    sink: {type: sqlite, path: data/replica.db, table: customers, key: [id], mode: upsert}

The pipeline then writes to the internal topic ``pipeline.<name>.to-<type>``, and a
database sink named ``pipeline.<name>`` (app/db_sinks.py) replicates that topic into
the table, exactly once in effect. ``sink: {type: table, table: NAME, key: [...]}``
materializes it instead, read as ``GET /api/v1/tables/NAME/{key}``.

A pipeline whose first step is ``cdc`` reads a Debezium change stream (docs/cdc.md)::

    steps: [{op: cdc, key: [id]}, {op: filter, where: "country == 'NO'"}, {op: map, drop: [ssn]}]
    sink: {type: postgres, dsn: "postgresql://…", table: customers, key: [id], mode: upsert}

The other steps work on each change's row; the pipeline writes Debezium-style envelopes
keyed by the primary key (a delete for a row a step dropped, and for every delete and
tombstone), so its database sink reads them as ``format: debezium``. Its key is the
sink's when the step names none; ``key_by`` and a window step do not apply.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.config_file import section
from app.db_sinks import SinkConfigError, SinkSpec, parse_sink
from app.windows import WindowConfigError, WindowDef, parse_window_def
from operators.joins import JoinSpec
from operators.steps import STEP_PARSERS, Step, StepSpecError, parse_steps
from operators.table_join import TableJoinSpec

PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class PipelineConfigError(ValueError):
    """The ``pipelines:`` section is invalid; the message names the entry and field,
    ``path`` names it as a path into the file (``pipelines[0].steps[2].where``) and
    ``reason`` is the message without the entry's name (``streametl check-config``)."""

    def __init__(self, message: str, path: str = "pipelines", reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason or message


@dataclass(frozen=True)
class PipelineSpec:
    """One validated pipeline."""

    name: str
    source: str
    sink: str
    steps: list[Step] = field(compare=False)
    step_specs: list[Any] = field(compare=False)
    key_by: str | None = None
    #: The window a terminal window step feeds (None without one).
    window: WindowDef | None = None
    #: The database table the sink topic is replicated into (None: the topic is the end).
    db_sink: SinkSpec | None = None
    #: The live join a first ``join`` step declares (None without one): an interval
    #: join of two streams, or a stream-table join (``with_table``).
    join: JoinSpec | TableJoinSpec | None = None
    #: The join's right side (logical topic name; a stream-table join's table topic,
    #: once ``resolve_tables`` has looked up materialized tables).
    join_with: str | None = None
    #: A stream-table join's ``with_table`` as written (a topic or materialized table).
    join_table: str | None = None

    @property
    def late_topic(self) -> str:
        """Where a join's late records go (logical name)."""
        return f"pipeline.{self.name}.late"

    def keyed_topic(self, side: str) -> str:
        """The internal topic a re-keyed join side (``repartition``) is read from, keyed
        by the join key (logical name; ``side``: ``left`` or ``right``)."""
        return f"pipeline.{self.name}.{side}.keyed"

    @property
    def output_topic(self) -> str:
        """Where the pipeline writes its records: the sink, or its window's input."""
        return self.window.source if self.window is not None else self.sink

    @property
    def is_cdc(self) -> bool:
        """The input is a change stream (a ``cdc`` first step): see operators.steps.run_change."""
        return bool(self.steps) and self.steps[0].op == "cdc"

    @property
    def has_state(self) -> bool:
        return any(s.op == "deduplicate" for s in self.steps)

    @property
    def reads_reference(self) -> bool:
        return any(s.op == "enrich" and s.params.source for s in self.steps)


#: The fields of a window step: those of a ``windows:`` entry the pipeline does not fix.
WINDOW_STEP_FIELDS = {"op", "key_by", "time_field", "time_unit", "window", "aggregations", "emit",
                      "late_topic", "idle_close"}


def parse_window_step(index: int, spec: Any) -> Step:
    """The terminal ``window`` step: its shape here; the window itself is checked with
    the pipeline (``window_of``), which knows the names and topics."""
    unknown = set(spec) - WINDOW_STEP_FIELDS
    if unknown:
        raise StepSpecError(index, "window", sorted(unknown)[0],
                            f"unknown parameter; allowed: {sorted(WINDOW_STEP_FIELDS - {'op'})}")
    return Step(index, "window", dict(spec), lambda record, ctx: record, terminal=True)


STEP_PARSERS.setdefault("window", parse_window_step)


def window_of(name: str, sink: str, step: Step, where: str, path: str = "pipelines") -> WindowDef:
    """The window a pipeline's window step declares."""
    raw = {k: v for k, v in step.params.items() if k != "op"}
    raw.update(name=f"pipeline.{name}", source=f"pipeline.{name}.windowed", sink=sink, repartition=True)
    try:
        return parse_window_def(raw, f"{where} step {step.index} (window)")
    except WindowConfigError as exc:
        raise PipelineConfigError(str(exc), f"{path}.steps[{step.index}]",
                                  str(exc).split(": ", 1)[-1]) from None


def _entry_error(where: str, path: str, message: str, field: str = "") -> PipelineConfigError:
    """An error of one entry's field: ``where.field: message`` at ``path.field``."""
    suffix = f".{field}" if field else ""
    return PipelineConfigError(f"{where}{suffix}: {message}", f"{path}{suffix}", message)


#: The steps that may follow a live join: stateless, one joined record at a time.
AFTER_JOIN = ("normalize", "enrich", "filter", "map")


def _join_of(steps: list[Step], entry: dict[str, Any], where: str, path: str) -> tuple[JoinSpec | None, str | None]:
    """The live join a pipeline declares (its first step), or (None, None)."""
    joins = [s for s in steps if s.op == "join"]
    if not joins:
        return None, None
    step = joins[0]
    at = f"{path}.steps[{step.index}]"

    def refuse(message: str, field: str = "") -> PipelineConfigError:
        return PipelineConfigError(f"{where}: step {step.index} (join): {message}",
                                   at + (f".{field}" if field else ""), message)

    if step.index != 0:
        raise refuse("a join must be the first step (the steps before it would run on the left side only)")
    spec, other, inline = step.params
    if isinstance(spec, TableJoinSpec):
        if inline is not None:
            raise refuse("a live join reads its table from a topic or materialized table: give 'with_table', "
                         "not 'table_records'", "table_records")
        if not TOPIC_NAME.match(other):
            raise refuse("must be a topic or materialized table name", "with_table")
        if other in (entry["source"], entry["sink"]):
            raise refuse("must be another topic than the pipeline's source and sink", "with_table")
    elif inline is not None:
        raise refuse("a live join reads its right side from a topic: give 'with', not 'with_records'", "with_records")
    if not isinstance(other, str) or not TOPIC_NAME.match(other):
        raise refuse("must be a topic name", "with")
    if other in (entry["source"], entry["sink"]):
        raise refuse("must be another topic than the pipeline's source and sink", "with")
    for later in steps[1:]:
        if later.op not in AFTER_JOIN:
            raise PipelineConfigError(
                f"{where}: step {later.index} ({later.op}): only stateless steps {list(AFTER_JOIN)} may follow a join",
                f"{path}.steps[{later.index}]", f"only stateless steps {list(AFTER_JOIN)} may follow a join")
    if entry.get("key_by") is not None:
        raise PipelineConfigError(f"{where}.key_by: a join's output is keyed by the join key ('on')",
                                  f"{path}.key_by", "a join's output is keyed by the join key ('on')")
    return spec, other


def parse_pipelines(raw: Any) -> list[PipelineSpec]:
    """Validate the ``pipelines:`` section (a list of entries)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PipelineConfigError("pipelines: must be a list of pipeline entries", "pipelines",
                                  "must be a list of pipeline entries")
    specs: list[PipelineSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = path = f"pipelines[{i}]"

        if not isinstance(entry, dict):
            raise _entry_error(where, path, "must be an object with name, source, steps, sink")
        unknown = set(entry) - {"name", "source", "sink", "steps", "key_by", "description"}
        if unknown:
            raise _entry_error(where, path, f"unknown field(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not PIPELINE_NAME.match(name):
            raise _entry_error(where, path, "must be 1-100 of letters, digits, '.', '_', '-'", "name")
        where = f"pipeline {name!r}"
        if name in seen:
            raise PipelineConfigError(f"{where}: name used twice", f"{path}.name", "name used twice")
        seen.add(name)
        entry = dict(entry)
        db_sink = None
        if isinstance(entry.get("sink"), dict):
            sink_topic = f"pipeline.{name}.to-{entry['sink'].get('type')}"
            # A materialized table is read over HTTP by its name, which is its table's
            # (a SQL identifier); a database sink is named after its pipeline.
            sink_name = entry["sink"].get("table") or name if entry["sink"].get("type") == "table" \
                else f"pipeline.{name}"
            try:
                db_sink = parse_sink(entry["sink"], f"{where}.sink", name=sink_name, source=sink_topic)
            except SinkConfigError as exc:
                raise PipelineConfigError(str(exc), f"{path}.sink", str(exc)) from None
            entry["sink"] = sink_topic
        for fld in ("source", "sink"):
            if not isinstance(entry.get(fld), str) or not TOPIC_NAME.match(entry[fld]):
                raise _entry_error(where, path, "must be a topic name" + (" or a database table" if fld == "sink" else ""), fld)
        if entry["source"] == entry["sink"]:
            raise PipelineConfigError(f"{where}: source and sink must differ", f"{path}.sink",
                                      "source and sink must differ")
        key_by = entry.get("key_by")
        if key_by is not None and (not isinstance(key_by, str) or not key_by):
            raise _entry_error(where, path, "must be a field name", "key_by")
        try:
            steps = parse_steps(entry.get("steps", []))
        except StepSpecError as exc:
            step_path = f"{path}.steps" + (f"[{exc.index}]" if exc.op or exc.param else "") + \
                (f".{exc.param}" if exc.param else "")
            raise PipelineConfigError(f"{where}: {exc}", step_path, exc.reason) from None
        join, join_with = _join_of(steps, entry, where, path)
        if steps and steps[0].op == "cdc":
            steps, db_sink = _cdc_pipeline(steps, db_sink, key_by, where, path)
        window = None
        if steps and steps[-1].op == "window":
            window = window_of(name, entry["sink"], steps[-1], where, path)
            # Keyed like the window, so the rekey step's partitioning is the same.
            key_by = key_by or window.key_by
        specs.append(PipelineSpec(name, entry["source"], entry["sink"], steps, entry.get("steps", []), key_by,
                                  window, db_sink, join, join_with,
                                  join_with if isinstance(join, TableJoinSpec) else None))
    return specs


def resolve_tables(pipelines: Sequence[PipelineSpec], sinks: Sequence[SinkSpec]) -> list[PipelineSpec]:
    """Stream-table joins whose ``with_table`` names a materialized table (a
    ``type: table`` sink) read that table's topic, in its format, keyed by its key
    (unless the step names ``table_key``); any other name is the table's topic."""
    tables = {s.name: s for s in sinks if s.type == "table"}
    out = []
    for spec in pipelines:
        sink = tables.get(spec.join_table or "")
        if isinstance(spec.join, TableJoinSpec) and sink is not None:
            join = spec.join
            if join.table_key == join.on and sink.key and len(sink.key) == len(join.on):
                join = dataclasses.replace(join, table_key=sink.key)
            spec = dataclasses.replace(spec, join=dataclasses.replace(join, format=sink.format),
                                       join_with=sink.source)
        out.append(spec)
    return out


def _cdc_pipeline(steps: list[Step], db_sink: SinkSpec | None, key_by: str | None, where: str,
                  path: str) -> tuple[list[Step], SinkSpec | None]:
    """A change-stream pipeline's steps and database sink: the sink reads the envelopes
    the pipeline writes (``format: debezium``) and the step's key defaults to the sink's."""
    cdc = steps[0]
    if key_by is not None:
        raise _entry_error(where, path, "a cdc pipeline's outputs are keyed by the change's key", "key_by")
    if steps[-1].op == "window":
        raise _entry_error(where, path, "a cdc pipeline cannot end in a window step", f"steps[{steps[-1].index}]")
    if db_sink is None:
        return steps, None
    key = cdc.params.key
    if db_sink.key and key is None:
        key = db_sink.key
        steps = [dataclasses.replace(cdc, params=dataclasses.replace(cdc.params, key=key)), *steps[1:]]
    if db_sink.mode == "upsert" and tuple(key or ()) != db_sink.key:
        raise _entry_error(where, path, f"the sink's key {list(db_sink.key)} must be the cdc step's key "
                                        f"{list(key or ())}", "sink.key")
    return steps, dataclasses.replace(db_sink, format="debezium")


def configured_pipelines() -> list[PipelineSpec]:
    """The pipelines of the config file (settings.pipelines_file)."""
    return parse_pipelines(section("pipelines"))


def pipeline_windows() -> list[WindowDef]:
    """The windows that configured pipelines' window steps declare."""
    return [p.window for p in configured_pipelines() if p.window is not None]
