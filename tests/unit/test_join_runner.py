"""The live join's processor (agents/join.py) without a broker: over the in-memory store
and emitter, its outputs equal the fold of operators-level reference (tests/unit/
test_joins.py) per partition, for every join type, with out-of-order and late records,
duplicates, many matches and unmatched records on both sides; a restart in the middle
(a new runner over the same store, after a commit) keeps the buffered records, and a
batch replayed after a crash between flush and commit is not buffered twice. The
pipeline config of a live join is checked (first step, stateless steps after it,
``with``), and so is the co-partitioning of its two topics."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest

from agents.join import JoinConfigError, JoinRunner, check_copartitioned
from app.commit import CommitProtocol, MemoryEmitter
from app.pipelines import PipelineConfigError, parse_pipelines
from operators.joins import IntervalJoin
from tables.store import MemoryStore
from tests.unit.test_joins import arrivals, as_multiset, fold, random_stream, spec

PARTITIONS = 3


class Rec:
    """A raw record of a batch-agent topic (offset, key, value, headers)."""

    __slots__ = ("offset", "timestamp", "key", "value", "headers")

    def __init__(self, offset, record):
        self.offset, self.timestamp, self.headers = offset, 1000, ()
        self.key = str(record.get("k")).encode()
        self.value = orjson.dumps(record)


class Sink:
    def __init__(self, name):
        self.name = name

    def get_topic_name(self):
        return self.name


def pipeline(join_type, before, after, grace=5.0, steps=()):
    step = {"op": "join", "with": "right", "on": "k", "before": before, "after": after, "grace": grace,
            "type": join_type, "time_field": "ts"}
    return parse_pipelines([{"name": "j", "source": "left", "sink": "out", "steps": [step, *steps]}])[0]


def runner(spec_, store, transactional=False):
    emitter = MemoryEmitter(transactional=transactional)
    commit = CommitProtocol(emitter, defer=not transactional)
    r = JoinRunner(spec_, None, SINK, LATE, left_name="left", right_name="right", store=store, commit=commit)
    r.checked = True  # no broker to ask for partition counts
    return r


SINK, LATE = Sink("out"), Sink("late")


def partition_of(record):
    return record["k"] % PARTITIONS


def feed(rng, left, right):
    """Batches as the two batch agents get them: per partition the arrival order of
    ``arrivals`` (a two-topic consumer's), partitions interleaved at random; a batch is
    a run of one side's records, possibly of several partitions. Yields (side, parts)."""
    queues = {p: [(s, r) for s, r in arrivals([x for x in left if partition_of(x) == p],
                                               [x for x in right if partition_of(x) == p])]
              for p in range(PARTITIONS)}
    offsets = {(s, p): 0 for s in "lr" for p in range(PARTITIONS)}
    while any(queues.values()):
        side = rng.choice("lr")
        parts = []
        for p in range(PARTITIONS):
            q = queues[p]
            n = 0
            while q and q[0][0] == side and n < rng.randint(1, 6):
                _, record = q.pop(0)
                if not parts or parts[-1][0] != p:
                    parts.append((p, []))
                parts[-1][1].append(Rec(offsets[(side, p)], record))
                offsets[(side, p)] += 1
                n += 1
        if parts:
            yield side, parts


def expected(js, left, right, sentinels):
    out = []
    for p in range(PARTITIONS):
        out += fold(js, [x for x in left + sentinels if partition_of(x) == p],
                    [x for x in right if partition_of(x) == p])
    # The sentinels (far in the future, on both sides) close every interval before
    # them; they stay buffered.
    return [r for r in out if not ((r["left"] or {}).get("sentinel") or (r["right"] or {}).get("sentinel"))]


def outputs(emitters):
    return [orjson.loads(value) for e in emitters for topic, key, value, _, _ in e.sent if topic is SINK]


@pytest.mark.parametrize("join_type", ["inner", "left", "outer"])
@pytest.mark.parametrize("seed", range(4))
def test_live_join_equals_the_fold_across_a_restart(join_type, seed):
    rng = random.Random(seed)
    before, after = rng.choice([0.0, 4.0, 10.0]), rng.choice([0.0, 6.0, 10.0])
    js = spec(type=join_type, before=before, after=after)
    left = random_stream(rng, 150, "l", keys=12, disorder=0.2)
    right = random_stream(rng, 150, "r", keys=12, disorder=0.2)
    sentinels = [{"k": 1000 + p, "ts": 10**9, "sentinel": True} for p in range(PARTITIONS)]
    sentinels_r = [{"k": 2000 + p, "ts": 10**9, "sentinel": True} for p in range(PARTITIONS)]
    batches = list(feed(rng, left + sentinels, right + sentinels_r))
    store = MemoryStore()
    first = runner(pipeline(join_type, before, after), store, transactional=seed % 2 == 1)
    cut = len(batches) // 2

    async def go():
        for side, parts in batches[:cut]:
            await first.process(side, parts)
        await first.commit.before_commit()  # a commit, then the worker stops
        second = runner(pipeline(join_type, before, after), store, transactional=seed % 2 == 1)
        for side, parts in batches[cut:]:
            await second.process(side, parts)
        await second.commit.before_commit()
        return second

    second = asyncio.run(go())
    got = outputs([first.emitter, second.emitter])
    assert as_multiset(got) == as_multiset(expected(js, left, right + sentinels_r, sentinels))
    late = [v for e in (first.emitter, second.emitter) for t, _, v, _, _ in e.sent if t is LATE]
    assert first.stats["late"] + second.stats["late"] == len(late) > 0
    # Everything that closed left the store: only the open (sentinel-era) buffers remain.
    assert all(orjson.loads(v) for db in store.data.values() for v in db.values())


def test_a_batch_replayed_after_a_flush_is_not_buffered_twice():
    store = MemoryStore()
    r = runner(pipeline("inner", 10, 10), store)
    batch = [(0, [Rec(0, {"k": 0, "ts": 100}), Rec(1, {"k": 0, "ts": 101})])]

    async def go():
        await r.process("l", batch)
        await r.commit.before_commit()
        # A crash after the flush, before the offsets committed: the batch comes again.
        again = runner(pipeline("inner", 10, 10), store)
        await again.process("l", batch)
        await again.process("r", [(0, [Rec(0, {"k": 0, "ts": 102})])])
        return again

    again = asyncio.run(go())
    assert again.stats["replayed_skipped"] == 2
    assert sorted(o["left"]["ts"] for o in outputs([again.emitter])) == [100, 101]


def test_steps_after_the_join_run_on_the_joined_record_and_output_is_keyed_by_the_join_key():
    spec_ = pipeline("left", 10, 10, grace=0, steps=[
        {"op": "filter", "where": "right == null or right.amount > 0"},
        {"op": "map", "set": {"paid": "right != null"}}])
    r = runner(spec_, MemoryStore())

    async def go():
        await r.process("l", [(0, [Rec(0, {"k": 3, "ts": 100}), Rec(1, {"k": 6, "ts": 100})])])
        await r.process("r", [(0, [Rec(0, {"k": 3, "ts": 105, "amount": 5}),
                                   Rec(1, {"k": 6, "ts": 105, "amount": 0}),
                                   Rec(2, {"k": 9, "ts": 200, "amount": 1})])])

    asyncio.run(go())
    sent = [(key, orjson.loads(v)) for t, key, v, _, _ in r.emitter.sent if t is SINK]
    # k=3 paired; k=6's pair filtered out, and k=6 matched so never emitted alone.
    assert sent == [(b"3", {"left": {"k": 3, "ts": 100}, "right": {"k": 3, "ts": 105, "amount": 5},
                            "ts": 105, "paid": True})]
    assert r.counters.dropped == {"filtered": 1}
    described = r.describe()
    assert (described["pairs"], described["left"], described["right"]) == (2, 2, 3)


def test_records_without_key_or_time_go_to_the_dead_letter_topic():
    r = runner(pipeline("inner", 10, 10), MemoryStore())
    asyncio.run(r.process("r", [(1, [Rec(0, {"ts": 1}), Rec(1, {"k": 1}), Rec(2, {"k": 1, "ts": 1})])]))
    assert [why["step"] for _, _, why in r.emitter.dead] == ["0:join", "0:join"]
    assert r.counters.dead_lettered == 2


def test_copartitioning_is_checked():
    check_copartitioned("j", "a", 4, "b", 4)
    with pytest.raises(JoinConfigError, match="co-partitioned"):
        check_copartitioned("j", "a", 4, "b", 6)
    with pytest.raises(JoinConfigError, match="does not exist"):
        check_copartitioned("j", "a", 4, "b", None)


@pytest.mark.parametrize("steps, path, message", [
    (["normalize", {"op": "join", "with": "r", "on": "k", "within": 5}], "pipelines[0].steps[1]", "first step"),
    ([{"op": "join", "with_records": [], "on": "k", "within": 5}], "pipelines[0].steps[0].with_records", "'with'"),
    ([{"op": "join", "with": "src", "on": "k", "within": 5}], "pipelines[0].steps[0].with", "another topic"),
    ([{"op": "join", "with": "r", "on": "k", "within": 5}, "deduplicate"], "pipelines[0].steps[1]", "stateless"),
    ([{"op": "join", "with": "r", "on": "k", "within": 5},
      {"op": "window", "key_by": "k", "window": {"type": "tumbling", "size": 10},
       "aggregations": [{"name": "n", "type": "count"}]}], "pipelines[0].steps[1]", "stateless"),
])
def test_live_join_config_errors_name_the_step(steps, path, message):
    with pytest.raises(PipelineConfigError, match=message) as info:
        parse_pipelines([{"name": "p", "source": "src", "sink": "out", "steps": steps}])
    assert info.value.path == path


def test_a_live_join_pipeline_is_accepted():
    [p] = parse_pipelines([{"name": "paid", "source": "orders", "sink": "orders.paid", "steps": [
        {"op": "join", "with": "payments", "on": "order_id", "within": "10m", "grace": "1m", "type": "left"}]}])
    assert (p.join_with, p.join.before, p.join.grace, p.late_topic) == ("payments", 600, 60, "pipeline.paid.late")


def test_an_output_timestamp_is_the_pairs_time_capped_at_the_clock():
    """A pair of future event times is written with the worker's clock as its Kafka
    timestamp: a broker refuses records more than an hour ahead (Kafka 4's
    message.timestamp.after.max.ms), which crashed the worker at every restart."""
    sent = []

    class Keep(MemoryEmitter):
        async def send_later(self, out, sources):
            sent.extend(out)

    commit = CommitProtocol(Keep(), defer=True)
    r = JoinRunner(pipeline("inner", 10, 10), None, SINK, LATE, left_name="left", right_name="right",
                   store=MemoryStore(), commit=commit)
    r.checked = True
    future = time.time() + 7200

    async def go():
        await r.process("l", [(0, [Rec(0, {"k": 0, "ts": 1000.5}), Rec(1, {"k": 3, "ts": future})])])
        await r.process("r", [(0, [Rec(0, {"k": 0, "ts": 1001}), Rec(1, {"k": 3, "ts": future})])])

    asyncio.run(go())
    assert sent[0][4] == 1001000
    assert sent[1][4] <= time.time() * 1000 < future * 1000


class Tick:
    """A tick the idle timer sends into a side's partition (agents/join.py: tick)."""

    def __init__(self, offset):
        self.offset, self.timestamp, self.key, self.value = offset, 1000, None, b""
        self.headers = [("streametl.tick", b"1")]


def idle_pipeline(join_type, idle_close=30.0):
    step = {"op": "join", "with": "right", "on": "k", "within": 10, "grace": 5, "type": join_type,
            "time_field": "ts", "idle_close": idle_close}
    return parse_pipelines([{"name": "j", "source": "left", "sink": "out", "steps": [step]}])[0]


def test_an_idle_side_read_as_a_tick_emits_the_unmatched_record_and_survives_a_restart():
    """idle_close in the live join: a tick read from the right side's partition marks it
    idle (unless input arrived since it was sent); a left join then emits its unmatched
    record, once, and the idle mark is kept in the stored bookkeeping, so after a
    restart the right side's time still follows the left side's. Ticks are not input
    records (not counted, not joined)."""
    store = MemoryStore()
    clock = [1000.0]
    r = runner(idle_pipeline("left"), store)
    r.clock = lambda: clock[0]

    async def go():
        await r.process("r", [(0, [Rec(0, {"k": 9, "ts": 0})])])
        await r.process("l", [(0, [Rec(0, {"k": 3, "ts": 0, "id": "a"}), Rec(1, {"k": 6, "ts": 100})])])
        await r.process("r", [(0, [Tick(1)])])  # sent before 30 s without input: ignored
        assert outputs([r.emitter]) == []
        clock[0] += 31
        await r.process("r", [(0, [Tick(2)])])
        assert [o["left"]["id"] for o in outputs([r.emitter])] == ["a"]
        await r.commit.before_commit()
        again = runner(idle_pipeline("left"), store)
        await again.process("l", [(0, [Rec(2, {"k": 12, "ts": 200})])])
        return again

    again = asyncio.run(go())
    # The right side is still idle after the restart: its time followed to 200, so
    # k=6 (ts 100) closed without any right record.
    assert [o["left"]["k"] for o in outputs([again.emitter])] == [6]
    assert r.stats["right"] == 1 and r.counters.into == 3 and r.stats["idle_marked"] == 1


def test_a_tick_after_another_partitions_records_in_one_batch_marks_its_side_idle():
    """A batch of several partitions: a tick in the second partition, after records of
    the first, is judged by the batch's clock (not by a value left from the first
    partition's counting)."""
    clock = [1000.0]
    r = runner(idle_pipeline("left"), MemoryStore())
    r.clock = lambda: clock[0]

    async def go():
        await r.process("l", [(1, [Rec(0, {"k": 4, "ts": 0, "id": "a"}), Rec(1, {"k": 7, "ts": 100})])])
        await r.process("r", [(1, [Rec(0, {"k": 1, "ts": 0})])])
        clock[0] += 31
        await r.process("l", [(0, [Rec(0, {"k": 3, "ts": 50})])])
        await r.process("r", [(0, [Rec(1, {"k": 3, "ts": 50})]), (1, [Tick(1)])])

    asyncio.run(go())
    assert r.stats["idle_marked"] == 1
    assert [o["left"].get("id") for o in outputs([r.emitter]) if o["right"] is None] == ["a"]


def test_idle_ticks_are_due_once_per_idle_period_per_side_and_partition():
    r = runner(idle_pipeline("left", idle_close=10.0), MemoryStore())
    assigned = [("l", 0), ("r", 0)]
    assert r.due_ticks(0.0, assigned) == []  # first seen now
    assert r.due_ticks(9.0, assigned) == []
    assert r.due_ticks(10.0, assigned) == assigned
    assert r.due_ticks(15.0, assigned) == []  # a tick is on its way
    r.idle_marked.add(("r", 0))  # the tick was read: marked idle until input
    assert r.due_ticks(25.0, assigned) == [("l", 0)]


class Keyed(Rec):
    """A record of a re-keyed side: sent by the rekey step with its source position."""

    def __init__(self, offset, record, src_partition, src_offset):
        super().__init__(offset, record)
        self.headers = [("streametl.src.partition", str(src_partition).encode()),
                        ("streametl.src.offset", str(src_offset).encode())]


def test_a_record_the_rekey_step_sent_twice_is_joined_once_also_after_a_restart():
    """repartition: after a crash the rekey step sends again the records whose source
    offsets were not committed, so the keyed topic holds them twice (other offsets);
    the join skips a repeat by its source partition and offset, remembered in the
    stored bookkeeping (so also by a new runner after a restart)."""
    step = {"op": "join", "with": "right", "on": "k", "within": 10, "grace": 5, "type": "inner",
            "time_field": "ts", "repartition": True}
    spec_ = parse_pipelines([{"name": "j", "source": "left", "sink": "out", "steps": [step]}])[0]
    store = MemoryStore()
    r = runner(spec_, store)

    async def go():
        await r.process("l", [(0, [Keyed(0, {"k": 0, "ts": 100}, 2, 7), Keyed(1, {"k": 0, "ts": 101}, 3, 4)])])
        await r.commit.before_commit()
        again = runner(spec_, store)
        # The repeats (source 2@7, 3@4) at new keyed offsets, then a new record.
        await again.process("l", [(0, [Keyed(2, {"k": 0, "ts": 100}, 2, 7), Keyed(3, {"k": 0, "ts": 101}, 3, 4),
                                       Keyed(4, {"k": 0, "ts": 102}, 2, 8)])])
        await again.process("r", [(0, [Keyed(0, {"k": 0, "ts": 103}, 1, 0)])])
        return again

    again = asyncio.run(go())
    assert sorted(o["left"]["ts"] for o in outputs([again.emitter])) == [100, 101, 102]
    assert again.stats["replayed_skipped"] == 2


def test_buffers_keep_their_stored_json_and_values_stored_before_load_and_join():
    """The live join buffers each record with its bytes as it arrived (operators.joins.
    Held, encoded into the state by concatenation), but the stored value is the same
    JSON as the plain layout of the pure join (``[time, seq, record, matched]`` per
    record): values stored by earlier versions need no migration. A runner over such
    a store (plain decoded entries) joins them, and the outputs are the same records,
    whitespace in the input notwithstanding."""
    store = MemoryStore()
    first = runner(pipeline("left", 10, 10, grace=0), store)
    raw_a = b'{"k": "a",  "ts": 100,\n "x": [1, 2]}'
    rec_a = Rec(0, {})
    rec_a.key, rec_a.value = b"a", raw_a

    # The pure join's plain entries: the layout stored before.
    pure = IntervalJoin(spec(type="left", before=10, after=10, grace=0))
    pure.add("l", orjson.loads(raw_a))
    pure.add("l", {"k": "b", "ts": 101})
    pure.add("r", {"k": "a", "ts": 103, "amount": 7})
    stored = {}

    async def go():
        await first.process("l", [(0, [rec_a, Rec(1, {"k": "b", "ts": 101})])])
        await first.process("r", [(0, [Rec(0, {"k": "a", "ts": 103, "amount": 7})])])
        await first.commit.before_commit()
        stored.update({k: orjson.loads(v) for k, v in store.data[0].items() if not k.startswith(b"\x00")})
        second = runner(pipeline("left", 10, 10, grace=0), store)
        await second.process("r", [(0, [Rec(1, {"k": "a", "ts": 104, "amount": 8}),
                                         Rec(2, {"k": "c", "ts": 500})])])
        await second.process("l", [(0, [Rec(2, {"k": "c", "ts": 500})])])
        return second

    second = asyncio.run(go())
    assert stored == {key.encode(): orjson.loads(orjson.dumps(value)) for key, value in pure.buffers.items()}
    a = {"k": "a", "ts": 100, "x": [1, 2]}
    sent = [(key, orjson.loads(v)) for e in (first.emitter, second.emitter) for t, key, v, _, _ in e.sent if t is SINK]
    assert sent == [
        (b"a", {"left": a, "right": {"k": "a", "ts": 103, "amount": 7}, "ts": 103}),
        (b"a", {"left": a, "right": {"k": "a", "ts": 104, "amount": 8}, "ts": 104}),  # a stored (plain) entry
        (b"c", {"left": {"k": "c", "ts": 500}, "right": {"k": "c", "ts": 500}, "ts": 500}),
        (b"b", {"left": {"k": "b", "ts": 101}, "right": None, "ts": 101}),  # closed from a stored entry
    ]


def test_prefixed_output_and_steps_read_records_buffered_with_their_bytes():
    """A flat output (``prefix``) and the steps after the join need the buffered records
    themselves: they are decoded from the bytes kept with them, whichever side arrived
    last, and an unmatched one is emitted with its own fields too."""
    step = {"op": "join", "with": "right", "on": ["k", "z"], "within": 10, "grace": 0, "type": "outer",
            "time_field": "ts", "prefix": {"left": "o_", "right": "p_"}}
    spec_ = parse_pipelines([{"name": "j", "source": "left", "sink": "out",
                              "steps": [step, {"op": "map", "set": {"sum": "o_v + p_v"}}]}])[0]
    r = runner(spec_, MemoryStore())

    async def go():
        await r.process("r", [(0, [Rec(0, {"k": 1, "z": "q", "ts": 100, "v": 1}),
                                   Rec(1, {"k": 2, "z": "q", "ts": 100, "v": 5})])])
        await r.process("l", [(0, [Rec(0, {"k": 1, "z": "q", "ts": 99, "v": 10}),
                                   Rec(1, {"k": 3, "z": "q", "ts": 200, "v": 0})])])
        await r.process("r", [(0, [Rec(2, {"k": 3, "z": "q", "ts": 200, "v": 2})])])

    asyncio.run(go())
    sent = [(key, orjson.loads(v)) for t, key, v, _, _ in r.emitter.sent if t is SINK]
    assert sent[0] == (b'[1,"q"]', {"o_k": 1, "o_z": "q", "o_ts": 99, "o_v": 10,
                                     "p_k": 1, "p_z": "q", "p_ts": 100, "p_v": 1, "ts": 100, "sum": 11})
    # k=2 closed unmatched (its step fails: o_v is missing), k=3 paired.
    assert [key for key, _ in sent[1:]] == [b'[3,"q"]']
    assert r.tally.completed == 2


def _rekey_pipeline():
    step = {"op": "join", "with": "right", "on": "k", "within": 10, "grace": 5, "type": "inner",
            "time_field": "ts", "repartition": True}
    return parse_pipelines([{"name": "j", "source": "left", "sink": "out", "steps": [step]}])[0]


def test_a_crash_after_a_commit_whose_write_ran_past_its_offsets_loses_no_rekeyed_record():
    """A commit's snapshot is encoded in parts, with batches between them. Its
    bookkeeping value named the re-keyed source offsets as they were at the last part,
    so the replay after a crash skipped a record whose buffer the write never held:
    the record was gone. The value is now the one at the snapshot."""
    from tables.store import MemoryStore

    async def go():
        store = MemoryStore()
        r = runner(_rekey_pipeline(), store)
        # More dirty keys than one part of the commit's encoding, both sides seen.
        await r.process("l", [(0, [Keyed(i, {"k": i, "ts": 100}, 0, i) for i in range(150)])])
        await r.process("r", [(0, [Keyed(0, {"k": 999, "ts": 100}, 0, 0)])])
        rest = await r.commit.begin_commit()  # the offsets it commits: left <= 149, right <= 0
        await r.process("l", [(0, [Keyed(150, {"k": 5000, "ts": 101}, 0, 150)])])  # between parts
        await rest  # written; then kill -9 before the next commit
        again = runner(_rekey_pipeline(), store)  # restart: replay from left 150, right 1
        await again.process("l", [(0, [Keyed(150, {"k": 5000, "ts": 101}, 0, 150)])])
        await again.process("r", [(0, [Keyed(1, {"k": 5000, "ts": 103}, 0, 1)])])
        return sorted(o["left"]["ts"] for o in outputs([again.emitter]))

    assert asyncio.run(go()) == [101]


def test_idle_bookkeeping_starts_again_when_partitions_move():
    """A side idle-marked here, moved away and back, is ticked again once quiet; a side
    last active here an hour ago is not marked idle on its return (its new owner may
    have had input since)."""
    from tables.store import MemoryStore

    async def go():
        clock = [1000.0]
        r = runner(idle_pipeline("left"), MemoryStore())
        r.clock = lambda: clock[0]
        await r.process("l", [(0, [Rec(0, {"k": 3, "ts": 0})])])
        await r.process("r", [(0, [Rec(0, {"k": 9, "ts": 0})])])
        clock[0] += 31
        await r.process("r", [(0, [Tick(1)])])
        assert ("r", 0) in r.idle_marked
        await r.commit.before_commit()
        r.mark_stale()
        assert not r.idle_marked and not r.last_tick and not r.last_activity
        await r.process("r", [(0, [Tick(2)])])  # a tick read at once after the return
        assert r.stats["idle_marked"] == 1  # only the one before the move
        clock[0] += 1_000
        return r.due_ticks(clock[0], [("l", 0), ("r", 0)])

    assert ("r", 0) in asyncio.run(go())
