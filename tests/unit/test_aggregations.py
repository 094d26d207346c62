"""Aggregations: each built-in equals a direct computation, merges equal a single
fold, states survive a JSON round trip, and bad specs/values are refused clearly."""

from __future__ import annotations

import random

import orjson
import pytest

from operators.aggregations import (
    SKETCH_ACCURACY,
    AggregateSet,
    AggregationError,
    AggSpec,
    make_aggregator,
    parse_agg_specs,
    register_aggregator,
    sketch_add,
    sketch_init,
    sketch_merge,
    sketch_quantile,
)


def fold(kind, values, params=None):
    agg = make_aggregator(kind, params)
    s = agg.init()
    for ts, v in values:
        s = agg.add(s, v, ts)
        s = orjson.loads(orjson.dumps(s))  # state must survive the changelog
    return agg, s


VALUES = [(1000 + i, v) for i, v in enumerate([5, 3, 9, 3, -2, 7.5])]


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("count", 6),
        ("sum", 25.5),
        ("mean", 25.5 / 6),
        ("min", -2),
        ("max", 9),
        ("first", 5),
        ("last", 7.5),
        ("distinct_count", 5),
    ],
)
def test_builtins_equal_direct_computation(kind, expected):
    agg, s = fold(kind, VALUES)
    assert agg.result(s) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["count", "sum", "mean", "min", "max", "first", "last", "distinct_count"])
def test_merge_of_two_halves_equals_one_fold(kind):
    rng = random.Random(kind)
    values = [(rng.randrange(10_000), rng.randint(-50, 50)) for _ in range(200)]
    agg, whole = fold(kind, values)
    split = rng.randrange(len(values))
    _, a = fold(kind, values[:split])
    _, b = fold(kind, values[split:])
    assert agg.result(agg.merge(a, b)) == pytest.approx(agg.result(whole))


def test_first_and_last_follow_event_time_not_arrival():
    agg, s = fold("first", [(50, "b"), (10, "a"), (90, "c")])
    assert agg.result(s) == "a"
    agg, s = fold("last", [(50, "b"), (90, "c"), (10, "a")])
    assert agg.result(s) == "c"


def test_percentile_sketch_is_within_its_relative_accuracy_and_mergeable():
    rng = random.Random(3)
    values = [rng.lognormvariate(3, 1) for _ in range(5000)] + [0.0] * 10 + [-rng.random() for _ in range(50)]
    a, b = sketch_init(), sketch_init()
    for i, v in enumerate(values):
        sketch_add(a if i % 2 else b, v)
    merged = orjson.loads(orjson.dumps(sketch_merge(a, b)))
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99):
        true = ordered[int(q * (len(ordered) - 1))]
        got = sketch_quantile(merged, q)
        assert abs(got - true) <= SKETCH_ACCURACY * abs(true) + 1e-9, (q, got, true)
    assert sketch_quantile(sketch_init(), 0.5) is None


def test_percentiles_aggregation_result_names_each_percentile():
    agg, s = fold("percentiles", [(i, float(i)) for i in range(1, 101)], {"percentiles": [50, 99]})
    out = agg.result(s)
    assert set(out) == {"p50", "p99"}
    assert out["p50"] == pytest.approx(50, rel=0.03)


def test_custom_aggregator_registered_in_python():
    register_aggregator(
        "test_product", init=lambda: 1, add=lambda s, v: s * v, merge=lambda a, b: a * b,
        result=lambda s: s, numeric=True,
    )
    aggs = AggregateSet([AggSpec("prod", "test_product", "v")])
    s = aggs.init()
    for v in (2, 3, 4):
        aggs.add(s, aggs.extract({"v": v}), 0)
    assert aggs.result(s) == {"prod": 24}
    with pytest.raises(AggregationError):
        register_aggregator("sum", init=int, add=max, merge=max, result=int)


def test_extract_refuses_non_numeric_for_sum_and_missing_fields():
    aggs = AggregateSet([AggSpec("n", "count"), AggSpec("total", "sum", "value")])
    assert aggs.extract({"value": 2}) == {"n": None, "total": 2}
    for bad in ({"value": "2"}, {"value": True}, {"value": None}):
        with pytest.raises(AggregationError) as exc:
            aggs.extract(bad)
        assert exc.value.reason == "not_numeric"
    with pytest.raises(AggregationError) as exc:
        aggs.extract({"other": 1})
    assert exc.value.reason == "missing_field"
    nested = AggregateSet([AggSpec("m", "max", "a.b")])
    assert nested.extract({"a": {"b": 7}}) == {"m": 7}


def test_spec_parsing_names_the_problem():
    specs = parse_agg_specs([{"type": "count"}, {"type": "sum", "field": "value"},
                             {"name": "p", "type": "percentiles", "field": "value", "percentiles": [50]}])
    assert [s.name for s in specs] == ["count", "sum_value", "p"]
    with pytest.raises(AggregationError, match="unknown aggregation"):
        parse_agg_specs([{"type": "median"}])
    with pytest.raises(AggregationError, match="needs a field"):
        AggregateSet([AggSpec("s", "sum")])
    with pytest.raises(AggregationError, match="unique"):
        AggregateSet([AggSpec("s", "count"), AggSpec("s", "count")])
    with pytest.raises(AggregationError):
        parse_agg_specs([])


def test_extract_fast_path_gives_the_same_values_and_errors():
    aggs = AggregateSet([AggSpec("n", "count"), AggSpec("total", "sum", "v"), AggSpec("who", "last", "u")])
    assert aggs.extract({"v": 2.5, "u": [1]}) == {"n": None, "total": 2.5, "who": [1]}
    for bad, reason in (({"v": True, "u": 1}, "not_numeric"), ({"v": float("nan"), "u": 1}, "not_numeric"),
                        ({"v": float("inf"), "u": 1}, "not_numeric"), ({"v": "1", "u": 1}, "not_numeric"),
                        ({"u": 1}, "missing_field"), ({"v": 1}, "missing_field")):
        with pytest.raises(AggregationError) as exc:
            aggs.extract(bad)
        assert exc.value.reason == reason
    dotted = AggregateSet([AggSpec("total", "sum", "a.v")])
    assert dotted.extract({"a": {"v": 3}}) == {"total": 3}


def test_inline_builtins_equal_the_generic_functions():
    """count/sum/min/max sets use a template init, one fused add and the state as the
    result (AggregateSet's shortcuts); they must give what the four functions give."""
    import random

    from operators.aggregations import AggregateSet, AggSpec, make_aggregator

    specs = [AggSpec("n", "count"), AggSpec("s", "sum", "v"), AggSpec("lo", "min", "v"),
             AggSpec("hi", "max", "v"), AggSpec("it's \"odd\"", "sum", "w")]
    fast = AggregateSet(specs)
    assert "add" in vars(fast) and "init" in vars(fast) and "result" in vars(fast)
    aggs = [make_aggregator(s.kind) for s in specs]
    rng = random.Random(3)
    state, ref = fast.init(), {s.name: a.init() for s, a in zip(specs, aggs, strict=True)}
    assert state == ref and state is not fast.init()
    for i in range(200):
        values = fast.extract({"v": rng.choice([rng.randint(-50, 50), rng.random() * 100 - 50]), "w": i})
        fast.add(state, values, i)
        for s, a in zip(specs, aggs, strict=True):
            ref[s.name] = a.add(ref[s.name], values[s.name], i)
        assert state == ref
    assert fast.result(state) == {s.name: a.result(ref[s.name]) for s, a in zip(specs, aggs, strict=True)}
    assert fast.result(state) is not state
    # A set with any other aggregation keeps the general path.
    mixed = AggregateSet([AggSpec("n", "count"), AggSpec("m", "mean", "v")])
    assert "add" not in vars(mixed) and "result" not in vars(mixed)


@pytest.mark.parametrize("record", [
    {"v": 2, "w": 1.5, "u": "x"}, {"v": -0.0, "w": 7, "u": None}, {"v": True, "w": 1, "u": 1},
    {"v": 1, "w": float("nan"), "u": 1}, {"v": float("-inf"), "w": 1, "u": 1}, {"v": "1", "w": 1, "u": 1},
    {"w": 1, "u": 1}, {"v": 1, "w": 1}, {"v": 1, "w": 1, "u": {"nested": [1]}}, {"v": 10**30, "w": 0, "u": 0},
    [("v", 1)], "text", None,
])
def test_generated_extract_equals_the_checked_path(record):
    # AggregateSet.extract for plain fields is generated code (_fused_extractor); the
    # checked method is the reference: same values, or the same error and reason.
    aggs = AggregateSet([AggSpec("n", "count"), AggSpec("total", "sum", "v"), AggSpec("lo", "min", "w"),
                         AggSpec("who", "last", "u"), AggSpec("total2", "max", "v")])

    def outcome(fn):
        try:
            return fn(record)
        except (AggregationError, TypeError, AttributeError) as exc:
            return type(exc), getattr(exc, "reason", None), str(exc)

    assert "extract" in vars(aggs)  # the generated function is in use
    assert outcome(aggs.extract) == outcome(aggs._checked_extract)
