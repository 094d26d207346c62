"""The trend matcher's flat point list (time, value, id, time, value, id, ...) must
match exactly what the previous nested [[time, value, id], ...] state matched, and a
state stored in the nested form (a changelog written before) must keep working."""

from __future__ import annotations

import json
import random

import pytest

from operators.patterns import (
    Match,
    Trend,
    _evidence,
    _first,
    _slope_per_point,
    least_squares_slope,
)


class NestedTrend(Trend):
    """The previous Trend.step, verbatim but for the window trim (P10): the reference."""

    def step(self, state, event, now, event_id=None):
        value = event.get(self.field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return state, []
        value = float(value)
        if not self.where(event):
            return state, []
        old = state.get("p", ()) if state else ()
        point = [now, value, event_id]
        if not old or old[-1][0] <= now:
            pts = [*old, point]
        else:
            pts = sorted([*old, point], key=_first)
        if self.points is not None:
            if len(pts) > self.points:
                pts = pts[-self.points:]
            ready = len(pts) >= self.points
        else:
            # Trimmed relative to the newest point, not this event's own time (the
            # previous step's rule kept a late point's older neighbours: review P10).
            newest = pts[-1][0]
            if newest - pts[0][0] > self.within:
                pts = [p for p in pts if newest - p[0] <= self.within]
            ready = len(pts) >= self.min_points
        if not ready:
            return {"p": pts}, []
        if self.per == "second":
            slope = least_squares_slope([(p[0], p[1]) for p in pts])
        else:
            slope = _slope_per_point([p[1] for p in pts])
        if slope is None:
            return {"p": pts}, []
        hit = slope >= self.min_slope if self.direction == "rising" else slope <= -self.min_slope
        if not hit:
            return {"p": pts}, []
        evidence = [_evidence(eid, ts, value=v) for ts, v, eid in pts]
        return {"p": []}, [Match(now, evidence, {"slope": slope, "direction": self.direction,
                                                 "points": len(pts)})]


def nested(state):
    """A flat trend state in the old nested form."""
    if not state:
        return state
    p = state["p"]
    return {"p": [list(p[i:i + 3]) for i in range(0, len(p), 3)]}


KWARGS = [
    {"direction": "rising", "min_slope": 2.0, "points": 5, "per": "point"},
    {"direction": "falling", "min_slope": 0.5, "points": 3},
    {"direction": "rising", "min_slope": 0.2, "within": 8.0, "min_points": 3},
    {"direction": "falling", "min_slope": 1.0, "within": 5.0, "min_points": 2, "per": "point"},
]


@pytest.mark.parametrize("kwargs", KWARGS)
@pytest.mark.parametrize("seed", range(8))
def test_flat_points_match_the_nested_reference(kwargs, seed):
    rng = random.Random(seed)
    new, ref = Trend(field="v", **kwargs), NestedTrend(field="v", **kwargs)
    s_new = s_ref = None
    t = 1_700_000_000.0
    for i in range(400):
        t += rng.uniform(0, 2)
        ts = t - rng.uniform(0, 6) if rng.random() < 0.15 else t  # some out of order
        value = rng.choice([rng.uniform(0, 100), i % 50 * 3.0, "n/a", None, True])
        event = {"v": value}
        s_new, m_new = new.step(s_new, event, ts, f"e{i}")
        s_ref, m_ref = ref.step(s_ref, event, ts, f"e{i}")
        assert m_new == m_ref
        assert nested(s_new) == s_ref
        json.dumps(s_new)


@pytest.mark.parametrize("kwargs", KWARGS)
def test_a_stored_nested_state_is_read(kwargs):
    """A key whose state was written by the previous version goes on where it was."""
    rng = random.Random(42)
    new, ref = Trend(field="v", **kwargs), NestedTrend(field="v", **kwargs)
    s_ref = None
    events = [(1_700_000_000.0 + i * rng.uniform(0.5, 1.5), rng.uniform(0, 100)) for i in range(60)]
    for i, (ts, v) in enumerate(events[:30]):
        s_ref, _ = ref.step(s_ref, {"v": v}, ts, f"e{i}")
    s_new = json.loads(json.dumps(s_ref))  # as decoded from the changelog
    for i, (ts, v) in enumerate(events[30:], start=30):
        s_new, m_new = new.step(s_new, {"v": v}, ts, f"e{i}")
        s_ref, m_ref = ref.step(s_ref, {"v": v}, ts, f"e{i}")
        assert m_new == m_ref
        assert nested(s_new) == s_ref


# sequence: the per-step plan (next positive step, negated guards) computed once --------

from operators.patterns import SeqStep, Sequence  # noqa: E402


class UnplannedSequence(Sequence):
    """The previous ``_advance`` / ``_waiting_at_end``, verbatim: the reference."""

    def _waiting_at_end(self, p) -> bool:
        return self._trailing_not and p["i"] >= len(self.steps) - 1 and \
            self._next_positive(p["i"]) is None

    def _advance(self, p, event, now, event_id):
        index = p["i"]
        bound = p["b"]
        step = self.steps[index]
        if not step.negated and p["c"] > 0:
            if step.where(self._record(event, bound)):
                return self._count(p, index, event, now, event_id)
            return p
        target = self._next_positive(index)
        record = self._record(event, bound)
        for guard in self.steps[index:target if target is not None else len(self.steps)]:
            if guard.negated and guard.where(record):
                return None
        if target is None:
            return p
        if self.steps[target].where(record):
            return self._count(p, target, event, now, event_id)
        return p


def is_(action):
    return lambda e: e.get("a") == action


SEQUENCES = [
    [SeqStep("a", is_("a")), SeqStep("x", is_("x"), negated=True), SeqStep("b", is_("b"), times=2)],
    [SeqStep("a", is_("a"), times=2), SeqStep("b", is_("b")), SeqStep("x", is_("x"), negated=True)],
    [SeqStep("a", is_("a")), SeqStep("x", is_("x"), negated=True), SeqStep("y", is_("y"), negated=True),
     SeqStep("b", is_("b")), SeqStep("c", is_("c"))],
]


@pytest.mark.parametrize("steps", SEQUENCES)
@pytest.mark.parametrize("seed", range(6))
def test_planned_sequence_matches_the_reference(steps, seed):
    rng = random.Random(seed)
    new, ref = Sequence(steps, within=10.0), UnplannedSequence(steps, within=10.0)
    s_new = s_ref = None
    t = 1_700_000_000.0
    for i in range(500):
        t += rng.uniform(0, 1.5)
        event = {"a": rng.choice("aabbcxy")}
        if rng.random() < 0.1:
            s_new, m_new = new.on_timer(s_new, t)
            s_ref, m_ref = ref.on_timer(s_ref, t)
        else:
            s_new, m_new = new.step(s_new, event, t, f"e{i}")
            s_ref, m_ref = ref.step(s_ref, event, t, f"e{i}")
        assert m_new == m_ref
        assert s_new == s_ref
        assert new.deadline(s_new) == ref.deadline(s_ref)
