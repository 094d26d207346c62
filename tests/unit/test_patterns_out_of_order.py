"""Pattern matchers with out-of-order input and at their time boundaries: event time
decides, not arrival (review session 27, repros p4/p8/p3 in docs/delivery.md AX)."""

from __future__ import annotations

from operators.patterns import Absence, SeqStep, Sequence, Trend


def kind_is(name):
    return lambda e: e.get("k") == name


def test_absence_late_trigger_keeps_the_later_deadline_and_an_earlier_expect_does_not_clear():
    m = Absence(trigger=kind_is("pay"), expect=kind_is("confirm"), within=30)
    state, _ = m.step(None, {"k": "pay"}, 100.0, "pay100")
    # (a) a late pay at 50 must not move the deadline back from 130 to 80
    late, found = m.step(state, {"k": "pay"}, 50.0, "pay50")
    assert found == [] and m.deadline(late) == 130
    assert m.on_timer(late, 81)[1] == []
    _, found = m.on_timer(late, 131)
    assert [(x.at, x.evidence[0]["event_id"]) for x in found] == [(130, "pay100")]
    # (b) a confirm at 90 happened before the pay at 100: it does not answer it
    early, found = m.step(state, {"k": "confirm"}, 90.0, "c90")
    assert found == [] and m.deadline(early) == 130
    # a confirm between the pay and the deadline (both included) does
    for t in (100.0, 115.0, 130.0):
        cleared, found = m.step(state, {"k": "confirm"}, t, "c")
        assert found == [] and m.deadline(cleared) is None
    # a later trigger still re-arms (heartbeat)
    hb = Absence(trigger=kind_is("hb"), expect=kind_is("hb"), within=30)
    s, _ = hb.step(None, {"k": "hb"}, 0.0, "h0")
    s, _ = hb.step(s, {"k": "hb"}, 20.0, "h20")
    assert hb.deadline(s) == 50
    s2, _ = hb.step(s, {"k": "hb"}, 10.0, "h10")  # late heartbeat: nothing moves
    assert hb.deadline(s2) == 50 and s2["t"]["event_id"] == "h20"


def test_absence_expected_event_at_the_deadline_is_in_time_for_the_timer_too():
    m = Absence(trigger=kind_is("pay"), expect=kind_is("confirm"), within=30)
    state, _ = m.step(None, {"k": "pay"}, 100.0, "pay")
    _, in_time = m.step(state, {"k": "confirm"}, 130.0, "c")
    assert in_time == []
    same, by_timer = m.on_timer(state, 130.0)
    assert by_timer == [] and same is state and m.deadline(same) == 130
    _, found = m.on_timer(state, 130.001)
    assert [x.at for x in found] == [130]


def test_sequence_steps_follow_each_other_in_event_time_not_arrival():
    seq = Sequence([SeqStep("a", kind_is("A")), SeqStep("b", kind_is("B"))], within=60)
    s, _ = seq.step(None, {"k": "A"}, 100.0, "a1")
    s, found = seq.step(s, {"k": "B"}, 90.0, "b1")  # late B: happened before the A
    assert found == []
    _, found = seq.step(s, {"k": "B"}, 100.0, "b2")  # at the A's time: in order
    assert [(e["step"], e["ts"]) for e in found[0].evidence] == [("a", 100.0), ("b", 100.0)]
    # a repeated step counts in event time too
    rep = Sequence([SeqStep("a", kind_is("A"), times=2), SeqStep("b", kind_is("B"))], within=60)
    s, _ = rep.step(None, {"k": "A"}, 10.0, "a10")
    s, _ = rep.step(s, {"k": "A"}, 20.0, "a20")
    s, found = rep.step(s, {"k": "B"}, 15.0, "b15")
    assert found == []
    # a forbidden event from before the partial's last event does not kill it
    neg = Sequence([SeqStep("a", kind_is("A")), SeqStep("no-c", kind_is("C"), negated=True),
                    SeqStep("b", kind_is("B"))], within=60)
    s, _ = neg.step(None, {"k": "A"}, 100.0, "a")
    s, _ = neg.step(s, {"k": "C"}, 95.0, "c95")
    _, found = neg.step(s, {"k": "B"}, 110.0, "b")
    assert len(found) == 1


def test_trend_window_ends_at_the_newest_point_after_a_late_one():
    tr = Trend(field="v", direction="rising", min_slope=100.0, within=30.0, min_points=3)
    s = None
    for t in (0, 10, 20, 30, 40, 50, 60):  # flat values: no trend
        s, found = tr.step(s, {"v": 0.0}, float(t), f"e{t}")
        assert found == []
    s, found = tr.step(s, {"v": 1.0}, 5.0, "late")
    assert found == [] and s["p"][0::3] == [30.0, 40.0, 50.0, 60.0]
    # a late point inside the window is kept, in event time order
    s, found = tr.step(s, {"v": 0.0}, 45.0, "late45")
    assert found == [] and s["p"][0::3] == [30.0, 40.0, 45.0, 50.0, 60.0]


def _a_not_c(within=10):
    return Sequence([SeqStep("a", kind_is("A")), SeqStep("no-c", kind_is("C"), negated=True)],
                    within=within)


def test_trailing_not_keeps_the_partial_that_completes_first():
    m = _a_not_c()
    s, found = None, []
    for t in range(0, 88, 8):  # an A every 8 s, never a C; ticks when a deadline is due
        s, out = m.step(s, {"k": "A"}, float(t), f"a{t}")
        found += out
        d = m.deadline(s)
        if d is not None and d <= t + 8:
            s, out = m.on_timer(s, t + 7.9)
            found += out
    assert [x.at for x in found] == [10, 26, 42, 58, 74]
    assert m.deadline(s) == 90
    # the same stream without ticks: the events past each deadline complete it
    s, no_ticks = None, []
    for t in range(0, 88, 8):
        s, out = m.step(s, {"k": "A"}, float(t), f"a{t}")
        no_ticks += out
    assert [x.at for x in no_ticks] == [10, 26, 42, 58, 74]


def test_a_completion_on_event_time_keeps_the_partial_the_event_starts():
    m = _a_not_c()
    s, first = m.step(None, {"k": "A"}, 0.0, "a0")
    s, first = m.step(s, {"k": "A"}, 25.0, "a25")  # catching up: the A at 0 is due at 10
    assert [x.at for x in first] == [10] and m.deadline(s) == 35
    _, second = m.step(s, {"k": "B"}, 60.0, "b60")
    assert [(x.at, x.evidence[0]["event_id"]) for x in second] == [(35, "a25")]


def test_a_trailing_not_completes_the_same_whenever_the_tick_comes():
    seq = Sequence([SeqStep("a", kind_is("A")), SeqStep("x", kind_is("X")),
                    SeqStep("no-c", kind_is("C"), negated=True)], within=10)

    def run(with_ticks):
        s, out = None, []
        for t, kind in ((0, "A"), (2, "X"), (5, "A")):
            s, m = seq.step(s, {"k": kind}, float(t))
            out += m
        if with_ticks:
            s, m = seq.on_timer(s, 10.5)
            out += m
        s, m = seq.step(s, {"k": "X"}, 12.0)
        out += m
        if with_ticks:
            s, m = seq.on_timer(s, 15.5)
            out += m
        s, m = seq.step(s, {"k": "other"}, 100.0)
        return [x.at for x in out + m]

    assert run(True) == run(False) == [10]
