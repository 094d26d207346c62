"""Pattern matchers: pure, keyed, event-time state machines.

Every matcher works on the state of ONE key (one user, card, device ...) and is two
pure functions over a JSON-serializable state:

* ``step(state, event, now, event_id) -> (new_state, matches)`` for one event, where
  ``now`` is the event's own event time (epoch seconds);
* ``on_timer(state, now) -> (new_state, matches)`` when the clock passed
  ``deadline(state)`` without new input (absence, and a sequence ending in a
  "not followed by" step).

``state`` is ``None`` for a key never seen. Conditions are plain predicates
(``Callable[[Mapping], bool]``) so this module knows nothing of the expression parser.
No Faust, no Kafka, no I/O here.
"""

from __future__ import annotations

import math
import operator
from collections import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]
State = Any


def always(_event: Mapping[str, Any]) -> bool:
    """The predicate of a matcher without a ``where`` condition."""
    return True


@dataclass(frozen=True)
class Match:
    """One detected occurrence of a pattern: when, why (evidence) and figures."""

    at: float
    evidence: list[dict[str, Any]]
    detail: dict[str, Any] = field(default_factory=dict)


def _evidence(event_id: str | None, now: float, **more: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"event_id": event_id, "ts": now}
    item.update(more)
    return item


def _number(value: Any) -> float | None:
    # bool is an int in Python, but "true" is not a measurement.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infinite figure is reported as null."""
    return value if math.isfinite(value) else None


class Matcher:
    """Base: no timers. Subclasses override ``step`` (and timers when they need them)."""

    kind = "matcher"
    #: Whether ``deadline`` can ever be set (the engine asks only these matchers).
    has_timers = False

    def step(self, state: State, event: Mapping[str, Any], now: float,
             event_id: str | None = None) -> tuple[State, list[Match]]:
        raise NotImplementedError

    def on_timer(self, state: State, now: float) -> tuple[State, list[Match]]:
        """Fire what is due at ``now``; default: nothing is ever due."""
        return state, []

    def deadline(self, state: State) -> float | None:
        """The event time at which ``on_timer`` has something to do, or None."""
        return None


@dataclass
class Threshold(Matcher):
    """A condition on one event: every event that satisfies ``where`` is a match."""

    where: Predicate
    kind = "threshold"

    def step(self, state, event, now, event_id=None):
        if self.where(event):
            return state, [Match(now, [_evidence(event_id, now)])]
        return state, []


@dataclass
class Frequency(Matcher):
    """At least ``count`` matching events within ``within`` seconds of event time.

    After a match the history is cleared, so N+1 failures in the window give one
    alert, not two overlapping ones (the next alert needs ``count`` new events).
    """

    where: Predicate
    count: int
    within: float
    kind = "frequency"

    def step(self, state, event, now, event_id=None):
        if not self.where(event):
            return state, []
        old = state.get("h", ()) if state else ()
        entry = [now, event_id]
        if not old or old[-1][0] <= now:
            history = [*old, entry]
        else:  # tolerate out-of-order arrival
            history = sorted([*old, entry], key=_first)
        newest = history[-1][0]
        if newest - history[0][0] > self.within:
            history = [h for h in history if newest - h[0] <= self.within]
        if len(history) >= self.count:
            evidence = [_evidence(eid, ts) for ts, eid in history]
            return {"h": []}, [Match(now, evidence, {"count": len(history), "within": self.within})]
        return {"h": history}, []


def least_squares_slope(points: abc.Sequence[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through (x, y) points; None if x never varies."""
    n = len(points)
    if n < 2:
        return None
    sum_x = sum_y = 0.0
    for x, y in points:
        sum_x += x
        sum_y += y
    mean_x, mean_y = sum_x / n, sum_y / n
    # Centered sums (two passes): x may be epoch seconds, where the one-pass
    # n*sxy - sx*sy form loses every significant digit.
    sxx = sxy = 0.0
    for x, y in points:
        dx = x - mean_x
        sxx += dx * dx
        sxy += dx * (y - mean_y)
    if sxx == 0:
        return None
    return sxy / sxx


#: Per number of points n: the weight of each value in the least-squares slope at
#: x = 0, 1, ... n-1, (i - mean_x) / sum((i - mean_x)^2). Computed once per n.
_SLOPE_WEIGHTS: dict[int, tuple[float, ...]] = {}


def _slope_per_point(values: abc.Sequence[float]) -> float:
    """Least-squares slope of values at x = 0, 1, 2 ... (n >= 2): sum(w_i * y_i).

    The x sums are known, so the slope is a fixed weighting of the values (the weights
    sum to zero, which is why the mean of y drops out); one C-level pass instead of a
    Python loop, run for every point of every trend key."""
    n = len(values)
    weights = _SLOPE_WEIGHTS.get(n)
    if weights is None:
        mean_x = (n - 1) / 2
        sxx = n * (n * n - 1) / 12
        weights = _SLOPE_WEIGHTS[n] = tuple((i - mean_x) / sxx for i in range(n))
    return sum(map(operator.mul, weights, values))


@dataclass
class Trend(Matcher):
    """A rising or falling least-squares slope of ``field`` over the last ``points``
    values or over the last ``within`` seconds.

    The slope is per second of event time (``per="second"``) or per point
    (``per="point"``). A match clears the points: one alert per trend episode.
    """

    field: str
    direction: str  # "rising" | "falling"
    min_slope: float
    points: int | None = None
    within: float | None = None
    min_points: int = 3
    per: str = "second"
    where: Predicate = always
    kind = "trend"

    def step(self, state, event, now, event_id=None):
        value = _number(event.get(self.field))
        if value is None or (self.where is not always and not self.where(event)):
            return state, []
        # The points are one flat list, time, value, event id, time, value, ... (oldest
        # first): one container per key instead of one per point. The key's state is
        # encoded and stored on every batch, and walked by the garbage collector while
        # cached; nested [t, v, id] lists made this the costliest matcher state.
        old = state.get("p", ()) if state else ()
        if old and old[0].__class__ is list:
            old = [x for point in old for x in point]  # stored as [[t, v, id], ...] before
        if not old or old[-3] <= now:
            if self.points is not None and len(old) >= 3 * self.points:
                pts = old[len(old) - 3 * self.points + 3:]  # the oldest point drops out
            else:
                pts = list(old)
            pts += (now, value, event_id)
        else:  # out of order: "last N" is by event time, whatever the arrival order
            triples = sorted([*_triples(old), (now, value, event_id)], key=_first)
            pts = [x for point in triples for x in point]
        if self.points is not None:
            if len(pts) > 3 * self.points:
                pts = pts[-3 * self.points:]
            ready = len(pts) >= 3 * self.points
        else:
            assert self.within is not None
            # The window ends at the newest point (as Frequency's), not at this event's
            # own time: a late point must not keep points older than newest - within.
            newest = pts[-3]
            if newest - pts[0] > self.within:
                pts = [x for point in _triples(pts) if newest - point[0] <= self.within for x in point]
            ready = len(pts) >= 3 * self.min_points
        if not ready:
            return {"p": pts}, []
        if self.per == "second":
            slope = least_squares_slope(list(zip(pts[0::3], pts[1::3], strict=False)))
        else:
            slope = _slope_per_point(pts[1::3])
        if slope is None:
            return {"p": pts}, []
        hit = slope >= self.min_slope if self.direction == "rising" else slope <= -self.min_slope
        if not hit:
            return {"p": pts}, []
        evidence = [_evidence(eid, ts, value=v) for ts, v, eid in _triples(pts)]
        return {"p": []}, [Match(now, evidence, {"slope": slope, "direction": self.direction,
                                                 "points": len(pts) // 3})]


def _triples(flat: abc.Sequence[Any]) -> list[tuple[Any, Any, Any]]:
    """(time, value, event id) of each point of a flat trend state."""
    return list(zip(flat[0::3], flat[1::3], flat[2::3], strict=False))


def _first(item: abc.Sequence[Any]) -> Any:
    return item[0]


def mean_std(values: abc.Sequence[float]) -> tuple[float, float]:
    """Population mean and standard deviation."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def z_score(value: float, mean: float, std: float) -> float:
    """How many standard deviations ``value`` is from ``mean``; any deviation from a
    constant history is infinitely far."""
    if std == 0:
        return 0.0 if value == mean else math.inf
    return abs(value - mean) / std


@dataclass
class Anomaly(Matcher):
    """A value far from the key's rolling mean.

    ``zscore``: mean and standard deviation of the last ``window`` values;
    ``ewma``: exponentially weighted mean and variance with weight ``alpha``.
    No alert before ``warmup`` values were seen. The value is judged against the
    statistics *before* it, then added to them (an outlier does move the mean).
    """

    field: str
    method: str = "zscore"  # "zscore" | "ewma"
    threshold: float = 3.0
    warmup: int = 10
    window: int = 100
    alpha: float = 0.1
    where: Predicate = always
    kind = "anomaly"

    def step(self, state, event, now, event_id=None):
        value = _number(event.get(self.field))
        if value is None or not self.where(event):
            return state, []
        if self.method == "ewma":
            return self._ewma(state or {}, value, now, event_id)
        return self._zscore(state or {}, value, now, event_id)

    def _alert(self, value, mean, std, z, now, event_id):
        return [Match(now, [_evidence(event_id, now, value=value)],
                      {"value": value, "mean": mean, "std": std, "z": _finite(z),
                       "method": self.method, "threshold": self.threshold})]

    def _zscore(self, state, value, now, event_id):
        values = list(state.get("v", []))
        matches: list[Match] = []
        if len(values) >= self.warmup:
            mean, std = mean_std(values)
            z = z_score(value, mean, std)
            if z >= self.threshold:
                matches = self._alert(value, mean, std, z, now, event_id)
        values.append(value)
        return {"v": values[-self.window:]}, matches

    def _ewma(self, state, value, now, event_id):
        n = state.get("n", 0)
        mean = state.get("m", 0.0)
        var = state.get("s2", 0.0)
        matches: list[Match] = []
        if n >= self.warmup:
            std = math.sqrt(var)
            z = z_score(value, mean, std)
            if z >= self.threshold:
                matches = self._alert(value, mean, std, z, now, event_id)
        if n == 0:
            mean, var = value, 0.0
        else:
            # West's incremental exponentially weighted mean and variance.
            diff = value - mean
            incr = self.alpha * diff
            mean += incr
            var = (1 - self.alpha) * (var + diff * incr)
        return {"n": n + 1, "m": mean, "s2": var}, matches


@dataclass(frozen=True)
class SeqStep:
    """One step of a sequence: ``times`` events matching ``where``; a ``negated``
    step forbids a matching event at that point (Flink CEP ``notFollowedBy``)."""

    name: str
    where: Predicate
    times: int = 1
    negated: bool = False


#: How a sequence step condition sees the events matched by earlier steps: the event
#: plus ``{"match": {step name: last event of that step}}``.
BOUND_KEY = "match"


class WithMatch(abc.Mapping):
    """The event plus ``match`` (the bound events) as one read-only mapping, without
    copying the event: a sequence evaluates its conditions on every event of a key
    with a partial match, and a ``{**event, "match": ...}`` copy each time was most of
    that cost. An event field named ``match`` is shadowed, as it was by the copy."""

    __slots__ = ("_event", "_bound")

    def __init__(self, event: Mapping[str, Any], bound: Mapping[str, Any]) -> None:
        self._event = event
        self._bound = bound

    def __getitem__(self, key: str) -> Any:
        if key == BOUND_KEY:
            return self._bound
        return self._event[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key == BOUND_KEY:
            return self._bound
        return self._event.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key == BOUND_KEY or key in self._event

    def __iter__(self):
        yield from (k for k in self._event if k != BOUND_KEY)
        yield BOUND_KEY

    def __len__(self) -> int:
        return len(self._event) + (BOUND_KEY not in self._event)


@dataclass
class Sequence_(Matcher):
    """Steps A then B then C ... (relaxed contiguity: other events may come in between)
    all within ``within`` seconds of the first event, with optional negated steps.
    The steps follow each other in event time, not arrival: an event whose time is
    before the last event a partial matched does not advance it (nor kill it).

    After a complete match every other partial match is dropped (Flink's
    SKIP_PAST_LAST_EVENT), so one burst gives one alert. Partial matches in the same
    position keep only the latest-started one: it expires last and has the same
    future, which bounds the state to the number of (step, count) positions. At a
    trailing negated step the earliest-started one is kept instead: it completes first.
    A trailing negated step completes when ``within`` passed without the forbidden
    event, on the timer or on the first event past that time, whichever comes first,
    with the same result: the completion drops every other partial, but an event past
    it still starts a new one.
    """

    steps: list[SeqStep]
    within: float
    bind_events: bool = True
    #: Which fields of each step's event later conditions read (``match.<step>.<field>``):
    #: step name -> field names, or None for the whole event. A step not in the map is
    #: not bound at all. ``None`` (the default) binds every step's whole event. Why:
    #: the bound events live in the key's state, which is decoded, re-encoded and
    #: written to RocksDB and the changelog on every batch; a whole event is most of it.
    bind_fields: dict[str, tuple[str, ...] | None] | None = None
    kind = "sequence"

    def __post_init__(self) -> None:
        self._positive = [i for i, s in enumerate(self.steps) if not s.negated]
        self._trailing_not = self.steps[-1].negated
        self.has_timers = self._trailing_not  # only a trailing "not" waits for the clock
        # Per step index: the next positive step (None: only "not" steps remain) and
        # the conditions of the negated steps before it. Computed once: ``_advance``
        # runs for every partial match on every event of its key.
        self._plan: list[tuple[int | None, tuple[Predicate, ...]]] = []
        for index in range(len(self.steps)):
            target = self._next_positive(index)
            end = target if target is not None else len(self.steps)
            self._plan.append((target, tuple(s.where for s in self.steps[index:end] if s.negated)))

    def _record(self, event, bound):
        if not self.bind_events or not bound:
            return event
        return WithMatch(event, bound)

    def _next_positive(self, index: int) -> int | None:
        for i in range(index, len(self.steps)):
            if not self.steps[i].negated:
                return i
        return None

    def step(self, state, event, now, event_id=None):
        partials = (state or {}).get("p", [])
        kept: list[dict] = []
        matches: list[Match] = []
        # First what the clock already decided, as on_timer would have had the tick come
        # before this event: expired partials go, and one waiting at a trailing "not"
        # completes at the end of its window (the "not" step held) and drops the others.
        # Looked for here first: on most events none expired, and then the partials
        # themselves are walked (no call, no new lists).
        live, due, changed = partials, [], False
        within = self.within
        for p in partials:
            if now - p["s"] > within:
                live, due = self._expire(partials, now)
                changed = True  # at least this one is gone
                break
        for p in live:
            advanced = self._advance(p, event, now, event_id)
            if advanced is None:  # killed by a negated step
                changed = True
                continue
            if advanced is not p:
                changed = True
            if advanced.get("done"):
                matches.append(self._complete(advanced, now))
                continue
            kept.append(advanced)
        first = self.steps[0]
        if first.where(event):
            changed = True
            start = {"s": now, "i": 0, "c": 0, "ev": [], "b": {}}
            started = self._count(start, 0, event, now, event_id)
            if started.get("done"):
                matches.append(self._complete(started, now))
            else:
                # Started after the due matches ended: it survives them.
                kept.append(started)
        if matches:
            # Skip past the last event: nothing that overlaps a match made by this event
            # survives (not even the partial this event started).
            return {"p": []}, due + matches
        if not changed:
            return state, []
        return {"p": self._dedupe(kept)}, due

    def _expire(self, partials, now) -> tuple[list[dict], list[Match]]:
        """The partials still open at ``now`` and the matches due by then. A partial
        whose window ended while it waited at a trailing "not" completes at the end of
        its window; after such a match no other partial survives (skip past the last
        event), the same in ``step`` and ``on_timer`` whenever the tick comes."""
        live, due = [], []
        for p in partials:
            if now - p["s"] > self.within:
                if self._waiting_at_end(p):
                    due.append(self._complete(p, p["s"] + self.within))
                continue
            live.append(p)
        return ([] if due else live), due

    def _waiting_at_end(self, p) -> bool:
        return self._trailing_not and p["i"] >= len(self.steps) - 1 and \
            self._plan[p["i"]][0] is None

    def _advance(self, p, event, now, event_id):
        if now < p["ev"][-1]["ts"]:
            # Event time decides, not arrival: an event from before the partial's last
            # matched event is not "followed by" it, so it neither matches the next step
            # nor counts as a forbidden event at its place.
            return p
        index = p["i"]
        bound = p["b"]
        step = self.steps[index]
        if not step.negated and p["c"] > 0:
            # In the middle of a repeated step: more of the same, or nothing.
            if step.where(self._record(event, bound)):
                return self._count(p, index, event, now, event_id)
            return p
        target, guards = self._plan[index]
        record = self._record(event, bound)
        for where in guards:
            if where(record):
                return None
        if target is None:
            return p  # waiting at a trailing "not" for the window to close
        if self.steps[target].where(record):
            return self._count(p, target, event, now, event_id)
        return p

    def _count(self, p, index, event, now, event_id):
        step = self.steps[index]
        count = (p["c"] if p["i"] == index else 0) + 1
        ev = [*p["ev"], _evidence(event_id, now, step=step.name)]
        bound = p["b"]
        if self.bind_events:
            fields = self.bind_fields
            if fields is None:
                bound = {**bound, step.name: dict(event)}
            elif step.name in fields:
                wanted = fields[step.name]
                kept = dict(event) if wanted is None else {f: event[f] for f in wanted if f in event}
                bound = {**bound, step.name: kept}
        new = {"s": p["s"], "i": index, "c": count, "ev": ev, "b": bound}
        if count < step.times:
            return new
        nxt = index + 1
        if nxt >= len(self.steps):
            new["done"] = True
            return new
        new["i"], new["c"] = nxt, 0
        return new

    def _complete(self, p, at) -> Match:
        return Match(at, list(p["ev"]), {"started": p["s"], "steps": [s.name for s in self.steps]})

    def _dedupe(self, partials: list[dict]) -> list[dict]:
        if len(partials) < 2:
            return partials  # the common case: nothing to choose between or sort
        best: dict[tuple[int, int], dict] = {}
        for p in partials:
            pos = (p["i"], p["c"])
            if pos not in best:
                best[pos] = p
            elif self._waiting_at_end(p):
                # Waiting at a trailing "not": the earliest-started completes first (and
                # its match drops the others), so it is the one to keep.
                if p["s"] < best[pos]["s"]:
                    best[pos] = p
            elif p["s"] >= best[pos]["s"]:
                # Anywhere else the latest-started expires last and has the same future.
                best[pos] = p
        return sorted(best.values(), key=lambda p: p["s"])

    def on_timer(self, state, now):
        partials = (state or {}).get("p", [])
        live, due = self._expire(partials, now)
        if len(live) == len(partials):
            return state, []
        return {"p": live}, due

    def deadline(self, state):
        waiting = [p["s"] + self.within for p in (state or {}).get("p", [])
                   if self._waiting_at_end(p)]
        return min(waiting) if waiting else None


Sequence = Sequence_


@dataclass
class Absence(Matcher):
    """No ``expect`` event within ``within`` seconds after a ``trigger`` event.

    A new trigger re-arms the timer when its own deadline is later than the pending
    one (a heartbeat that is both trigger and expected event keeps pushing the
    deadline); a late trigger whose deadline is earlier leaves the pending one alone.
    An expected event clears the pending trigger only if its own time is between the
    trigger's time and the deadline (both included); one whose own time is past the
    deadline first fires the overdue alert: event time decides, not arrival.
    """

    trigger: Predicate
    expect: Predicate
    within: float
    kind = "absence"
    has_timers = True

    def step(self, state, event, now, event_id=None):
        pending = state or {}
        matches: list[Match] = []
        changed = False
        if pending.get("d") is not None and now > pending["d"]:
            matches.append(self._fire(pending))
            pending, changed = {}, True
        if pending.get("d") is not None and self.expect(event) and \
                pending["t"]["ts"] <= now <= pending["d"]:
            # Only an expected event from after the trigger answers it (a late one from
            # before the trigger does not); one past the deadline already fired above.
            pending, changed = {}, True
        if self.trigger(event) and (pending.get("d") is None or now + self.within > pending["d"]):
            # A late trigger whose deadline is earlier than the pending one does not move
            # the deadline back (and does not forget the later trigger).
            pending = {"d": now + self.within, "t": _evidence(event_id, now)}
            changed = True
        return (pending if changed else state), matches

    def _fire(self, pending) -> Match:
        return Match(pending["d"], [pending["t"]], {"within": self.within, "deadline": pending["d"]})

    def on_timer(self, state, now):
        # Due only once the clock is past the deadline: an expected event exactly at it
        # is in time (``step``), so a tick exactly at it must not fire either.
        if state and state.get("d") is not None and now > state["d"]:
            return {}, [self._fire(state)]
        return state, []

    def deadline(self, state):
        return state.get("d") if state else None


__all__ = [
    "Absence", "Anomaly", "BOUND_KEY", "Frequency", "Match", "Matcher", "Predicate", "SeqStep",
    "Sequence", "Threshold", "Trend", "always", "least_squares_slope", "mean_std", "z_score",
]
