"""Window assignment and state: every window type's closed windows equal an
independent recomputation (a fold) over the same records; late records are reported."""

from __future__ import annotations

import random
from collections import defaultdict

import orjson
import pytest

from operators.aggregations import AggregateSet, AggSpec
from operators.window_buffer import WriteBackBuffer
from operators.windows import (
    WindowSpec,
    WindowSpecError,
    already_applied,
    apply_record,
    close_all,
    expire,
    hopping_ranges,
    mark_applied,
    parse_window_spec,
    tumbling_range,
    window_result,
)

AGGS = AggregateSet([AggSpec("n", "count"), AggSpec("total", "sum", "v")])


def run(spec, records):
    """Drive the operator like the agent does: per-key state, partition stream time,
    expire after each record, close everything at the end. Returns
    ({(key, start, end): (count, total)}, late records)."""
    states: dict[str, dict] = {}
    stream_time = 0
    out, late = {}, []
    for key, ts, v in records:
        stream_time = max(stream_time, ts)
        state = states.setdefault(key, {"w": []})
        applied = apply_record(spec, AGGS, state, ts, AGGS.extract({"v": v}), stream_time)
        if applied.late:
            late.append((key, ts, v))
        states[key] = orjson.loads(orjson.dumps(state))  # the changelog round trip
        for k, s in states.items():
            for w in expire(spec, s, stream_time):
                r = window_result(spec, AGGS, w)
                out[(k, r["start"], r["end"])] = (r["count"], r["aggregates"]["total"])
    for k, s in states.items():
        closed, _ = close_all(spec, s)
        for w in closed:
            out[(k, w["s"], w["e"])] = (w["n"], w["a"]["total"])
    return out, late


def records(n=400, keys=5, span=60_000, seed=1, disorder=0):
    rng = random.Random(seed)
    ts = 1_700_000_000_000
    recs = []
    for _ in range(n):
        ts += rng.randrange(0, span // n * 2)
        recs.append((f"k{rng.randrange(keys)}", ts - rng.randrange(disorder + 1), rng.randint(1, 9)))
    return recs


def test_ranges():
    assert tumbling_range(12_345, 10_000).start == 10_000
    assert [r.start for r in hopping_ranges(65_000, 60_000, 10_000)] == [10_000, 20_000, 30_000, 40_000, 50_000, 60_000]
    assert [r.start for r in hopping_ranges(60_000, 60_000, 10_000)][0] == 10_000


def test_tumbling_equals_fold_with_disorder_within_grace():
    spec = WindowSpec("tumbling", size=5_000, grace=2_000)
    recs = records(disorder=1_500)
    got, late = run(spec, recs)
    assert late == []
    want = defaultdict(lambda: [0, 0])
    for k, ts, v in recs:
        s = ts - ts % 5_000
        want[(k, s, s + 5_000)][0] += 1
        want[(k, s, s + 5_000)][1] += v
    assert got == {k: tuple(v) for k, v in want.items()}


def test_hopping_equals_fold():
    spec = WindowSpec("hopping", size=6_000, step=2_000, grace=0)
    recs = records()
    got, late = run(spec, recs)
    assert late == []
    want = defaultdict(lambda: [0, 0])
    for k, ts, v in recs:
        for s in range(ts - ts % 2_000, ts - 6_000, -2_000):
            want[(k, s, s + 6_000)][0] += 1
            want[(k, s, s + 6_000)][1] += v
    assert got == {k: tuple(v) for k, v in want.items()}


def test_late_records_past_grace_are_reported_and_fold_excludes_them():
    spec = WindowSpec("tumbling", size=5_000, grace=1_000)
    recs = records(disorder=8_000, seed=5)
    got, late = run(spec, recs)
    assert late, "the input has records later than the grace"
    # Recompute: a record is late when its window's end + grace <= stream time so far.
    want, want_late, st = defaultdict(lambda: [0, 0]), [], 0
    for k, ts, v in recs:
        st = max(st, ts)
        s = ts - ts % 5_000
        if s + 5_000 + 1_000 <= st:
            want_late.append((k, ts, v))
            continue
        want[(k, s, s + 5_000)][0] += 1
        want[(k, s, s + 5_000)][1] += v
    assert late == want_late
    assert got == {k: tuple(v) for k, v in want.items()}


def test_session_equals_fold_over_sorted_records():
    spec = WindowSpec("session", gap=3_000, grace=5_000)
    recs = records(n=300, span=200_000, disorder=2_000, seed=9)
    got, late = run(spec, recs)
    assert late == []
    want = {}
    by_key = defaultdict(list)
    for k, ts, v in recs:
        by_key[k].append((ts, v))
    for k, items in by_key.items():
        items.sort()
        cur = None
        for ts, v in items:
            if cur is not None and ts - cur[1] <= 3_000:
                cur = [cur[0], ts, cur[2] + 1, cur[3] + v]
            else:
                if cur:
                    want[(k, cur[0], cur[1])] = (cur[2], cur[3])
                cur = [ts, ts, 1, v]
        want[(k, cur[0], cur[1])] = (cur[2], cur[3])
    assert got == want


def test_a_late_record_bridges_two_sessions_into_one():
    spec = WindowSpec("session", gap=6_000, grace=10_000)
    state, st = {"w": []}, 0
    for ts in (0, 1_000, 12_000, 13_000):
        st = max(st, ts)
        apply_record(spec, AGGS, state, ts, {"n": None, "total": 1}, st)
    assert [(w["s"], w["e"]) for w in state["w"]] == [(0, 1_000), (12_000, 13_000)]
    applied = apply_record(spec, AGGS, state, 6_500, {"n": None, "total": 1}, st)
    assert not applied.late
    assert [(w["s"], w["e"], w["n"]) for w in state["w"]] == [(0, 13_000, 5)]
    assert {(w["s"], w["e"]) for w in applied.merged_away} == {(0, 1_000), (12_000, 13_000)}
    # Past the grace, the same bridge is late and touches nothing.
    state2, st = {"w": [{"s": 0, "e": 0, "n": 1, "a": AGGS.init()}]}, 40_000
    assert apply_record(spec, AGGS, state2, 4_000, {"n": None, "total": 1}, st).late


def test_sliding_equals_fold():
    spec = WindowSpec("sliding", max_difference=4_000, grace=3_000)
    recs = records(n=200, span=100_000, disorder=2_000, seed=4)
    got, late = run(spec, recs)
    assert late == []
    want = {}
    by_key = defaultdict(list)
    for k, ts, v in recs:
        by_key[k].append((ts, v))
    for k, items in by_key.items():
        for t in {ts for ts, _ in items}:
            inside = [v for ts, v in items if t - 4_000 <= ts <= t]
            want[(k, t - 4_000, t)] = (len(inside), sum(inside))
    assert got == want


@pytest.mark.parametrize("size,step", [(4, 4), (5, 2)])
def test_count_windows_equal_fold(size, step):
    spec = WindowSpec("count", size=size, step=step)
    recs = records(n=100, seed=2)
    got, late = run(spec, recs)
    assert late == []
    want = {}
    by_key = defaultdict(list)
    for k, _ts, v in recs:
        by_key[k].append(v)
    for k, vs in by_key.items():
        for s in range(0, len(vs), step):
            chunk = vs[s : s + size]
            want[(k, s, s + size)] = (len(chunk), sum(chunk))
    assert got == want


def test_replayed_records_are_recognised():
    state = {"w": []}
    assert not already_applied(state, 2, 10)
    mark_applied(state, 2, 10)
    assert already_applied(state, 2, 10) and already_applied(state, 2, 3)
    assert not already_applied(state, 2, 11) and not already_applied(state, 1, 3)


def test_spec_validation():
    assert parse_window_spec({"type": "hopping", "size": 60, "step": 10}) == WindowSpec("hopping", size=60_000, step=10_000)
    assert parse_window_spec({"type": "count", "size": 100}).size == 100
    for bad in ({"type": "tumbling", "size": 0}, {"type": "hopping", "size": 10, "step": 20},
                {"type": "session"}, {"type": "sliding", "max_difference": -1},
                {"type": "nope", "size": 1}, {"type": "count", "size": 1.5},
                {"type": "tumbling", "size": "10"}, {"type": "tumbling", "size": 5, "bogus": 1}):
        with pytest.raises(WindowSpecError):
            parse_window_spec(bad)


def test_write_back_buffer_writes_each_dirty_key_once_per_flush():
    buf = WriteBackBuffer(max_entries=2)
    store = {"a": 1}
    writes = []
    for i in range(10):
        v = buf.get("a", lambda: store["a"]) + 1
        buf.put("a", v, partition=0)
        buf.put(f"k{i % 2}", i, partition=1)
    assert buf.loads == 1
    n = buf.flush(lambda k, v, p: writes.append((k, v, p)))
    assert n == 3 and sorted(writes) == [("a", 11, 0), ("k0", 8, 1), ("k1", 9, 1)]
    assert buf.flush(lambda *a: writes.append(a)) == 0
    assert len(buf) <= 2
    buf.put("x", 1, 0)
    with pytest.raises(RuntimeError):
        buf.clear()


def test_fixed_window_assignment_equals_the_ranges():
    # Arithmetic assignment (apply_record) against hopping_ranges/tumbling_range, also
    # when size is not a multiple of step and for negative times.
    for kind, size, step in (("tumbling", 10, 0), ("hopping", 60, 10), ("hopping", 25, 10),
                             ("hopping", 7, 3), ("hopping", 9, 1)):
        spec = WindowSpec(kind, size=size, step=step)
        for ts in range(-40, 130):
            state = {"w": []}
            applied = apply_record(spec, AGGS, state, ts, {"n": None, "total": 1}, ts)
            want = ([(tumbling_range(ts, size).start, tumbling_range(ts, size).end)] if kind == "tumbling"
                    else [(r.start, r.end) for r in hopping_ranges(ts, size, step)])
            assert [(w["s"], w["e"]) for w in applied.updated] == want
            assert [(w["s"], w["e"]) for w in state["w"]] == want


def test_out_of_order_records_keep_fixed_windows_sorted_and_expire_in_order():
    spec = WindowSpec("hopping", size=6_000, step=2_000, grace=10_000)
    state, st = {"w": []}, 0
    for ts in (9_000, 1_000, 5_500, 13_000, 3_000):
        st = max(st, ts)
        apply_record(spec, AGGS, state, ts, {"n": None, "total": 1}, st)
    starts = [w["s"] for w in state["w"]]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    closed = expire(spec, state, 20_000)
    assert [w["e"] for w in closed] == sorted(w["e"] for w in closed)
    assert all(w["e"] + 10_000 <= 20_000 for w in closed)
    assert all(w["e"] + 10_000 > 20_000 for w in state["w"])


def test_write_back_buffer_take_and_restore_dirty():
    buf = WriteBackBuffer()
    buf.put("a", 1, 0)
    buf.put("b", 2, 1)
    taken = buf.take_dirty()
    assert sorted(taken) == [("a", 1, 0), ("b", 2, 1)] and buf.dirty_count == 0
    buf.put("a", 5, 0)  # updated while the failed write was under way: newer value stays
    buf.restore_dirty(taken)
    assert buf.dirty_count == 2
    assert sorted(buf.take_dirty()) == [("a", 5, 0), ("b", 2, 1)]


def test_out_of_order_tumbling_records_land_in_their_window_and_keep_windows_sorted():
    # apply_record's tumbling path: the newest window, a new one after it, an older
    # open window, or a new window between/before open ones (records out of order
    # within grace); each record counted once in the window that holds it.
    spec = WindowSpec("tumbling", size=4_000, grace=20_000)
    state, st, want = {"w": []}, 0, {}
    for ts in (9_000, 9_500, 1_000, 13_000, 5_500, 1_200, 14_000, 5_000, -3_000):
        st = max(st, ts)
        applied = apply_record(spec, AGGS, state, ts, {"n": None, "total": ts}, st)
        start = ts - ts % 4_000
        assert [(w["s"], w["e"]) for w in applied.updated] == [(start, start + 4_000)]
        n, total = want.get(start, (0, 0))
        want[start] = (n + 1, total + ts)
    starts = [w["s"] for w in state["w"]]
    assert starts == sorted(want)
    assert {w["s"]: (w["n"], w["a"]["total"]) for w in state["w"]} == want
    assert all(w["n"] == w["a"]["n"] for w in state["w"])


def test_a_sliding_window_without_grace_holds_the_record_that_defines_it():
    """A sliding window [t - d, t] includes its end, so it closes once stream time is
    past ``t + grace``: with no grace (the default) the record at stream time opens its
    window instead of being late for it."""
    spec = WindowSpec("sliding", max_difference=5_000)
    recs = [("k", 100_000 + i * 1_000, 1) for i in range(20)]
    got, late = run(spec, recs)
    assert late == []
    assert got == {("k", t - 5_000, t): (min(6, 1 + (t - 100_000) // 1_000), min(6, 1 + (t - 100_000) // 1_000))
                   for _k, t, _v in recs}


def test_a_sliding_keys_record_buffer_stays_bounded_when_its_records_are_late():
    """A key whose records always arrive behind stream time opens no window (each is
    late for its own), so it is never closed: its buffer must still drop the records no
    future window can hold."""
    spec = WindowSpec("sliding", max_difference=60_000, grace=1_000)
    state = {"w": []}
    for i in range(2_000):
        stream_time = 1_000_000 + i * 1_000
        apply_record(spec, AGGS, state, stream_time - 5_000, AGGS.extract({"v": 1}), stream_time)
    assert len(state["r"]) <= 62


@pytest.mark.parametrize("size,step", [(3, 3), (4, 2)])
def test_a_count_window_closed_by_the_idle_rule_is_not_made_again(size, step):
    """After an idle close the key's next records start new count windows: a closed
    window is never made again (emitted twice, with other values) nor left unfillable."""
    spec = WindowSpec("count", size=size, step=step)
    state = {"w": []}
    emitted: dict[tuple[int, int], int] = {}

    def emit(windows):
        for w in windows:
            assert (w["s"], w["e"]) not in emitted, f"window {w['s'], w['e']} emitted twice"
            emitted[w["s"], w["e"]] = w["n"]

    for i in range(2):
        apply_record(spec, AGGS, state, i, AGGS.extract({"v": 1}), i)
    emit(close_all(spec, state)[0])
    for i in range(2, 40):
        apply_record(spec, AGGS, state, i, AGGS.extract({"v": 1}), i)
        emit(expire(spec, state, i))
    assert sum(1 for n in emitted.values() if n == size) >= 38 // step - 2
    emit(close_all(spec, state)[0])  # the next idle close


def test_a_sliding_window_after_an_idle_close_holds_the_records_before_it():
    """The idle close keeps the records a later window can still hold: an on-time
    record after it gets a window with the records within max_difference before it."""
    spec = WindowSpec("sliding", max_difference=5_000, grace=1_000)
    state = {"w": []}
    for ts in (100_000, 101_000):
        apply_record(spec, AGGS, state, ts, AGGS.extract({"v": 1}), ts)
    _, closed_at = close_all(spec, state)
    applied = apply_record(spec, AGGS, state, 103_000, AGGS.extract({"v": 1}), max(closed_at, 103_000))
    assert not applied.late
    assert [(w["s"], w["e"], w["n"]) for w in applied.updated] == [(98_000, 103_000, 3)]


def test_clearing_a_cache_keeps_the_values_a_write_in_flight_is_storing():
    """Values taken by a write still under way are not in the store yet: a clear (a
    rebalance's reset) must not drop them, or the next read finds the older stored
    value and its update is lost."""
    buf = WriteBackBuffer()
    buf.put("a", 1, 0)
    buf.put("b", 2, 0)
    buf._writing = buf.dirty_keys  # what a snapshot's take does (tables.store)
    buf.dirty_keys = {}
    buf.put("c", 3, 0)
    buf.take_dirty()  # "c" written: clean
    buf.clear()
    assert buf.cached == {"a": 1, "b": 2}
    buf._writing = {}
    buf.clear()
    assert buf.cached == {}
