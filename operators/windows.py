"""Window assignment and per-key window state, for every window type.

Times are integer milliseconds (no float drift at window edges). One key's state is a
JSON-serializable dict, so it can live as one value of a changelog-backed table:

``{"w": [window, ...], "r": [[ts, values], ...], "c": n, "o": {"<src partition>": offset}}``

where a window is ``{"s": start, "e": end, "n": records, "a": aggregation states}``.
``r`` (sliding windows' record buffer) and ``c`` (count windows' record counter) exist
only for those types; ``o`` lets the caller skip records it already applied (replays
after a crash), see ``already_applied``.

Stream time is the largest event time seen in a partition (as in Kafka Streams). The
caller owns it and passes it in, already including the record being processed.

Rules, per type (``grace`` admits out-of-order records):

- tumbling(size), hopping(size, step): epoch-aligned windows [s, s + size), s a multiple
  of step. A window is closed once ``end + grace <= stream_time``.
- sliding(max_difference d), in the Kafka Streams sense: each record at t defines the
  window [t - d, t] holding every record within d before it; a record also joins every
  still-open window [e - d, e] with e >= t. Closed once ``end + grace <= stream_time``.
- session(gap): a record within ``gap`` of a session joins it; a record within gap of
  two sessions merges them (late records can bridge sessions). A session [s, e] is
  closed once ``e + gap + grace < stream_time``; a record with ``ts + grace <
  stream_time`` is late, which guarantees it can never touch a closed session.
- count(size N, step S): windows over a key's record sequence numbers [k*S, k*S + N);
  step defaults to N (tumbling count windows); step < N gives sliding count windows.
  Closed once full. Count windows have no lateness.

A record that should fall in a window that is already closed is *late* for it: it is
applied to the windows that are still open and reported (``missed``) so the caller can
send it to the late-records topic and count it; it is never dropped silently.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from operators.aggregations import AggregateSet

WINDOW_TYPES = ("tumbling", "hopping", "sliding", "session", "count")


class WindowSpecError(ValueError):
    """A window spec is invalid; the message names the field."""


@dataclass(frozen=True)
class WindowRange:
    """A half-open time range [start, end) in ms."""

    start: int
    end: int


@dataclass(frozen=True)
class WindowSpec:
    """One window definition. Time fields are ms; count windows count records."""

    kind: str
    size: int = 0  # tumbling/hopping: ms; count: records
    step: int = 0  # hopping: ms; count: records
    gap: int = 0  # session: ms
    max_difference: int = 0  # sliding: ms
    grace: int = 0  # ms

    def __post_init__(self) -> None:
        k = self.kind
        if k not in WINDOW_TYPES:
            raise WindowSpecError(f"window type must be one of {', '.join(WINDOW_TYPES)}, not {k!r}")
        if self.grace < 0:
            raise WindowSpecError("grace must be >= 0")
        if k in ("tumbling", "hopping", "count") and self.size <= 0:
            raise WindowSpecError("size must be > 0")
        if k == "hopping" and not 0 < self.step <= self.size:
            raise WindowSpecError("step must be > 0 and <= size")
        if k == "count" and self.step and not 0 < self.step <= self.size:
            raise WindowSpecError("step must be > 0 and <= size")
        if k == "session" and self.gap <= 0:
            raise WindowSpecError("gap must be > 0")
        if k == "sliding" and self.max_difference <= 0:
            raise WindowSpecError("max_difference must be > 0")

    @property
    def hop(self) -> int:
        """The distance between window starts (tumbling: size)."""
        if self.kind == "tumbling":
            return self.size
        return self.step or self.size

    def describe(self) -> dict[str, Any]:
        """The spec as JSON (what a changed-spec check compares)."""
        return {k: v for k, v in self.__dict__.items() if v or k == "kind"}


#: The longest window span (seconds) and the most records of a count window. Past them
#: a spec is a mistake, and ms values would outgrow what JSON answers (64-bit) carry.
MAX_WINDOW_SECONDS = 10**9
MAX_WINDOW_RECORDS = 10**9


def to_ms(seconds: Any, name: str) -> int:
    """Seconds (number) from a config/API spec as integer ms; WindowSpecError if not."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise WindowSpecError(f"{name} must be a number of seconds")
    if abs(seconds) > MAX_WINDOW_SECONDS:
        raise WindowSpecError(f"{name} must be at most {MAX_WINDOW_SECONDS} seconds")
    return round(seconds * 1000)


def parse_window_spec(raw: Mapping[str, Any]) -> WindowSpec:
    """A WindowSpec from ``{type, size, step, gap, max_difference, grace}`` (seconds;
    count windows: size/step in records)."""
    if not isinstance(raw, Mapping):
        raise WindowSpecError("window must be an object")
    kind = raw.get("type")
    unknown = set(raw) - {"type", "size", "step", "gap", "max_difference", "grace"}
    if unknown:
        raise WindowSpecError(f"unknown window fields: {sorted(unknown)}")
    if kind == "count":
        size, step = raw.get("size"), raw.get("step", 0)
        for name, v in (("size", size), ("step", step)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise WindowSpecError(f"{name} of a count window must be an integer number of records")
            if abs(v) > MAX_WINDOW_RECORDS:
                raise WindowSpecError(f"{name} of a count window must be at most {MAX_WINDOW_RECORDS} records")
        return WindowSpec("count", size=size, step=step)
    ms = {k: to_ms(raw[k], k) for k in ("size", "step", "gap", "max_difference", "grace") if k in raw}
    return WindowSpec(str(kind), **ms)


def tumbling_range(ts: int, size: int) -> WindowRange:
    """The one tumbling window [start, start + size) that holds event time ts."""
    start = ts - ts % size
    return WindowRange(start, start + size)


def hopping_ranges(ts: int, size: int, step: int) -> list[WindowRange]:
    """Every hopping window [s, s + size), s a multiple of step, that holds ts; oldest first."""
    last = ts - ts % step
    starts = range(last, ts - size, -step)
    return [WindowRange(s, s + size) for s in reversed(starts)]


def time_ranges(spec: WindowSpec, ts: int) -> list[WindowRange]:
    """The fixed time windows (tumbling/hopping) that hold ts."""
    if spec.kind == "tumbling":
        return [tumbling_range(ts, spec.size)]
    return hopping_ranges(ts, spec.size, spec.step)


def close_time(spec: WindowSpec, window: Mapping[str, Any]) -> int | None:
    """The smallest stream time at which ``window`` is closed (None: count windows,
    which close when full)."""
    if spec.kind == "count":
        return None
    if spec.kind == "session":
        return window["e"] + spec.gap + spec.grace + 1
    if spec.kind == "sliding":
        return window["e"] + spec.grace + 1
    return window["e"] + spec.grace


def already_applied(state: Mapping[str, Any] | None, partition: int, offset: int) -> bool:
    """True when the record at (source partition, offset) was already applied to this
    key's state: a replay after a crash between the state flush and the offset commit."""
    if not state:
        return False
    seen = state.get("o", {}).get(str(partition))
    return seen is not None and offset <= seen


def mark_applied(state: dict[str, Any], partition: int, offset: int) -> None:
    """Remember that (source partition, offset) is in this key's state."""
    state.setdefault("o", {})[str(partition)] = offset


class Applied:
    """What one record did: the windows it updated and how many closed ones it missed.

    A slotted plain class, not a dataclass: one is made per record on the hot path."""

    __slots__ = ("updated", "missed", "merged_away", "created")

    def __init__(self) -> None:
        self.updated: list[dict[str, Any]] = []
        self.missed = 0
        #: Session windows that disappeared because they merged into an updated one
        #: (assigned, never appended to: the shared empty tuple saves a list per record).
        self.merged_away: Sequence[dict[str, Any]] = ()
        #: Whether the record opened a window (which may close earlier than the
        #: key's other windows: the caller's close index must look again).
        self.created = False

    @property
    def late(self) -> bool:
        return self.missed > 0


def new_state() -> dict[str, Any]:
    """The state of a key with no windows yet."""
    return {"w": []}


def _window(start: int, end: int, aggs: AggregateSet) -> dict[str, Any]:
    return {"s": start, "e": end, "n": 0, "a": aggs.init()}


def _add(window: dict[str, Any], aggs: AggregateSet, values: Mapping[str, Any], ts: int) -> None:
    aggs.add(window["a"], values, ts)
    window["n"] += 1


def _fixed_window(windows: list[dict[str, Any]], start: int, size: int, aggs: AggregateSet,
                  out: Applied) -> dict[str, Any]:
    """The window starting at ``start`` of a start-sorted list, created in place if missing.

    Why a scan: a key has few open windows (tumbling: usually one; hopping: size/step),
    and records mostly arrive in time order, so the match is usually the last window."""
    for i in range(len(windows) - 1, -1, -1):
        w = windows[i]
        s = w["s"]
        if s == start:
            return w
        if s < start:
            w = _window(start, start + size, aggs)
            windows.insert(i + 1, w)
            out.created = True
            return w
    w = _window(start, start + size, aggs)
    windows.insert(0, w)
    out.created = True
    return w


def apply_record(
    spec: WindowSpec, aggs: AggregateSet, state: dict[str, Any], ts: int,
    values: Mapping[str, Any], stream_time: int,
) -> Applied:
    """Apply one record (event time ``ts``, values from ``aggs.extract``) to a key's
    state in place. ``stream_time`` already includes this record."""
    kind = spec.kind
    windows: list[dict[str, Any]] | None = state.get("w")
    if windows is None:
        windows = state["w"] = []
    out = Applied()
    if kind == "tumbling":
        # The hot case, written out: exactly one window [start, start + size) holds ts,
        # and records mostly arrive in time order, so it is the newest window or a new
        # one after it. Same rules as the general fixed-window walk below.
        size = spec.size
        start = ts - ts % size
        if start + size <= stream_time - spec.grace:
            out.missed = 1
            return out
        w = windows[-1] if windows else None
        if w is not None and w["s"] == start:
            aggs.add(w["a"], values, ts)
            w["n"] += 1
        elif w is None or w["s"] < start:
            w = {"s": start, "e": start + size, "n": 1, "a": aggs.add(aggs.init(), values, ts)}
            windows.append(w)
            out.created = True
        else:
            w = _fixed_window(windows, start, size, aggs, out)
            aggs.add(w["a"], values, ts)
            w["n"] += 1
        out.updated.append(w)
        return out
    if kind == "hopping":
        # Window assignment by arithmetic (no range objects): the starts are the
        # multiples of the hop in (ts - size, ts], oldest first. Windows stay sorted
        # by start, which for a fixed size is also the order in which they close.
        size = spec.size
        hop = spec.step
        horizon = stream_time - spec.grace  # a window with end <= horizon is closed
        last = ts - ts % hop
        start = last - (size - (ts - last) - 1) // hop * hop
        add = aggs.add
        if len(windows) < 2:
            while start <= last:
                if start + size <= horizon:
                    out.missed += 1
                else:
                    w = _fixed_window(windows, start, size, aggs, out)
                    add(w["a"], values, ts)
                    w["n"] += 1
                    out.updated.append(w)
                start += hop
            return out
        # Hopping: the starts ascend, so one forward walk over the sorted windows finds
        # or places every one of them (no rescans per start).
        i, n = 0, len(windows)
        while start <= last:
            if start + size <= horizon:
                out.missed += 1
            else:
                while i < n and windows[i]["s"] < start:
                    i += 1
                if i < n and windows[i]["s"] == start:
                    w = windows[i]
                else:
                    w = _window(start, start + size, aggs)
                    windows.insert(i, w)
                    n += 1
                    out.created = True
                add(w["a"], values, ts)
                w["n"] += 1
                out.updated.append(w)
                i += 1
            start += hop
    elif kind == "count":
        index = state.get("c", 0)
        state["c"] = index + 1
        size, step = spec.size, spec.hop
        by_start = {w["s"]: w for w in windows}
        first_k = max(state.get("b", 0) // step, (index - size) // step + 1)
        for k in range(first_k, index // step + 1):
            start = k * step
            if not start <= index < start + size:
                continue
            w = by_start.get(start)
            if w is None:
                w = _window(start, start + size, aggs)
                windows.append(w)
            _add(w, aggs, values, ts)
            out.updated.append(w)
        windows.sort(key=lambda w: w["s"])
    elif kind == "session":
        if ts + spec.grace < stream_time:
            out.missed = 1
            return out
        near = [w for w in windows if w["s"] - spec.gap <= ts <= w["e"] + spec.gap]
        merged = _window(ts, ts, aggs)
        _add(merged, aggs, values, ts)
        for w in near:
            merged = {
                "s": min(merged["s"], w["s"]),
                "e": max(merged["e"], w["e"]),
                "n": merged["n"] + w["n"],
                "a": aggs.merge(w["a"], merged["a"]),
            }
        if near:
            # Every session it touched is replaced by the merged one (new bounds).
            out.merged_away = [w for w in near if (w["s"], w["e"]) != (merged["s"], merged["e"])]
            state["w"] = [w for w in windows if not any(w is x for x in near)]
        state["w"].append(merged)
        state["w"].sort(key=lambda w: w["s"])
        out.updated.append(merged)
        # A merge only moves a session's close later, which the index finds on its
        # own (an early entry is looked at again); a new session may close first.
        out.created = not near
    elif kind == "sliding":
        d = spec.max_difference
        buffer: list[list[Any]] = state.setdefault("r", [])
        own_exists = False
        for w in windows:
            if w["e"] - d <= ts <= w["e"]:
                own_exists = own_exists or w["e"] == ts
                if w["e"] + spec.grace < stream_time:
                    out.missed += 1
                    continue
                _add(w, aggs, values, ts)
                out.updated.append(w)
        if not own_exists:
            if ts + spec.grace < stream_time:
                out.missed += 1
            else:
                w = _window(ts - d, ts, aggs)
                lo = bisect.bisect_left(buffer, ts - d, key=lambda r: r[0])
                hi = bisect.bisect_right(buffer, ts, key=lambda r: r[0])
                for rts, rvalues in buffer[lo:hi]:
                    _add(w, aggs, rvalues, rts)
                _add(w, aggs, values, ts)
                windows.append(w)
                windows.sort(key=lambda w: w["e"])
                out.updated.append(w)
                out.created = True
        if ts >= _sliding_horizon(spec, stream_time):
            # Only records a future window [t' - d, t'] could hold are kept.
            bisect.insort_right(buffer, [ts, dict(values)], key=lambda r: r[0])
        _trim_sliding_records(spec, state, stream_time)
    else:  # pragma: no cover - WindowSpec validates kind
        raise WindowSpecError(kind)
    return out


def expire(spec: WindowSpec, state: dict[str, Any], stream_time: int) -> list[dict[str, Any]]:
    """Remove and return the windows of this key that are closed at ``stream_time``
    (count windows: the full ones), oldest end first."""
    windows = state.get("w", ())
    kind = spec.kind
    if kind == "tumbling" or kind == "hopping":
        # Sorted by start = by end (fixed size): the closed ones are a prefix.
        horizon = stream_time - spec.grace
        n = 0
        for w in windows:
            if w["e"] > horizon:
                break
            n += 1
        if not n:
            return []
        if n == len(windows):
            # All of them (a tumbling key's one window, usually): hand over the list.
            state["w"] = []
            return windows  # type: ignore[return-value]
        closed = windows[:n]
        del windows[:n]
        return closed
    if kind == "count":
        closed = [w for w in windows if w["n"] >= spec.size]
    else:
        closed = [w for w in windows if close_time(spec, w) <= stream_time]
    if closed:
        state["w"] = [w for w in windows if not any(w is c for c in closed)]
    if spec.kind == "sliding":
        _trim_sliding_records(spec, state, stream_time)
    return sorted(closed, key=lambda w: (w["e"], w["s"]))


def _sliding_horizon(spec: WindowSpec, stream_time: int) -> int:
    """The oldest record time a sliding window still open at ``stream_time`` (or
    opened after it) can hold: its end is at least ``stream_time - grace``."""
    return stream_time - spec.grace - spec.max_difference


def _trim_sliding_records(spec: WindowSpec, state: dict[str, Any], stream_time: int) -> None:
    """Drop the buffered records (``r``) no sliding window can hold at ``stream_time``."""
    buf = state.get("r")
    if buf and buf[0][0] < (horizon := _sliding_horizon(spec, stream_time)):
        del buf[:bisect.bisect_left(buf, horizon, key=lambda r: r[0])]


def close_all(spec: WindowSpec, state: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Remove and return every open window (idle close), with the stream time at which
    all of them count as closed (so later records for them are late)."""
    closed = sorted(state.get("w", []), key=lambda w: (w["e"], w["s"]))
    state["w"] = []
    times = [close_time(spec, w) for w in closed]
    closed_at = max((t for t in times if t is not None), default=0)
    if spec.kind == "sliding":
        _trim_sliding_records(spec, state, closed_at)
    if spec.kind == "count" and closed:
        # Later records start a new window: the closed ones are never made again.
        step = spec.hop
        base = max(state.get("c", 0), max(w["e"] for w in closed) - spec.size + step)
        state["c"] = state["b"] = -(-base // step) * step
    return closed, closed_at


def next_close(spec: WindowSpec, state: Mapping[str, Any]) -> int | None:
    """The earliest stream time at which one of this key's windows closes."""
    kind = spec.kind
    if kind == "tumbling" or kind == "hopping":
        windows = state.get("w")
        return windows[0]["e"] + spec.grace if windows else None
    times = [close_time(spec, w) for w in state.get("w", [])]
    return min((t for t in times if t is not None), default=None)


def window_result(spec: WindowSpec, aggs: AggregateSet, window: Mapping[str, Any]) -> dict[str, Any]:
    """One window as output: its bounds, record count and aggregate values."""
    return {
        "window_type": spec.kind,
        "start": window["s"],
        "end": window["e"],
        "count": window["n"],
        "aggregates": aggs.result(window["a"]),
    }
