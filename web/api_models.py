"""Request and response models of the HTTP API (pydantic v2).

Request models validate the top-level shape of a body (``validate``) and give the
OpenAPI document its schemas (web/openapi.py). A failed field answers the same 422
(message and details) the API answered before it had models: each request model lists
its checks in the order they are applied, each check naming the message of its field.
Parts with intricate rules (the step language, window specs, aggregations, pattern
definitions, reference rows) are described here for the document, and validated by the
app's own validators, which name the exact field.

Response models only document: the views build plain dicts serialized by orjson (the
schemathesis test holds the answers to these schemas).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError, WithJsonSchema

from app import settings
from app.models.config import PatternDefinition, Step
from web.common import ApiError, invalid

#: Validation runs only the listed fields' types, never the items of a message list:
#: produce's per-message checks stay a plain loop (the hot path).
JsonObject = dict[str, Any]
AnyObjectList = Annotated[list[Any], WithJsonSchema({"type": "array", "items": {"type": "object"}})]

#: A check: a field name (its validation failed → that field's ApiError), or a function
#: of the raw body answering an ApiError or None.
Check = tuple[str, Callable[[dict[str, Any]], ApiError]] | Callable[[dict[str, Any]], ApiError | None]


class RequestModel(BaseModel):
    """A JSON body: unknown fields are refused (``unknown fields: [...]``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    #: The checks in the order the API applies them (the first failure answers).
    checks: ClassVar[list[Check]] = []

    @classmethod
    def unknown_fields(cls, body: dict[str, Any]) -> ApiError | None:
        unknown = set(body) - {f.alias or name for name, f in cls.model_fields.items()}
        if unknown:
            return invalid(f"unknown fields: {sorted(unknown)}", {"fields": sorted(unknown)})
        return None

    @classmethod
    def parse_body(cls, body: dict[str, Any]):
        """The model of ``body``, or the ApiError of its first failing check."""
        try:
            model = cls.model_validate(body)
        except ValidationError as exc:
            failed = {str(e["loc"][0]) for e in exc.errors() if e["loc"] and e["type"] != "extra_forbidden"}
            for check in cls.checks:
                if isinstance(check, tuple):
                    if check[0] in failed:
                        raise check[1](body) from None
                elif (err := check(body)) is not None:
                    raise err from None
            raise invalid(str(exc.errors()[0]["msg"])) from None  # a check the list misses
        for check in cls.checks:
            if not isinstance(check, tuple) and (err := check(body)) is not None:
                raise err
        return model


# ------------------------------------------------------------------ produce

TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"


def _too_many_messages(body: dict[str, Any]) -> ApiError | None:
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.produce_max_messages:
        return ApiError(
            413, "too_many_messages",
            f"{len(messages)} messages; the limit is {settings.produce_max_messages} per request",
            {"limit_messages": settings.produce_max_messages},
        )
    return None


def _topic_is_dots(body: dict[str, Any]) -> ApiError | None:
    return _bad_topic(body) if body.get("topic") in {".", ".."} else None


def _bad_topic(body: dict[str, Any]) -> ApiError:
    return invalid(
        "topic must be a Kafka topic name: 1-249 characters of letters, digits, '.', '_', '-'",
        {"field": "topic", "value": body.get("topic")},
    )


class ProduceBody(RequestModel):
    """``POST /api/v1/produce``: JSON messages for one topic."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"topic": "events", "key_field": "user_id",
         "messages": [{"user_id": "u1", "action": "click", "value": 3, "ts": 1700000000}]}]})

    topic: Annotated[str, Field(pattern=TOPIC_PATTERN, json_schema_extra={"not": {"enum": [".", ".."]}})]
    #: JSON objects; the key comes from ``key_field`` when given.
    messages: Annotated[AnyObjectList, Field(min_length=1)]
    key_field: Annotated[str, Field(min_length=1)] | None = None
    headers: dict[str, str] | None = None

    checks: ClassVar[list[Check]] = [
        lambda b: ProduceBody.unknown_fields(b),
        ("topic", _bad_topic),
        _topic_is_dots,
        ("messages", lambda b: invalid("messages must be a non-empty list of JSON objects", {"field": "messages"})),
        _too_many_messages,
        ("key_field", lambda b: invalid("key_field must be a non-empty string", {"field": "key_field"})),
        ("headers", lambda b: invalid("headers must be an object of string to string", {"field": "headers"})),
    ]


class Delivered(BaseModel):
    partition: int
    offset: int


class ProduceResult(BaseModel):
    topic: str
    count: int
    results: list[Delivered]


# ------------------------------------------------------------------ process

PROCESS_MAX_RECORDS = 10_000


def _too_many_records(body: dict[str, Any]) -> ApiError | None:
    records = body.get("records")
    if isinstance(records, list) and len(records) > PROCESS_MAX_RECORDS:
        return ApiError(413, "too_many_records", f"at most {PROCESS_MAX_RECORDS} records per request",
                        {"limit_records": PROCESS_MAX_RECORDS})
    return None


def _keys_match_records(body: dict[str, Any]) -> ApiError | None:
    keys, records = body.get("keys"), body.get("records")
    if isinstance(keys, list) and isinstance(records, list) and len(keys) != len(records):
        return invalid("keys must have one entry per record", {"field": "keys"})
    return None


def _no_transformations(body: dict[str, Any]) -> ApiError | None:
    if "transformations" not in body:
        return invalid("transformations is required (a list of steps)", {"field": "transformations"})
    return None


class ProcessBody(RequestModel):
    """``POST /api/v1/process``: records and the steps to run over them."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"records": [{"User_ID": "123", "Action": " Click ", "value": "1"}],
         "transformations": ["deduplicate", "normalize", {"op": "filter", "where": "value != '0'"}]}]})

    #: Any JSON values; a record that is not an object is answered in ``failures``.
    #: With a ``cdc`` first step, Debezium change events (null: a tombstone).
    records: list[Any]
    #: The step language of live pipelines (without the terminal window step); its
    #: rules are checked by operators.steps.parse_steps.
    transformations: Annotated[list[Step], Field(max_length=64), SkipValidation]
    #: The message key of each record, in order (JSON values; null: none), as a Kafka
    #: record has: a ``cdc`` step reads a tombstone's row, and by default the key fields,
    #: from it.
    keys: list[Any] | None = None

    checks: ClassVar[list[Check]] = [
        lambda b: ProcessBody.unknown_fields(b),
        ("records", lambda b: invalid("records must be a list of JSON objects", {"field": "records"})),
        ("keys", lambda b: invalid("keys must be a list of JSON values, one per record", {"field": "keys"})),
        _keys_match_records,
        _too_many_records,
        _no_transformations,
    ]


class StepCount(BaseModel):
    step: int
    op: str
    model_config = ConfigDict(populate_by_name=True)
    in_: int = Field(alias="in")
    out: int
    dropped: dict[str, int]
    failed: int


class ProcessResult(BaseModel):
    records: list[Any]
    count: int
    input_count: int
    steps: list[StepCount]
    dropped: list[JsonObject]
    failures: list[JsonObject]


# ------------------------------------------------------------------ aggregate

#: Window and aggregation fields of the API body: app.windows.parse_api_spec checks them.
_Duration = Annotated[Any, WithJsonSchema({"type": "number", "minimum": 0, "maximum": 10**9})]


class AggregateBody(RequestModel):
    """``POST /api/v1/aggregate``: one record into the window named ``window_id``.

    ``window_size`` alone means a count window of that many records. The window and
    aggregation fields are checked by app.windows.parse_api_spec."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"window_id": "sensor-1", "record": {"temp": 21.5}, "window_size": 3,
         "aggregation": "avg", "value_key": "temp"},
        {"window_id": "clicks-u1", "record": {"ts": 1700000000, "value": 2}, "window_type": "tumbling",
         "window_size": 60, "time_key": "ts", "aggregations": [{"name": "total", "type": "sum", "field": "value"}]}]})

    window_id: Annotated[str, Field(min_length=1, max_length=256)]
    record: JsonObject
    window_type: Annotated[Any, WithJsonSchema(
        {"enum": ["tumbling", "hopping", "sliding", "session", "count"]})] = None
    window_size: _Duration = None
    step: _Duration = None
    gap: _Duration = None
    max_difference: _Duration = None
    grace: _Duration = None
    aggregation: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    aggregations: Annotated[Any, WithJsonSchema({"type": "array", "items": {"type": "object"}})] = None
    value_key: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    time_key: Annotated[Any, WithJsonSchema({"type": "string"})] = None

    checks: ClassVar[list[Check]] = [
        ("window_id", lambda b: invalid("window_id must be a non-empty string (max 256 characters)",
                                         {"field": "window_id"})),
        ("record", lambda b: invalid("record must be a JSON object", {"field": "record"})),
        # parse_api_spec's own message for unknown fields (no details)
        lambda b: (invalid(f"unknown fields: {sorted(u)}")
                   if (u := set(b) - set(AggregateBody.model_fields)) else None),
    ]


class AggregateState(BaseModel):
    """The owner's answer: the window_id's open windows and their aggregates."""

    model_config = ConfigDict(extra="allow")
    window_id: str
    spec: JsonObject | None = None
    stream_time: int | float | None = None
    late_records: int | None = None
    windows: list[JsonObject] = []
    closed: list[JsonObject] = []


# ------------------------------------------------------------------ patterns, alerts


class PatternInfo(BaseModel):
    name: str
    type: str
    key_by: str
    source: str
    origin: Literal["config", "runtime"]
    matches: int
    definition: JsonObject


class PatternList(BaseModel):
    patterns: list[PatternInfo]
    engine: JsonObject


class Deleted(BaseModel):
    deleted: str


class AlertsQuery(BaseModel):
    """Query of ``GET /api/v1/alerts`` (parsed by web.patterns.parse_alert_query)."""

    pattern: str | None = None
    key: str | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class AlertList(BaseModel):
    alerts: list[JsonObject]
    count: int


# ------------------------------------------------------------------ reference


class ReferenceBody(BaseModel):
    """``PUT /api/v1/reference/{name}``: ``{"key", "row"}``, ``{"rows": {key: row or
    null}}`` or ``{"rows": [...], "key_field"}`` (null deletes). Checked by
    web.reference.parse_rows (which names the row at fault)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"rows": {"u1": {"country": "FR", "tier": "gold"}, "u2": None}},
        {"key_field": "user_id", "rows": [{"user_id": "u3", "country": "DE"}]}]})
    key: str | int | None = None
    row: JsonObject | None = None
    rows: dict[str, JsonObject | None] | list[JsonObject] | None = None
    key_field: str | None = None


class ReferenceWritten(BaseModel):
    name: str
    count: int
    visible_here: bool


class ReferenceKeys(BaseModel):
    name: str
    count: int
    keys: list[str]


class ReferenceRowOut(BaseModel):
    name: str
    key: str
    row: JsonObject


# ------------------------------------------------------------------ the rest


class Checks(BaseModel):
    joined_group: bool
    broker: bool


class Health(BaseModel):
    status: Literal["ok", "starting"]
    checks: Checks
    app_id: str
    assigned_partitions: int
    web_port: int


class IndexEntry(BaseModel):
    path: str
    methods: list[str]
    summary: str


class Index(BaseModel):
    service: str
    endpoints: list[IndexEntry]


class PipelineInfo(BaseModel):
    name: str
    source: str
    sink: str
    key_by: str | None
    steps: list[Any]
    counters: JsonObject


class PipelineList(BaseModel):
    worker: JsonObject
    pipelines: list[PipelineInfo]


class WindowList(BaseModel):
    windows: list[JsonObject]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class Error(BaseModel):
    """Every error answer: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


__all__ = [
    "AggregateBody", "AggregateState", "AlertList", "AlertsQuery", "Deleted", "Error", "Health",
    "Index", "PatternDefinition", "PatternInfo", "PatternList", "PipelineList", "ProcessBody",
    "ProcessResult", "ProduceBody", "ProduceResult", "ReferenceBody", "ReferenceKeys",
    "ReferenceRowOut", "ReferenceWritten", "RequestModel", "Step", "WindowList",
]
