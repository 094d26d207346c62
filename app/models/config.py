"""pydantic models of the config file (``pipelines.yaml``) and of the step language.

They give the JSON Schema of the config file (``docs/pipelines.schema.json``, written by
``python -m app.models.config``) and of the ``transformations`` of
``POST /api/v1/process``. The step language, window specs, aggregations and pattern
definitions have intricate rules (expressions, cross-field constraints, duration
strings); these models describe their shape only, and the app keeps validating them with
its own validators (operators.steps.parse_steps, app.windows.parse_window_def,
app.patterns.parse_definition), whose messages name the field. ``streametl
check-config`` runs those validators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The config file's schema, checked in (tests/unit/test_config_schema.py keeps it current).
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "pipelines.schema.json"

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")]
TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,200}$")]
FieldName = Annotated[str, Field(min_length=1)]
FieldNames = FieldName | list[FieldName]
#: A duration: seconds, or a string like ``500ms``, ``90s``, ``10m``, ``1h``, ``1d``.
Duration = Annotated[float, Field(gt=0)] | Annotated[
    str, Field(pattern=r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$")]
#: Seconds of a window (count windows: records).
Seconds = Annotated[float, Field(ge=0, le=10**9)]
#: A condition in the expression language (operators.expr), e.g. ``"value > 10"``.
Condition = Annotated[str, Field(min_length=1, description="an expression, e.g. \"value > 10\"")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ the step language


class CdcStep(Strict):
    """The first step only: the input is a Debezium change stream (docs/cdc.md). The
    other steps work on each change's row; tombstones and deletes pass on as deletes."""

    op: Literal["cdc"]
    name: str | None = None
    key: FieldNames | None = Field(None, description="the primary-key fields (default: the sink's key, "
                                                      "else the message key's fields)")


class DeduplicateStep(Strict):
    """Drop records seen before (by ``fields``, default the whole record)."""

    op: Literal["deduplicate"]
    name: str | None = None
    fields: FieldNames | None = None
    horizon_seconds: Annotated[float, Field(gt=0)] | None = None
    horizon_count: Annotated[int, Field(gt=0)] | None = None
    time_field: FieldName | None = None


FieldType = Literal["string", "integer", "number", "boolean", "timestamp", "object", "array", "any"]


class SchemaField(Strict):
    type: FieldType = "any"
    required: bool = False
    default: Any = None


FieldSchemas = dict[str, FieldType | SchemaField]


class WrappedSchema(Strict):
    fields: FieldSchemas


class NormalizeStep(Strict):
    """Snake-case and trim keys, lowercase fields, ISO timestamps, a typed schema."""

    op: Literal["normalize"]
    name: str | None = None
    snake_case: bool = True
    trim: bool = True
    lowercase: FieldNames | None = None
    timestamps: FieldNames | None = None
    schema_: FieldSchemas | WrappedSchema | None = Field(None, alias="schema")


class EnrichStep(Strict):
    """Join reference rows (``PUT /api/v1/reference/{name}``) by a record field."""

    op: Literal["enrich"]
    name: str | None = None
    from_: FieldName | None = Field(None, alias="from")
    key: FieldName | None = None
    fields: FieldNames | None = None
    prefix: str = ""
    on_missing: Literal["keep", "drop", "fail"] = "keep"
    overwrite: bool = False
    processing_time: FieldName | None = None


class FilterStep(Strict):
    """Keep the records for which ``where`` is true."""

    op: Literal["filter"]
    name: str | None = None
    where: Condition


class MapStep(Strict):
    """Set fields from expressions, rename, drop or select fields."""

    op: Literal["map"]
    name: str | None = None
    set: dict[str, Any] | None = None
    rename: dict[str, str] | None = None
    drop: FieldNames | None = None
    select: FieldNames | None = None


class WindowShape(Strict):
    """A window: tumbling/hopping/sliding/session in seconds, count in records."""

    type: Literal["tumbling", "hopping", "sliding", "session", "count"]
    size: Seconds | None = None
    step: Seconds | None = None
    gap: Seconds | None = None
    max_difference: Seconds | None = None
    grace: Seconds | None = None


class Aggregation(BaseModel):
    """One aggregation: ``{name, type, field?, ...type parameters}``."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    type: str
    field: str | None = None


class WindowStep(Strict):
    """The terminal window step of a live pipeline: a ``windows:`` entry's fields
    except name, source, sink and repartition."""

    op: Literal["window"]
    key_by: FieldName
    time_field: FieldName | None = None
    time_unit: Literal["s", "ms"] = "s"
    window: WindowShape
    aggregations: Annotated[list[Aggregation], Field(min_length=1)]
    emit: Literal["final", "update"] = "final"
    late_topic: TopicName | None = None
    idle_close: Annotated[float, Field(ge=0)] = 0


class JoinPrefix(Strict):
    left: str = ""
    right: str = ""


class JoinInterval(Strict):
    """What every join step shares: the key, the interval, lateness and output shape."""

    on: FieldNames
    within: Duration | Literal[0] | None = None
    before: Duration | Literal[0] | None = None
    after: Duration | Literal[0] | None = None
    grace: Duration | Literal[0] | None = None
    type: Literal["inner", "left", "outer"] = "inner"
    time_field: FieldName = "ts"
    max_matches: Annotated[int, Field(gt=0)] = 1000
    prefix: JoinPrefix | None = None


class TableJoinFields(Strict):
    """A temporal stream-table join's own fields (docs/joins.md, "Stream-table joins"):
    given with a table (``with_table`` or ``table_records``), the step joins each record
    with its key's row instead of an interval of a second stream."""

    table_key: FieldNames | None = Field(None, description="the table row's key field(s), in the order of 'on'")
    as_of: Literal["latest", "event_time"] = "latest"
    history: Duration | None = Field(None, description="as_of event_time: how far back versions are kept (1d)")
    format: Literal["json", "debezium"] = "json"


class JoinStep(JoinInterval, TableJoinFields):
    """A join (docs/joins.md). Over HTTP the other side is given inline: a second
    stream's records in ``with_records``, or a table's records in ``table_records``."""

    op: Literal["join"]
    name: str | None = None
    with_records: list[dict[str, Any]] | None = None
    table_records: list[dict[str, Any]] | None = Field(
        None, description="a table's records: {key, value (null: a delete), timestamp}")


class PipelineJoinStep(JoinInterval, TableJoinFields):
    """The live join of a pipeline (docs/joins.md, "Live"), its first step: the
    pipeline's source is the left side (the stream), the topic ``with`` the right one,
    or ``with_table`` a table (a topic of rows, or a materialized table's name)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    op: Literal["join"]
    with_: TopicName | None = Field(None, alias="with", description="the right side's topic (logical name)")
    with_table: Name | None = Field(None, description="a table: a topic of rows or a materialized table")
    idle_close: Duration | Literal[0] | None = Field(
        default=None, description="a side without input this long is idle: stream time follows the other "
                                  "side; both idle: every interval closes (0 or absent: never)")
    repartition: bool = Field(
        default=False, description="the two topics are not keyed by the join key: re-key each through an "
                                   "internal topic first")


StepOp = Literal["cdc", "deduplicate", "normalize", "enrich", "filter", "map"]
#: A step: an op name alone, or an object with ``op`` and its parameters.
Step = StepOp | Annotated[
    CdcStep | DeduplicateStep | NormalizeStep | EnrichStep | FilterStep | MapStep | JoinStep,
    Field(discriminator="op")]
PipelineStep = StepOp | Annotated[
    CdcStep | DeduplicateStep | NormalizeStep | EnrichStep | FilterStep | MapStep | WindowStep | PipelineJoinStep,
    Field(discriminator="op")]


# ------------------------------------------------------------------ sections


SqlName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")]


class DatabaseTable(Strict):
    """A database table a sink writes to (app/db_sinks.py, docs/cdc.md)."""

    type: Literal["postgres", "sqlite", "table"]
    dsn: str | None = Field(None, description="postgres: the connection string")
    path: str | None = Field(None, description="sqlite: the database file")
    table: SqlName | None = Field(None, description="the table (type table: defaults to the sink's name)")
    key: SqlName | list[SqlName] = []
    mode: Literal["upsert", "append"] = "upsert"
    format: Literal["debezium", "json"] = "json"
    evolve: bool = False
    columns: dict[SqlName, str] = {}


class SinkEntry(DatabaseTable):
    """One database sink or materialized table: a topic replicated into a table."""

    name: Name
    source: TopicName


class PipelineEntry(Strict):
    """One live pipeline (app/pipelines.py)."""

    name: Name
    source: TopicName
    sink: TopicName | DatabaseTable
    steps: Annotated[list[PipelineStep], Field(max_length=64)] = []
    key_by: FieldName | None = None
    description: str | None = None


class WindowEntry(Strict):
    """One windowed aggregation (app/windows.py)."""

    name: Name
    source: FieldName
    key_by: FieldName
    time_field: FieldName | None = None
    time_unit: Literal["s", "ms"] = "s"
    window: WindowShape
    aggregations: Annotated[list[Aggregation], Field(min_length=1)]
    emit: Literal["final", "update"] = "final"
    sink: FieldName | None = None
    late_topic: FieldName | None = None
    idle_close: Annotated[float, Field(ge=0)] = 0
    repartition: bool = True


class SequenceStep(Strict):
    name: Name | None = None
    where: Condition
    times: Annotated[int, Field(ge=1)] = 1
    not_: bool = Field(False, alias="not")


class PatternDefinition(Strict):
    """A pattern definition (docs/patterns.md); which fields apply depends on ``type``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "big_purchase", "type": "threshold", "key_by": "user_id",
         "where": "action == 'purchase' and value > 1000"},
        {"name": "login_burst", "type": "frequency", "key_by": "user_id", "where": "action == 'login'",
         "count": 5, "within": "1m"}]})

    name: Name
    type: Literal["threshold", "frequency", "trend", "anomaly", "sequence", "absence"]
    key_by: FieldName
    source: str | None = None
    description: str | None = None
    where: Condition | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    within: Duration | None = None
    field: FieldName | None = None
    direction: Literal["rising", "falling"] | None = None
    min_slope: Annotated[float, Field(ge=0)] | None = None
    points: Annotated[int, Field(ge=2)] | None = None
    min_points: Annotated[int, Field(ge=2)] | None = None
    per: Literal["second", "point"] | None = None
    method: Literal["zscore", "ewma"] | None = None
    threshold: Annotated[float, Field(gt=0)] | None = None
    warmup: Annotated[int, Field(ge=2)] | None = None
    window: Annotated[int, Field(ge=2)] | None = None
    alpha: Annotated[float, Field(gt=0, le=1)] | None = None
    steps: Annotated[list[SequenceStep], Field(min_length=1)] | None = None
    trigger: Condition | None = None
    expect: Condition | None = None


class PatternsSection(Strict):
    """The pattern engine's settings and the config-declared definitions."""

    sources: FieldName | Annotated[list[FieldName], Field(min_length=1)] = ["events"]
    source_key: FieldName | None = None
    time_field: str = "ts"
    timer_interval: float = 0.5
    alerts_scan: int = 5000
    definitions: list[PatternDefinition] = []


class ConfigFile(Strict):
    """streametl's declarative config file (STREAMETL_PIPELINES_FILE), YAML or JSON."""

    model_config = ConfigDict(extra="forbid", title="streametl config file")
    pipelines: list[PipelineEntry] | None = None
    windows: list[WindowEntry] | None = None
    patterns: PatternsSection | list[PatternDefinition] | None = None
    sinks: list[SinkEntry] | None = None


def config_schema() -> dict[str, Any]:
    """The config file's JSON Schema (draft 2020-12)."""
    schema = ConfigFile.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write docs/pipelines.schema.json."""
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}")


if __name__ == "__main__":
    main()
