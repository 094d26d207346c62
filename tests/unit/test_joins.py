"""Interval joins (operators/joins.py): the output equals a fold of the inputs computed
from the definition, for every join type, with out-of-order and late arrivals,
duplicates, many matches per key and unmatched records on both sides."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from operators.joins import BatchJoin, IntervalJoin, JoinSpec, merged
from operators.steps import MemoryContext, StepSpecError, parse_steps, run_batch


def spec(**kw) -> JoinSpec:
    base = dict(on=("k",), before=10.0, after=10.0, grace=5.0, type="inner", time_field="ts")
    base.update(kw)
    return JoinSpec(**base)


def arrivals(left, right):
    """The order BatchJoin reads the two lists in (smaller head time first, left on a tie)."""
    i = j = 0
    while i < len(left) or j < len(right):
        if j == len(right) or (i < len(left) and left[i]["ts"] <= right[j]["ts"]):
            yield "l", left[i]
            i += 1
        else:
            yield "r", right[j]
            j += 1


def fold(js: JoinSpec, left, right):
    """The join by its definition: drop late records (below stream time minus the
    grace, stream time being the smaller of the two sides' largest earlier times), pair
    every remaining left and right record of one key within the bounds, add the
    unmatched records the join type emits."""
    side_time, kept = {"l": float("-inf"), "r": float("-inf")}, {"l": [], "r": []}
    for side, rec in arrivals(left, right):
        if rec["ts"] < min(side_time.values()) - js.grace:
            continue
        side_time[side] = max(side_time[side], rec["ts"])
        kept[side].append(rec)
    out, matched_l, matched_r = [], set(), set()
    for a, lrec in enumerate(kept["l"]):
        for b, r in enumerate(kept["r"]):
            if lrec["k"] == r["k"] and lrec["ts"] - js.before <= r["ts"] <= lrec["ts"] + js.after:
                out.append({"left": lrec, "right": r, "ts": max(lrec["ts"], r["ts"])})
                matched_l.add(a)
                matched_r.add(b)
    if js.type in ("left", "outer"):
        out += [{"left": lrec, "right": None, "ts": lrec["ts"]} for a, lrec in enumerate(kept["l"]) if a not in matched_l]
    if js.type == "outer":
        out += [{"left": None, "right": r, "ts": r["ts"]} for b, r in enumerate(kept["r"]) if b not in matched_r]
    return out


def as_multiset(records):
    return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records)


def random_stream(rng: random.Random, n: int, side: str, keys: int, disorder: float):
    records, t = [], 0.0
    for i in range(n):
        t += rng.uniform(0, 3)
        # Some records come late by up to 20 s (beyond the grace of 5 s sometimes).
        ts = t - rng.uniform(0, 20) if rng.random() < disorder else t
        records.append({"k": rng.randrange(keys), "ts": round(ts, 3), "id": f"{side}{i}"})
    # A duplicate or two: same content twice.
    for _ in range(2):
        pos = rng.randrange(len(records))
        records.insert(pos + 1, dict(records[pos]))
    return records


@pytest.mark.parametrize("join_type", ["inner", "left", "outer"])
@pytest.mark.parametrize("seed", range(8))
def test_join_equals_the_fold(join_type, seed):
    rng = random.Random(seed)
    js = spec(type=join_type, before=rng.choice([0.0, 4.0, 10.0]), after=rng.choice([0.0, 6.0, 10.0]))
    left = random_stream(rng, 150, "l", keys=12, disorder=0.2)
    right = random_stream(rng, 150, "r", keys=12, disorder=0.2)
    batch = BatchJoin(js)
    counts = batch.run(left, right)
    expected = fold(js, left, right)
    assert as_multiset(batch.outputs) == as_multiset(expected)
    assert counts.late == len(batch.late) > 0
    assert counts.pairs == sum(1 for r in expected if r["left"] and r["right"])


@pytest.mark.parametrize("join_type", ["inner", "left", "outer"])
@pytest.mark.parametrize("encoded_outputs", [True, False])
def test_records_added_with_their_bytes_join_as_records_do(join_type, encoded_outputs):
    """``add(side, record, raw)`` (the live join: each record buffered with its bytes,
    ``Held``) gives the same outputs as the records themselves, written as they are
    (``merged(..., encoded=True)``: the bytes embedded as they arrived) or read, in
    both output shapes; the buffers' JSON is the plain layout's."""
    rng = random.Random(3)
    for prefixes in (None, ("l_", "r_")):
        js = spec(type=join_type, before=4.0, after=6.0, prefixes=prefixes)
        left = random_stream(rng, 150, "l", keys=12, disorder=0.2)
        right = random_stream(rng, 150, "r", keys=12, disorder=0.2)
        plain, held = IntervalJoin(js), IntervalJoin(js, encoded_outputs=encoded_outputs)
        want, got = [], []
        for side, rec in arrivals(left, right):
            raw = orjson.dumps(rec).replace(b",", b", ")  # as a producer may write it
            want += [merged(j, js) for j in plain.add(side, dict(rec)) or ()]
            got += [orjson.loads(orjson.dumps(merged(j, js, encoded=True))) for j in held.add(side, dict(rec), raw) or ()]
            assert orjson.dumps(held.buffers).replace(b", ", b",") == orjson.dumps(plain.buffers)
        want += [merged(j, js) for j in plain.close_all()]
        got += [orjson.loads(orjson.dumps(merged(j, js, encoded=True))) for j in held.close_all()]
        assert as_multiset(got) == as_multiset(want) and want


def test_unmatched_left_is_emitted_once_when_its_interval_closes_never_before_a_match():
    join = IntervalJoin(spec(type="left", after=10.0, grace=5.0))
    assert join.add("l", {"k": 1, "ts": 100}) == []
    assert join.add("l", {"k": 3, "ts": 114}) == []
    # Stream time 114: the watermark (109) has not passed 100 + 10: still open.
    assert join.add("r", {"k": 2, "ts": 114}) == []
    # A partner at 110 still matches (it is not late: 110 >= 109).
    pairs = join.add("r", {"k": 1, "ts": 110})
    assert [(p.left["ts"], p.right["ts"], p.time) for p in pairs] == [(100, 110, 110)]
    join2 = IntervalJoin(spec(type="left", after=10.0, grace=5.0))
    join2.add("l", {"k": 1, "ts": 100})
    join2.add("l", {"k": 3, "ts": 115.5})
    assert join2.add("r", {"k": 2, "ts": 115}) == []  # watermark 110: not past 110 yet
    closed = join2.add("r", {"k": 2, "ts": 115.5})  # watermark 110.5 > 110: closes
    assert [(c.left["ts"], c.right) for c in closed] == [(100, None)]
    # A partner now would be late: nothing follows the unmatched record.
    assert join2.add("r", {"k": 1, "ts": 110}) is None
    assert join2.counts.unmatched == 1 and join2.counts.late == 1
    assert [c.left["k"] for c in join2.close_all()] == [3]


def test_a_side_read_ahead_makes_nothing_of_the_other_side_late():
    """Two topics are not read in step: the left side's backlog read far ahead leaves
    stream time at the right side's time, so the right records still to come are not
    late, and the left records wait for them instead of closing unmatched. (With stream
    time the larger of the two, every right record below was late and every left record
    closed unmatched.)"""
    join = IntervalJoin(spec(type="left", before=10.0, after=10.0, grace=5.0))
    for i in range(10):
        assert join.add("l", {"k": i, "ts": 100 + 20 * i}) == []
    assert join.stream_time == float("-inf")
    pairs = [p for i in range(10) for p in join.add("r", {"k": i, "ts": 101 + 20 * i})]
    assert [(p.left["k"], p.right["k"]) for p in pairs] == [(i, i) for i in range(10)]
    assert join.counts.late == join.counts.unmatched == 0


def test_many_matches_are_bounded_and_counted():
    join = IntervalJoin(spec(max_matches=3))
    for i in range(5):
        join.add("r", {"k": 1, "ts": 100 + i})
    pairs = join.add("l", {"k": 1, "ts": 102})
    assert [p.right["ts"] for p in pairs] == [100, 101, 102]
    assert join.counts.limited == 2


def test_buffers_are_plain_json_and_the_index_is_rebuilt_after_a_restore():
    join = IntervalJoin(spec(type="outer"))
    join.add("l", {"k": 1, "ts": 100})
    join.add("r", {"k": 2, "ts": 101})
    saved = orjson.loads(orjson.dumps(join.buffers))
    restored = IntervalJoin(join.spec, saved, join.times, join.seq)
    assert restored.add("l", {"k": 3, "ts": 200}) == []  # the right side is still at 101
    closed = restored.add("r", {"k": 4, "ts": 200})
    assert sorted((c.left or {}).get("ts", 0) + (c.right or {}).get("ts", 0) for c in closed) == [100, 101]
    assert sorted(restored.buffers) == ['3', '4']


def test_join_step_over_http_batch_with_prefixes_and_steps_after_it():
    steps = parse_steps([
        "normalize",
        {"op": "join", "on": "order_id", "within": "10m", "grace": "1m", "type": "left",
         "time_field": "ts", "prefix": {"left": "", "right": "payment_"},
         "with_records": [{"order_id": "a", "ts": "2026-01-01T10:05:00Z", "amount": 5}, "not a record"]},
        {"op": "map", "set": {"paid": "payment_amount != null"}},
    ])
    result = run_batch(steps, [{"Order_ID": "a", "ts": "2026-01-01T10:00:00Z"},
                               {"Order_ID": "b", "ts": "2026-01-01T10:01:00Z"}], MemoryContext())
    assert result.records == [
        {"order_id": "a", "ts": "2026-01-01T10:05:00Z", "payment_order_id": "a",
         "payment_ts": "2026-01-01T10:05:00Z", "payment_amount": 5, "paid": True},
        {"order_id": "b", "ts": "2026-01-01T10:01:00Z", "paid": False},
    ]
    assert [c.as_dict()["op"] for c in result.counts] == ["normalize", "join", "map"]
    assert result.failures == [{"index": 1, "side": "right", "step": 1, "op": "join",
                                "reason": "record is str, not an object"}]


@pytest.mark.parametrize("raw, param", [
    ({"op": "join", "on": "k", "within": 5}, "with"),
    ({"op": "join", "on": "k", "within": 5, "with": "t", "with_records": []}, "with"),
    ({"op": "join", "with": "t", "within": 5}, "on"),
    ({"op": "join", "with": "t", "on": "k"}, "within"),
    ({"op": "join", "with": "t", "on": "k", "within": "soon"}, "within"),
    ({"op": "join", "with": "t", "on": "k", "within": 5, "type": "cross"}, "type"),
    ({"op": "join", "with": "t", "on": "k", "within": 5, "prefix": {"left": "a", "right": "a"}}, "prefix"),
    ({"op": "join", "with": "t", "on": "k", "within": 5, "max_matches": 0}, "max_matches"),
])
def test_join_step_errors_name_the_parameter(raw, param):
    with pytest.raises(StepSpecError) as info:
        parse_steps([raw])
    assert info.value.param == param


def test_one_join_per_step_list():
    j = {"op": "join", "with_records": [], "on": "k", "within": 5}
    with pytest.raises(StepSpecError, match="one join"):
        parse_steps([j, j])


def test_an_idle_side_lets_stream_time_follow_the_other_side():
    """idle_close (mark_idle): without it a left join's unmatched record waits for the
    right side's time to move; once the right side is marked idle, its time follows
    the left side's, the interval closes and the record is emitted once; a right
    record that arrives afterwards for it is late, never a match after the unmatched
    emission; and the right side's next record ends its idleness."""
    join = IntervalJoin(spec(type="left", before=10.0, after=10.0, grace=5.0))
    assert join.add("r", {"k": 9, "ts": 0.0}) == []
    assert join.add("l", {"k": 1, "ts": 0.0, "id": "a"}) == []
    # Left moves on, right says nothing: stream time stays at the right side's 0.
    assert join.add("l", {"k": 2, "ts": 100.0}) == []
    assert [j.left["id"] for j in join.mark_idle("r")] == ["a"]
    assert join.mark_idle("r") == []  # marking it again closes nothing more
    # Idle, the right side's time follows the left side's as it moves.
    out = join.add("l", {"k": 3, "ts": 200.0})
    assert [j.left.get("k") for j in out] == [2]
    assert join.add("r", {"k": 1, "ts": 1.0}) is None  # late: its partner was emitted alone
    assert "r" not in join.idle  # input ends idleness
    assert join.counts.unmatched == 2 and join.counts.late == 1


def test_marking_idle_emits_the_unmatched_record_once():
    join = IntervalJoin(spec(type="left", before=10.0, after=10.0, grace=5.0))
    join.add("r", {"k": 9, "ts": 0.0})
    join.add("l", {"k": 1, "ts": 0.0, "id": "a"})
    join.add("l", {"k": 2, "ts": 100.0})
    out = join.mark_idle("r")
    assert [(j.left["id"], j.right, j.raw) for j in out] == [("a", None, 0.0)]
    assert join.times["r"] == 100.0 and join.stream_time == 100.0


def test_both_sides_idle_close_every_interval_and_later_partners_are_late():
    """Both sides of a partition idle: every interval closes (the unmatched records of
    both sides of an outer join are emitted), and the watermark moves past the last
    interval's end, so a partner arriving later is late, not a match."""
    join = IntervalJoin(spec(type="outer", before=10.0, after=10.0, grace=5.0))
    assert join.add("l", {"k": 1, "ts": 50.0}) == []
    assert join.add("r", {"k": 2, "ts": 52.0}) == []
    assert join.mark_idle("l") == []  # the right side is ahead: nothing closes yet
    out = join.mark_idle("r")
    assert sorted((j.left or j.right)["k"] for j in out) == [1, 2]
    assert join.buffers == {} and join.watermark > 62.0
    assert join.add("r", {"k": 1, "ts": 60.0}) is None
    assert join.add("l", {"k": 2, "ts": 62.0}) is None
    assert join.counts.unmatched == 2 and join.counts.pairs == 0


def test_idle_close_is_a_live_join_parameter():
    step = parse_steps([{"op": "join", "with": "payments", "on": "k", "within": "10s", "idle_close": "30s"}])[0]
    assert step.params[0].idle_close == 30.0
    with pytest.raises(StepSpecError) as err:
        parse_steps([{"op": "join", "with_records": [], "on": "k", "within": "10s", "idle_close": 5}])
    assert err.value.param == "idle_close"


def test_a_record_whose_pair_max_matches_left_out_is_not_emitted_alone():
    """A left record that had a partner in its interval is matched, even when
    ``max_matches`` kept that pair out: a left join never emits it as unmatched."""
    spec = JoinSpec(on=("k",), before=10.0, after=10.0, grace=0.0, type="left", time_field="ts", max_matches=1)
    j = IntervalJoin(spec)
    j.add("r", {"k": 0, "ts": 0})
    j.add("l", {"k": 1, "ts": 100, "id": "a"})
    j.add("l", {"k": 1, "ts": 101, "id": "b"})
    out = j.add("r", {"k": 1, "ts": 102})  # within both intervals; the limit keeps a's pair
    out += j.add("l", {"k": 2, "ts": 500}) + j.add("r", {"k": 2, "ts": 500})  # closes them
    alone = [o.left["id"] for o in out if o.right is None and o.left and "id" in o.left]
    assert alone == [] and j.counts.limited == 1


def test_entries_restored_newer_than_their_bookkeeping_are_numbered_after():
    """Buffers written by a commit can be newer than its bookkeeping value (its
    sequence): a restored join numbers new entries after the highest buffered one, or
    two entries share a number and ``close`` removes the wrong one."""
    spec = JoinSpec(on=("k",), before=10.0, after=10.0, grace=0.0, type="left", time_field="ts")
    buffers = {"1": {"l": [[100.0, 7, {"k": 1, "ts": 100}, False]], "r": []}}
    j = IntervalJoin(spec, buffers, {"l": 100.0, "r": 90.0}, seq=3)
    assert j.seq == 7
