"""Pattern matchers on small hand-checkable inputs (no broker), and definition parsing."""

from __future__ import annotations

import json

import pytest

from operators.patterns import (
    Absence,
    Anomaly,
    Frequency,
    SeqStep,
    Sequence,
    Threshold,
    Trend,
    least_squares_slope,
)


def field_is(name, value):
    return lambda e: e.get(name) == value


def feed(matcher, events, state=None):
    """Run events (dicts with ts and id) through a matcher; return (state, matches)."""
    found = []
    for e in events:
        state, matches = matcher.step(state, e, e["ts"], e.get("id"))
        json.dumps(state)  # state must stay JSON-serializable
        found.extend(matches)
    return state, found


def ev(ts, i=None, **fields):
    return {"ts": ts, "id": i if i is not None else f"e{ts}", **fields}


# threshold -----------------------------------------------------------------------------

def test_threshold_matches_each_event_over_the_limit():
    m = Threshold(lambda e: e["amount"] > 100)
    _, found = feed(m, [ev(1, amount=50), ev(2, amount=150), ev(3, amount=101), ev(4, amount=100)])
    assert [f.evidence[0]["event_id"] for f in found] == ["e2", "e3"]


# frequency -----------------------------------------------------------------------------

def test_frequency_five_failures_in_sixty_seconds():
    m = Frequency(field_is("status", "failed"), count=5, within=60)
    events = [ev(t, status="failed") for t in (0, 10, 20, 30)] + [ev(35, status="ok"), ev(59, status="failed")]
    _, found = feed(m, events)
    assert len(found) == 1
    assert [x["event_id"] for x in found[0].evidence] == ["e0", "e10", "e20", "e30", "e59"]


def test_frequency_spread_over_more_than_the_window_does_not_match():
    m = Frequency(field_is("status", "failed"), count=5, within=60)
    state, found = feed(m, [ev(t, status="failed") for t in (0, 20, 40, 61, 70)])
    assert found == []
    assert len(state["h"]) == 4  # e0 fell out of the window


def test_frequency_resets_after_a_match_so_a_burst_alerts_once():
    m = Frequency(lambda e: True, count=3, within=10)
    _, found = feed(m, [ev(t) for t in range(5)])
    assert len(found) == 1  # events 0,1,2 match; 3,4 are only two new ones


# trend ---------------------------------------------------------------------------------

def test_least_squares_slope_hand_checked():
    assert least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert least_squares_slope([(0, 1), (1, 2), (2, 2), (3, 5)]) == pytest.approx(1.2)
    assert least_squares_slope([(1, 1), (1, 2)]) is None


def test_trend_rising_over_last_n_points():
    m = Trend(field="temp", direction="rising", min_slope=1.0, points=4)
    # slope of 10,11,11,14 at t=0..3 is 1.2 >= 1.0 on the 4th point, not before
    state, found = feed(m, [ev(0, temp=10), ev(1, temp=11), ev(2, temp=11)])
    assert found == []
    state, found = feed(m, [ev(3, temp=14)], state)
    assert len(found) == 1
    assert found[0].detail["slope"] == pytest.approx(1.2)
    assert [x["value"] for x in found[0].evidence] == [10, 11, 11, 14]


def test_trend_below_slope_or_wrong_direction_does_not_match():
    rising = Trend(field="v", direction="rising", min_slope=2.0, points=3)
    falling = Trend(field="v", direction="falling", min_slope=1.0, points=3)
    series = [ev(0, v=1), ev(1, v=2), ev(2, v=3)]  # slope +1
    assert feed(rising, series)[1] == []
    assert feed(falling, series)[1] == []
    down = [ev(0, v=9), ev(1, v=7), ev(2, v=5)]  # slope -2
    assert len(feed(falling, down)[1]) == 1


def test_trend_over_a_time_window_per_second():
    m = Trend(field="v", direction="falling", min_slope=0.5, within=10, min_points=3)
    # t=0 drops out (t=20 - 0 > 10); 8 at 12, 5 at 16, 2 at 20 -> slope -0.75
    _, found = feed(m, [ev(0, v=100), ev(12, v=8), ev(16, v=5), ev(20, v=2)])
    assert len(found) == 1
    assert found[0].detail["slope"] == pytest.approx(-0.75)


def test_trend_skips_non_numeric_values():
    m = Trend(field="v", direction="rising", min_slope=0.1, points=2)
    _, found = feed(m, [ev(0, v=1), ev(1, v="high"), ev(2, v=True), ev(3, v=2)])
    assert len(found) == 1


# anomaly -------------------------------------------------------------------------------

def test_zscore_anomaly_after_warmup():
    m = Anomaly(field="amount", method="zscore", threshold=3, warmup=4, window=10)
    # 10,12,10,12: mean 11, std 1. 14 is z=3 -> anomaly. 50 during warm-up is not.
    state, found = feed(m, [ev(0, amount=50)])
    assert found == []
    m2 = Anomaly(field="amount", method="zscore", threshold=3, warmup=4, window=10)
    _, found = feed(m2, [ev(t, amount=a) for t, a in enumerate([10, 12, 10, 12, 13.9, 14])])
    # 13.9: stats of 10,12,10,12 -> z=2.9, no. 14: stats of 10,12,10,12,13.9
    # mean 11.58, std ~1.486 -> z ~1.63, no alert: the outlier joined the mean.
    assert found == []
    m3 = Anomaly(field="amount", method="zscore", threshold=3, warmup=4, window=10)
    _, found = feed(m3, [ev(t, amount=a) for t, a in enumerate([10, 12, 10, 12, 14])])
    assert len(found) == 1
    assert found[0].detail["mean"] == pytest.approx(11)
    assert found[0].detail["std"] == pytest.approx(1)
    assert found[0].detail["z"] == pytest.approx(3)


def test_zscore_rolling_window_forgets_old_values():
    m = Anomaly(field="x", method="zscore", threshold=2, warmup=2, window=2)
    # window keeps only the last 2 values: after 0,100,10,12 the stats are of 10,12
    _, found = feed(m, [ev(t, x=v) for t, v in enumerate([0, 100, 10, 12])])
    found_ids = [f.evidence[0]["event_id"] for f in found]
    assert "e3" not in found_ids
    _, found = feed(Anomaly(field="x", method="zscore", threshold=2, warmup=2, window=2),
                    [ev(t, x=v) for t, v in enumerate([10, 12, 20])])
    assert len(found) == 1  # mean 11 std 1, z 9


def test_constant_history_makes_any_change_anomalous():
    m = Anomaly(field="x", threshold=3, warmup=3)
    _, found = feed(m, [ev(t, x=v) for t, v in enumerate([5, 5, 5, 5, 6])])
    assert len(found) == 1
    assert found[0].detail["z"] is None  # infinite, reported as null


def test_ewma_anomaly_hand_checked():
    m = Anomaly(field="x", method="ewma", alpha=0.5, threshold=2, warmup=3)
    state, _ = feed(m, [ev(0, x=10), ev(1, x=12), ev(2, x=10)])
    # x=10: m=10 v=0; x=12: d=2 incr=1 m=11 v=.5*(0+2)=1; x=10: d=-1 incr=-.5 m=10.5 v=.5*(1+.5)=.75
    assert state["m"] == pytest.approx(10.5)
    assert state["s2"] == pytest.approx(0.75)
    _, found = feed(m, [ev(3, x=12)], state)  # z = 1.5/0.866 = 1.73 < 2
    assert found == []
    _, found = feed(m, [ev(3, x=13)], state)  # z = 2.5/0.866 = 2.89
    assert len(found) == 1


# sequence ------------------------------------------------------------------------------

FAILED = lambda e: e.get("action") == "login" and e.get("status") == "failed"  # noqa: E731
PURCHASE_ABROAD = lambda e: e.get("action") == "purchase" and e.get("country") != e["match"]["fail"]["country"]  # noqa: E731


def fraud():
    return Sequence([SeqStep("fail", FAILED, times=3), SeqStep("buy", PURCHASE_ABROAD)], within=600)


def fail(ts, country="DE"):
    return ev(ts, action="login", status="failed", country=country)


def buy(ts, country):
    return ev(ts, action="purchase", country=country)


def test_sequence_three_failures_then_purchase_abroad_matches_once():
    _, found = feed(fraud(), [fail(0), fail(10), ev(15, action="view"), fail(20), buy(300, "BR")])
    assert len(found) == 1
    assert [(x["event_id"], x["step"]) for x in found[0].evidence] == [
        ("e0", "fail"), ("e10", "fail"), ("e20", "fail"), ("e300", "buy")]


@pytest.mark.parametrize("events", [
    [fail(0), fail(10), buy(300, "BR")],                       # two failures
    [fail(0), fail(10), fail(20), buy(660, "BR")],             # purchase after 11 minutes
    [fail(0), fail(10), fail(20), buy(300, "DE")],             # usual country
    [buy(0, "BR"), fail(10), fail(20), fail(30)],              # wrong order
], ids=["two-failures", "after-11-minutes", "usual-country", "wrong-order"])
def test_sequence_near_misses_do_not_match(events):
    assert feed(fraud(), events)[1] == []


def test_sequence_later_failures_still_complete_within_window():
    # fail at 0 expires, but 400, 500, 610 are three failures within 600 of 400
    _, found = feed(fraud(), [fail(0), fail(400), fail(500), fail(610), buy(900, "BR")])
    assert len(found) == 1
    assert [x["event_id"] for x in found[0].evidence] == ["e400", "e500", "e610", "e900"]


def test_sequence_a_burst_of_failures_gives_one_alert_and_state_stays_small():
    events = [fail(t) for t in range(0, 100, 2)] + [buy(120, "BR"), buy(130, "BR")]
    state = None
    found = []
    for e in events:
        state, m = fraud().step(state, e, e["ts"], e["id"])
        found += m
        assert len(state["p"]) <= 4  # positions (fail,1) (fail,2) (buy,0) at most
    assert len(found) == 1


def test_sequence_not_followed_by_in_the_middle():
    m = Sequence([SeqStep("a", field_is("k", "a")), SeqStep("no-c", field_is("k", "c"), negated=True),
                  SeqStep("b", field_is("k", "b"))], within=100)
    assert len(feed(m, [ev(0, k="a"), ev(1, k="x"), ev(2, k="b")])[1]) == 1
    assert feed(m, [ev(0, k="a"), ev(1, k="c"), ev(2, k="b")])[1] == []
    # a new "a" after the forbidden "c" starts again
    assert len(feed(m, [ev(0, k="a"), ev(1, k="c"), ev(2, k="a"), ev(3, k="b")])[1]) == 1


def test_sequence_trailing_not_followed_by_fires_on_the_timer():
    m = Sequence([SeqStep("order", field_is("k", "order")),
                  SeqStep("no-pay", field_is("k", "pay"), negated=True)], within=60)
    state, found = feed(m, [ev(0, k="order")])
    assert found == [] and m.deadline(state) == 60
    same, found = m.on_timer(state, 59)
    assert found == [] and same is state
    state2, found = m.on_timer(state, 61)
    assert len(found) == 1 and found[0].at == 60
    assert m.deadline(state2) is None
    # paid in time: killed, nothing fires
    paid, _ = feed(m, [ev(10, k="pay")], state)
    assert m.on_timer(paid, 100)[1] == []
    # a later event past the deadline also completes it (event time decides)
    _, found = feed(m, [ev(70, k="other")], state)
    assert len(found) == 1


# absence -------------------------------------------------------------------------------

def test_absence_fires_on_timer_without_new_input():
    hb = field_is("type", "heartbeat")
    m = Absence(trigger=hb, expect=hb, within=30)
    state, found = feed(m, [ev(0, type="heartbeat"), ev(20, type="heartbeat")])
    assert found == [] and m.deadline(state) == 50
    assert m.on_timer(state, 49)[1] == []
    assert m.on_timer(state, 50)[1] == []  # an expected event at 50 would be in time
    state, found = m.on_timer(state, 50.5)
    assert len(found) == 1 and found[0].at == 50
    assert found[0].evidence[0]["event_id"] == "e20"
    assert m.on_timer(state, 1000)[1] == []  # fires once


def test_absence_expected_event_in_time_cancels_and_late_one_alerts():
    m = Absence(trigger=field_is("k", "order"), expect=field_is("k", "ship"), within=10)
    state, found = feed(m, [ev(0, k="order"), ev(5, k="ship")])
    assert found == [] and m.deadline(state) is None
    state, found = feed(m, [ev(0, k="order"), ev(15, k="ship")])
    assert len(found) == 1 and found[0].at == 10


# definitions ---------------------------------------------------------------------------

from app.patterns import (  # noqa: E402
    EngineConfig,
    PatternError,
    config_patterns,
    duration,
    engine_config,
    event_time,
    parse_definition,
)

ENGINE = EngineConfig(sources=("events",), time_field="ts")

FRAUD = {
    "name": "fraud", "type": "sequence", "key_by": "user_id", "within": "10m",
    "steps": [
        {"name": "fail", "where": "action == 'login' and status == 'failed'", "times": 3},
        {"name": "buy", "where": "action == 'purchase' and country != match.fail.country"},
    ],
}


def test_a_parsed_fraud_definition_matches_like_the_hand_built_one():
    p = parse_definition(FRAUD, ENGINE)
    assert (p.kind, p.key_by, p.source) == ("sequence", "user_id", "events")
    assert len(feed(p.matcher, [fail(0), fail(1), fail(2), buy(500, "BR")])[1]) == 1
    assert feed(p.matcher, [fail(0), fail(1), fail(2), buy(500, "DE")])[1] == []
    assert feed(p.matcher, [fail(0), fail(1), fail(2), buy(601, "BR")])[1] == []


@pytest.mark.parametrize("change,field", [
    ({"name": "bad name!"}, "name"),
    ({"type": "magic"}, "type"),
    ({"key_by": ""}, "key_by"),
    ({"source": "orders"}, "source"),
    ({"within": "soon"}, "within"),
    ({"within": -5}, "within"),
    ({"steps": []}, "steps"),
    ({"steps": [{"name": "a", "where": "x ==="}]}, "steps[0].where"),
    ({"steps": [{"name": "a", "where": "x == 1", "not": True}]}, "steps[0].not"),
    ({"steps": [{"name": "a", "where": "x == 1", "times": 0}]}, "steps[0].times"),
    ({"steps": [{"name": "a", "where": "__import__('os')"}]}, "steps[0].where"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_definitions_name_the_field(change, field):
    with pytest.raises(PatternError) as err:
        parse_definition({**FRAUD, **change}, ENGINE)
    assert err.value.field == field


@pytest.mark.parametrize("definition,field", [
    ({"name": "t", "type": "threshold", "key_by": "u"}, "where"),
    ({"name": "f", "type": "frequency", "key_by": "u", "within": 60}, "count"),
    ({"name": "f", "type": "frequency", "key_by": "u", "count": 5}, "within"),
    ({"name": "t", "type": "trend", "key_by": "u", "field": "v", "min_slope": 1}, "points"),
    ({"name": "t", "type": "trend", "key_by": "u", "field": "v", "min_slope": 1, "points": 3,
      "direction": "up"}, "direction"),
    ({"name": "a", "type": "anomaly", "key_by": "u", "field": "v", "alpha": 2, "method": "ewma"}, "alpha"),
    ({"name": "a", "type": "anomaly", "key_by": "u", "field": "v", "warmup": 50, "window": 10}, "warmup"),
    ({"name": "a", "type": "anomaly", "key_by": "u"}, "field"),
    ({"name": "h", "type": "absence", "key_by": "u", "trigger": "x == 1", "within": 5}, "expect"),
])
def test_each_kind_checks_its_own_fields(definition, field):
    with pytest.raises(PatternError) as err:
        parse_definition(definition, ENGINE)
    assert err.value.field == field


def test_durations_and_event_times():
    assert duration("10m", "w") == 600 and duration(90, "w") == 90 and duration("1.5h", "w") == 5400
    assert event_time(1_700_000_000) == 1_700_000_000
    assert event_time(1_700_000_000_500) == pytest.approx(1_700_000_000.5)
    assert event_time("2023-11-14T22:13:20Z") == 1_700_000_000
    assert event_time("yesterday") is None and event_time(None) is None and event_time(True) is None


def test_config_section_is_parsed_and_errors_point_into_it():
    section = {"sources": ["events"], "source_key": "user_id",
               "definitions": [FRAUD, {"name": "big", "type": "threshold", "key_by": "user_id",
                                       "where": "amount > 1000"}]}
    engine = engine_config(section)
    assert engine.source_key == "user_id"
    assert set(config_patterns(engine, section)) == {"fraud", "big"}
    with pytest.raises(PatternError) as err:
        config_patterns(engine, {"definitions": [FRAUD, FRAUD]})
    assert err.value.field == "patterns.definitions[1].name"


# pattern conditions (the project's expression language, through app.patterns.condition) ---

from app.patterns import condition  # noqa: E402


@pytest.mark.parametrize("text,record,expected", [
    ("amount > 100 and country in ['BR', 'AR']", {"amount": 150, "country": "BR"}, True),
    ("amount > 100 and country in ['BR', 'AR']", {"amount": 150, "country": "DE"}, False),
    ("not (status == 'ok') or amount * 2 >= 10", {"status": "ok", "amount": 5}, True),
    ("missing > 3", {}, False),                      # null > 3: false, not an error
    ("missing == null", {}, True),
    ("match.fail.country != country", {"country": "BR", "match": {"fail": {"country": "DE"}}}, True),
    ("a.b.c == 1", {"a": 5}, False),                 # path through a non-object
    ("x / y > 1", {"x": 1, "y": 0}, False),          # division by zero: no match, no crash
    # conditions used without a wrapper (always_boolean): odd values still give a bool
    ("value > 98", {"value": "high"}, False),
    ("value > 98", {"value": [99]}, False),
    ("value > 98", {"value": True}, False),
    ("value >= 98.5", {"value": 99}, True),
    ("tags == ['a']", {"tags": ["a"]}, True),
    ("'x' in name", {"name": 5}, False),
    ("not missing", {}, True),
    ("exists(a.b) and a.b != 0", {"a": {"b": 2}}, True),
    ("action == 'login' or value", {"action": "buy", "value": 0}, False),
])
def test_pattern_conditions(text, record, expected):
    assert condition(text, "where")(record) is expected


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "open('/etc/passwd')", "[x for x in y]",
    "lambda: 1", "a[0]", "", "a ==", "x if y else z",
])
def test_conditions_refuse_anything_but_plain_expressions(text):
    with pytest.raises(PatternError):
        condition(text, "where")


# cost-driven changes must not change results -------------------------------------------


def test_out_of_order_points_are_kept_in_event_time_order():
    freq = Frequency(field_is("a", "x"), count=3, within=10)
    _, found = feed(freq, [ev(5, a="x"), ev(3, a="x"), ev(20, a="x"), ev(14, a="x"), ev(12, a="x")])
    # 20, 14 (late), 12 (late): all within 10 s of the newest (20) -> one match
    assert [[e["ts"] for e in m.evidence] for m in found] == [[12, 14, 20]]
    trend = Trend(field="v", direction="rising", min_slope=0.5, points=3, per="point")
    state, found = feed(trend, [ev(2, v=5), ev(1, v=1), ev(3, v=9)])
    assert [e["ts"] for e in found[0].evidence] == [1, 2, 3]
    assert found[0].detail["slope"] == pytest.approx(4.0)


def test_per_point_slope_equals_the_general_least_squares():
    from operators.patterns import _slope_per_point

    values = [3.0, 7.5, 2.0, 11.0, 4.25, 9.0]
    expected = least_squares_slope(list(enumerate(values)))
    assert _slope_per_point(values) == pytest.approx(expected)
    # epoch-second x values: the centered sums keep their precision
    base = 1_795_750_000.0
    assert least_squares_slope([(base + i, 2.0 * i) for i in range(5)]) == pytest.approx(2.0)
    # large values (the per-point slope weights them without centering them first)
    assert _slope_per_point([base + 2.0 * i for i in range(5)]) == pytest.approx(2.0)
    for n in range(2, 12):
        values = [((i * 7919) % 13) * 1.5 - 4 for i in range(n)]
        assert _slope_per_point(values) == pytest.approx(least_squares_slope(list(enumerate(values))))


def test_sequences_bind_only_the_fields_later_steps_read():
    from app.patterns import EngineConfig, bound_fields, parse_definition

    steps = [{"name": "fail", "where": "action == 'login'", "times": 2},
             {"name": "buy", "where": "action == 'buy' and country != match.fail.country "
                                      "and exists(match.fail.card.id)"}]
    assert bound_fields(steps, ["fail", "buy"]) == {"fail": ("card", "country")}
    assert bound_fields([steps[0], {"name": "b", "where": "match.fail != null"}], ["fail", "b"]) == {"fail": None}
    assert bound_fields([steps[0], {"name": "b", "where": "exists(match)"}], ["fail", "b"]) == \
        {"fail": None, "b": None}
    assert bound_fields([steps[0]], ["fail"]) == {}

    lean = parse_definition({"name": "s", "type": "sequence", "key_by": "u", "within": 60,
                             "steps": steps}, EngineConfig()).matcher
    full = Sequence(lean.steps, lean.within)  # binds whole events
    events = [ev(1, a="1", action="login", country="DE", card={"id": 7}, page="/x" * 50),
              ev(2, a="2", action="login", country="DE", card={"id": 7}),
              ev(3, a="3", action="buy", country="DE"),
              ev(4, a="4", action="buy", country="FR")]
    lean_state, lean_found = feed(lean, events[:2])
    full_state, _ = feed(full, events[:2])
    assert len(json.dumps(lean_state)) < len(json.dumps(full_state))
    assert lean_state["p"][0]["b"] == {"fail": {"country": "DE", "card": {"id": 7}}}
    _, lean_found = feed(lean, events)
    _, full_found = feed(full, events)
    assert [m.evidence for m in lean_found] == [m.evidence for m in full_found]
    assert [e["event_id"] for e in lean_found[0].evidence] == ["e1", "e2", "e4"]
