"""The transformation operators and the step language, without a broker."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from operators.expr import compile_expr
from operators.steps import (
    MemoryContext,
    Outcome,
    Step,
    StepSpecError,
    parse_steps,
    pass_record,
    run_batch,
    run_record,
    runnable,
)
from operators.transform import (
    EnrichSpec,
    FieldSchema,
    MapSpec,
    NormalizeSpec,
    RecordFailure,
    Seen,
    canonical_timestamp,
    dedupe_key,
    enrich,
    is_duplicate,
    keep,
    map_record,
    normalize,
    snake_case,
)


@pytest.mark.parametrize("name,expected", [
    ("User_ID", "user_id"), ("userId", "user_id"), ("HTTPStatus", "http_status"),
    ("first name", "first_name"), ("already_snake", "already_snake"), ("X", "x"), ("a-b.c", "a_b_c"),
])
def test_snake_case(name, expected):
    assert snake_case(name) == expected


@pytest.mark.parametrize("value,expected", [
    ("2026-11-26T21:32:38.123Z", "2026-11-26T21:32:38.123Z"),
    ("2026-11-26T22:32:38+01:00", "2026-11-26T21:32:38.000Z"),
    ("2026-11-26 21:32:38", "2026-11-26T21:32:38.000Z"),
    (1795815158, "2026-11-27T21:32:38.000Z"),
    (1795815158.5, "2026-11-27T21:32:38.500Z"),
    (1795815158123, "2026-11-27T21:32:38.123Z"),
    ("1795815158123", "2026-11-27T21:32:38.123Z"),
])
def test_timestamps_become_one_canonical_form(value, expected):
    assert canonical_timestamp(value) == expected


def test_epoch_numbers_format_as_datetime_does():
    # _iso builds the text from a cached second and a millisecond table; datetime is
    # the reference (its rounding: microseconds half-even, then cut to milliseconds).
    rng = random.Random(7)
    for _ in range(20_000):
        value = rng.choice([rng.uniform(-1e9, 4e9), round(rng.uniform(0, 4e9), 3),
                            rng.randint(0, 4_000_000_000), rng.randint(10**11, 4 * 10**12)])
        seconds = value / 1000.0 if value >= 1e11 else float(value)
        expected = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
        assert canonical_timestamp(value) == expected.replace("+00:00", "Z"), value


def test_epoch_seconds_of_a_number_is_that_of_its_text():
    """epoch_seconds computes JSON numbers directly (the live join's hot path); the
    value must be the one the ISO text round trip gives (seconds cut to the
    millisecond, the text's rounding), and out-of-range numbers still fail."""
    from operators.transform import epoch_seconds

    def outcome(convert, value):
        try:
            return convert(value)
        except RecordFailure:
            return "refused"

    def through_text(value):
        iso = canonical_timestamp(value)
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    rng = random.Random(11)
    edges = [0, 1, -1, 0.0005, 0.9995, 0.9999995, -0.0005, -0.9999995, 10**11, 10**11 - 1, 1.5e12,
             -1.5e12, 1700000000.1235, 99999999999.9995]
    for _ in range(50_000):
        edges.append(rng.choice([rng.uniform(-3e9, 4e9), round(rng.uniform(0, 2e9), rng.randint(0, 7)),
                                 rng.randint(-10**12, 4 * 10**12), rng.uniform(1e11, 4e12),
                                 rng.randint(0, 2 * 10**9) + rng.randint(0, 999_999) / 1e6]))
    for value in edges:
        assert outcome(epoch_seconds, value) == outcome(through_text, value), value
    for value in (1e20, -1e20, 2.6e14, True, float("inf")):
        with pytest.raises(RecordFailure):
            epoch_seconds(value)


@pytest.mark.parametrize("value", ["yesterday", True, None, [1], float("nan"), 10**30])
def test_bad_timestamps_fail_the_record(value):
    with pytest.raises(RecordFailure):
        canonical_timestamp(value)


def test_normalize_applies_names_trim_enums_timestamps_and_schema():
    spec = NormalizeSpec(lowercase=("action",), timestamps=("ts",), schema={
        "value": FieldSchema("number"), "count": FieldSchema("integer"), "ok": FieldSchema("boolean"),
        "region": FieldSchema("string", default="eu", has_default=True),
        "user_id": FieldSchema("string", required=True),
    })
    out = normalize({"User_ID": 123, "Action": " CLICK ", "value": " 1.5 ", "Count": "3", "ok": "yes",
                     "ts": 1795815158, "note": "  hi "}, spec)
    assert out == {"user_id": "123", "action": "click", "value": 1.5, "count": 3, "ok": True,
                   "ts": "2026-11-27T21:32:38.000Z", "note": "hi", "region": "eu"}


def test_numeric_strings_stay_strings_without_a_schema():
    assert normalize({"value": "1"}, NormalizeSpec()) == {"value": "1"}


@pytest.mark.parametrize("record,spec", [
    ({"a": 1}, NormalizeSpec(schema={"b": FieldSchema("string", required=True)})),
    ({"v": "x"}, NormalizeSpec(schema={"v": FieldSchema("number")})),
    ({"v": 1.5}, NormalizeSpec(schema={"v": FieldSchema("integer")})),
    ({"v": True}, NormalizeSpec(schema={"v": FieldSchema("number")})),
    ({"UserId": 1, "user_id": 2}, NormalizeSpec()),
])
def test_normalize_failures_say_why(record, spec):
    with pytest.raises(RecordFailure):
        normalize(record, spec)


def test_dedupe_key_by_event_id_fields_or_content():
    assert dedupe_key({"event_id": 5, "x": 1}, None) == dedupe_key({"event_id": 5, "x": 2}, None)
    assert dedupe_key({"a": 1, "b": 2}, None) == dedupe_key({"b": 2, "a": 1}, None)
    assert dedupe_key({"a": 1, "b": 2}, None) != dedupe_key({"a": 1, "b": 3}, None)
    assert dedupe_key({"a": 1, "b": 2}, ("a",)) == dedupe_key({"a": 1, "b": 3}, ("a",))
    with pytest.raises(RecordFailure):
        dedupe_key({"b": 1}, ("a",))


def test_duplicate_horizon_by_time_and_count():
    seen = Seen(at=100.0, seq=10)
    assert is_duplicate(seen, 150.0, 11, 60, None)
    assert not is_duplicate(seen, 161.0, 11, 60, None)
    assert is_duplicate(seen, 1e9, 15, None, 5)
    assert not is_duplicate(seen, 1e9, 16, None, 5)
    assert not is_duplicate(None, 0, 0, None, None)


def test_enrich_joins_reference_rows_and_stamps_processing_time():
    rows = {("users", "7"): {"country": "NL", "tier": "gold", "user_id": "other"}}
    lookup = lambda source, key: rows.get((source, key))  # noqa: E731
    spec = EnrichSpec("users", "user_id", None, "", "keep", False, "processed_at")
    out = enrich({"user_id": 7}, spec, lookup, now=0.0)
    assert out == {"user_id": 7, "country": "NL", "tier": "gold", "processed_at": "1970-01-01T00:00:00.000Z"}
    only = EnrichSpec("users", "user_id", ("country",), "u_", "keep")
    assert enrich({"user_id": "7"}, only, lookup, 0) == {"user_id": "7", "u_country": "NL"}
    assert enrich({"user_id": "8"}, EnrichSpec("users", "user_id", on_missing="drop"), lookup, 0) is None
    with pytest.raises(RecordFailure):
        enrich({"user_id": "8"}, EnrichSpec("users", "user_id", on_missing="fail"), lookup, 0)


def test_filter_and_map():
    assert keep({"v": 11}, compile_expr("v > 10"))
    assert not keep({"v": 1}, compile_expr("v > 10"))
    with pytest.raises(RecordFailure):
        keep({"v": "x"}, compile_expr("v / 2 > 1"))
    spec = MapSpec(set=(("double", compile_expr("v * 2")),), rename=(("v", "value"),), drop=("tmp",))
    assert map_record({"v": 2, "tmp": 1, "k": "a"}, spec) == {"value": 2, "double": 4, "k": "a"}
    assert map_record({"a": 1, "b": 2}, MapSpec(select=("b", "c"))) == {"b": 2}


def test_a_pipeline_batch_accounts_for_every_record():
    steps = parse_steps([
        {"op": "deduplicate", "fields": ["id"]},
        {"op": "normalize", "schema": {"n": "integer"}},
        {"op": "filter", "where": "n >= 2"},
        {"op": "map", "select": ["id", "n"]},
    ])
    records = [{"id": 1, "n": "1"}, {"id": 2, "n": "2"}, {"id": 2, "n": "2"}, {"id": 3, "n": "x"}, 7, {"n": 3}]
    result = run_batch(steps, records, MemoryContext())
    assert result.records == [{"id": 2, "n": 2}]
    assert [(d["index"], d["reason"]) for d in result.dropped] == [(0, "filtered"), (2, "duplicate")]
    assert [f["index"] for f in result.failures] == [3, 4, 5]
    counts = [c.as_dict() for c in result.counts]
    assert counts[0] == {"step": 0, "op": "deduplicate", "in": 5, "out": 3, "dropped": {"duplicate": 1}, "failed": 1}
    assert counts[1]["failed"] == 1 and counts[2]["dropped"] == {"filtered": 1}


def test_pass_record_gives_the_record_itself_or_where_it_stopped():
    steps = parse_steps([{"op": "deduplicate", "fields": ["id"]}, {"op": "normalize", "schema": {"n": "integer"}},
                         {"op": "filter", "where": "n >= 2"}])
    ctx = MemoryContext()
    out = pass_record(steps, {"id": 1, "n": "2"}, ctx)
    assert out.__class__ is dict and out == {"id": 1, "n": 2}
    dropped = pass_record(steps, {"id": 1, "n": "2"}, ctx)
    assert dropped.__class__ is Outcome and (dropped.step.op, dropped.dropped) == ("deduplicate", "duplicate")
    failed = pass_record(steps, {"id": 2, "n": "x"}, ctx)
    assert failed.__class__ is Outcome and failed.step.op == "normalize" and "not a integer" in failed.failed
    assert pass_record(steps, {"id": 3, "n": 1}, ctx).dropped == "filtered"
    # run_record wraps the same in an Outcome either way.
    assert run_record(steps, {"id": 4, "n": 5}, ctx) == Outcome({"id": 4, "n": 5})


def test_records_stop_before_a_terminal_step():
    terminal = Step(1, "window", None, lambda record, ctx: None, terminal=True)
    steps = [parse_steps(["normalize"])[0], terminal]
    assert runnable(steps) == steps[:1]
    assert run_record(steps, {"A": 1}, MemoryContext()).record == {"a": 1}
    result = run_batch(steps, [{"A": 1}], MemoryContext())
    assert result.records == [{"a": 1}] and [c.op for c in result.counts] == ["normalize"]


def test_count_horizon_readmits_after_n_records():
    steps = parse_steps([{"op": "deduplicate", "horizon_count": 2}])
    result = run_batch(steps, [{"event_id": "a"}, {"event_id": "b"}, {"event_id": "a"}, {"event_id": "c"},
                               {"event_id": "d"}, {"event_id": "a"}], MemoryContext())
    assert [r["event_id"] for r in result.records] == ["a", "b", "c", "d", "a"]


def test_time_horizon_uses_the_event_time_field_when_given():
    steps = parse_steps([{"op": "deduplicate", "horizon_seconds": 60, "time_field": "ts"}])
    recs = [{"event_id": "a", "ts": 1000}, {"event_id": "a", "ts": 1030}, {"event_id": "a", "ts": 1100}]
    assert [r["ts"] for r in run_batch(steps, recs, MemoryContext()).records] == [1000, 1100]


@pytest.mark.parametrize("specs,index,op,param", [
    ("normalize", 0, None, None),
    ([42], 0, None, None),
    (["normalize", "shuffle"], 1, "shuffle", "op"),
    ([{"op": "filter", "where": "a +"}], 0, "filter", "where"),
    ([{"op": "map"}], 0, "map", None),
    ([{"op": "map", "set": {"x": "open('f')"}}], 0, "map", "set.x"),
    ([{"op": "deduplicate", "fields": "a", "horizon_count": 1.5}], 0, "deduplicate", "horizon_count"),
    ([{"op": "normalize", "trim": "yes"}], 0, "normalize", "trim"),
    ([{"op": "enrich", "key": "user_id"}], 0, "enrich", "from"),
    ([{"op": "enrich", "from": "u", "key": "k", "on_missing": "explode"}], 0, "enrich", "on_missing"),
])
def test_bad_step_specs_name_step_op_and_parameter(specs, index, op, param):
    with pytest.raises(StepSpecError) as info:
        parse_steps(specs)
    assert (info.value.index, info.value.op, info.value.param) == (index, op, param)
