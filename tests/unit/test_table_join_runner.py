"""The live stream-table join's processor (agents/table_join.py) without a broker: over
the in-memory store and emitter, its outputs equal a fold of the inputs computed from
the definition (each stream record with its key's version valid at its time); the
versions survive a restart (a new runner over the same store, after a commit), a table
batch replayed after a crash between flush and offset commit is not applied twice,
tombstones delete, and the state holds no version older than the history allows. The
pipeline config (``with_table``, a materialized table's topic) is checked and resolved."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from agents.table_join import STREAM, TABLE, TableJoinRunner
from app.commit import CommitProtocol, MemoryEmitter
from app.db_sinks import parse_sink
from app.pipelines import PipelineConfigError, parse_pipelines, resolve_tables
from tables.store import MemoryStore

PARTITIONS = 3
HISTORY = 40.0


class Rec:
    """A raw record of a batch-agent topic (offset, timestamp in ms, key, value)."""

    __slots__ = ("offset", "timestamp", "key", "value", "headers")

    def __init__(self, offset, key, value, ts):
        self.offset, self.timestamp, self.headers = offset, round(ts * 1000), ()
        self.key = str(key).encode()
        self.value = None if value is None else orjson.dumps(value)


class Sink:
    def get_topic_name(self):
        return "out"


SINK = Sink()


def pipeline(as_of="event_time", join_type="left", steps=()):
    step = {"op": "join", "with_table": "customers", "on": "k", "as_of": as_of, "type": join_type}
    if as_of == "event_time":
        step["history"] = HISTORY
    return parse_pipelines([{"name": "t", "source": "orders", "sink": "out", "steps": [step, *steps]}])[0]


def runner(spec_, store, transactional=False):
    emitter = MemoryEmitter(transactional=transactional)
    commit = CommitProtocol(emitter, defer=not transactional)
    r = TableJoinRunner(spec_, None, SINK, stream_name="orders", table_name="customers", store=store, commit=commit)
    r.checked = True  # no broker to ask for partition counts
    return r


def outputs(*runners):
    return [orjson.loads(v) for r in runners for topic, _, v, _, _ in r.emitter.sent if topic is SINK]


def make_inputs(seed):
    """Interleaved arrivals: (side, partition, key, value, time), times rising with
    noise so table records and stream records come out of order within the history."""
    rng = random.Random(seed)
    arrivals = []
    for i in range(1500):
        k = rng.randrange(12)
        t = 1000 + i * 0.2 + rng.uniform(-10, 2)
        if rng.random() < 0.4:
            value = None if rng.random() < 0.1 else {"k": k, "name": f"c{i}"}
            arrivals.append((TABLE, k % PARTITIONS, k, value, t))
        else:
            arrivals.append((STREAM, k % PARTITIONS, k, {"k": k, "ts": t, "id": i}, t))
    return arrivals


def fold(arrivals, as_of):
    """The join by its definition, per partition in arrival order."""
    out = []
    versions: dict[int, list] = {}
    table_time: dict[int, float] = {}
    for side, p, k, value, t in arrivals:
        horizon = table_time.get(p, float("-inf")) - HISTORY
        if side == TABLE:
            if as_of == "latest":
                versions[k] = [(t, value)]
            elif t >= horizon:
                versions.setdefault(k, []).append((t, value))
                table_time[p] = max(table_time.get(p, float("-inf")), t)
            continue
        if as_of == "latest":
            row = versions.get(k, [(0, None)])[-1][1]
        elif t < horizon:
            row = None
        else:
            # the latest time <= t; among equal times the last applied
            found = [(vt, i) for i, (vt, _) in enumerate(versions.get(k, [])) if vt <= t]
            row = versions[k][max(found)[1]][1] if found else None
        out.append({"left": value, "right": row, "ts": value["ts"]})
    return out


def batches(rng, arrivals):
    """Runs of one side's records (several partitions), in arrival order per partition."""
    offsets = {(s, p): 0 for s in (STREAM, TABLE) for p in range(PARTITIONS)}
    i = 0
    while i < len(arrivals):
        side = arrivals[i][0]
        parts: dict[int, list] = {}
        n = rng.randint(1, 8)
        while i < len(arrivals) and arrivals[i][0] == side and n:
            _, p, k, value, t = arrivals[i]
            parts.setdefault(p, []).append(Rec(offsets[(side, p)], k, value, t))
            offsets[(side, p)] += 1
            i += 1
            n -= 1
        yield side, list(parts.items())


def as_multiset(records):
    return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records)


@pytest.mark.parametrize("as_of", ["event_time", "latest"])
@pytest.mark.parametrize("transactional", [False, True], ids=["at_least_once", "exactly_once"])
def test_outputs_equal_the_fold_across_a_restart(as_of, transactional):
    """Half the input, a commit, a new runner over the same store (a restart), the rest:
    the versions written before the restart are joined after it."""
    arrivals = make_inputs(3)
    store = MemoryStore()
    spec_ = pipeline(as_of)
    rng = random.Random(1)
    work = list(batches(rng, arrivals))
    half = len(work) // 2

    async def go():
        first = runner(spec_, store, transactional)
        for side, parts in work[:half]:
            await first.process(side, parts)
        await first.commit.before_commit()
        second = runner(spec_, store, transactional)
        for side, parts in work[half:]:
            await second.process(side, parts)
        await second.commit.before_commit()
        return first, second

    first, second = asyncio.run(go())
    assert as_multiset(outputs(first, second)) == as_multiset(fold(arrivals, as_of))
    if as_of == "event_time":
        # Retention: no key keeps a version that a lookup at or after the horizon
        # cannot need (the one valid at the horizon is the oldest kept).
        for p, db in store.data.items():
            meta = orjson.loads(db[b"\x00meta:" + str(p).encode()])
            for key, raw in db.items():
                if key.startswith(b"\x00meta"):
                    continue
                versions = orjson.loads(raw)["v"]
                assert len(versions) == 1 or versions[1][0] > meta["tt"] - HISTORY, (key, versions, meta)


def test_a_table_batch_replayed_after_a_crash_is_not_applied_twice():
    """Flushed but its offsets not committed (at_least_once): the replay is skipped, so
    it cannot undo a later update of the same time."""
    store = MemoryStore()
    spec_ = pipeline("event_time")

    async def go():
        r = runner(spec_, store)
        await r.process(TABLE, [(0, [Rec(0, 3, {"k": 3, "v": "a"}, 1000), Rec(1, 3, {"k": 3, "v": "b"}, 1000)])])
        await r.commit.before_commit()
        again = runner(spec_, store)
        await again.process(TABLE, [(0, [Rec(1, 3, {"k": 3, "v": "b"}, 1000)])])
        await again.process(TABLE, [(0, [Rec(0, 3, {"k": 3, "v": "a"}, 1000)])])
        await again.process(STREAM, [(0, [Rec(0, 3, {"k": 3, "ts": 1001}, 1001)])])
        return again

    again = asyncio.run(go())
    assert [o["right"]["v"] for o in outputs(again)] == ["b"]
    assert again.stats["replayed_skipped"] == 2


def test_tombstones_delete_and_inner_drops_and_bad_records_go_to_the_dead_letter_topic():
    store = MemoryStore()
    spec_ = pipeline("latest", "inner", steps=[{"op": "map", "set": {"n": "right.v"}}])

    async def go():
        r = runner(spec_, store)
        await r.process(TABLE, [(0, [Rec(0, 3, {"k": 3, "v": "a"}, 1), Rec(1, 6, {"k": 6, "v": "b"}, 1),
                                     Rec(2, 6, None, 2), Rec(3, 9, {"no": "key"}, 3)])])
        await r.process(STREAM, [(0, [Rec(0, 3, {"k": 3}, 5), Rec(1, 6, {"k": 6}, 5), Rec(2, 9, {"x": 1}, 5)])])
        await r.commit.before_commit()
        return r

    r = asyncio.run(go())
    assert outputs(r) == [{"left": {"k": 3}, "right": {"k": 3, "v": "a"}, "n": "a"}]
    assert [why["reason"] for _, _, why in r.emitter.dead] == ["missing_key", "step_failed"]
    assert r.counters.dropped == {"no_row": 1}
    assert store.data[0].get(b"6") is None  # the tombstone deleted the row in the store too
    assert r.describe()["pairs"] == 1 and r.describe()["table"] == 3


def test_with_table_is_checked_and_a_materialized_table_resolves_to_its_topic():
    with pytest.raises(PipelineConfigError, match="table_records"):
        parse_pipelines([{"name": "t", "source": "s", "sink": "o",
                          "steps": [{"op": "join", "table_records": [], "on": "k"}]}])
    with pytest.raises(PipelineConfigError, match="another topic"):
        parse_pipelines([{"name": "t", "source": "s", "sink": "o",
                          "steps": [{"op": "join", "with_table": "s", "on": "k"}]}])
    with pytest.raises(PipelineConfigError, match="stateless"):
        parse_pipelines([{"name": "t", "source": "s", "sink": "o",
                          "steps": [{"op": "join", "with_table": "c", "on": "k"}, "deduplicate"]}])
    specs = parse_pipelines([
        {"name": "t", "source": "orders", "sink": "o",
         "steps": [{"op": "join", "with_table": "customers", "on": "customer_id"}]},
        {"name": "u", "source": "orders", "sink": "o2",
         "steps": [{"op": "join", "with_table": "plain.topic", "on": "customer_id"}]}])
    sink = parse_sink({"type": "table", "table": "customers", "key": ["id"], "format": "debezium"}, "sinks[0]",
                      name="customers", source="cdc.customers")
    resolved = resolve_tables(specs, [sink])
    assert (resolved[0].join_with, resolved[0].join.table_key, resolved[0].join.format) == (
        "cdc.customers", ("id",), "debezium")
    assert (resolved[1].join_with, resolved[1].join.table_key) == ("plain.topic", ("customer_id",))


def test_both_join_runners_rebuild_from_the_store_after_partitions_moved():
    """The interval join and the stream-table join share one life cycle
    (agents.join.TwoInputRunner): a rebalance marks every registered runner of either
    kind stale, and its next batch rebuilds the partition's state from the store (here
    another worker's changes, written meanwhile), not from what it had cached."""
    from agents import join as join_module
    from agents.join import JoinRunner
    from tests.unit.test_join_runner import LATE
    from tests.unit.test_join_runner import SINK as JOIN_SINK
    from tests.unit.test_join_runner import Rec as JoinRec
    from tests.unit.test_join_runner import pipeline as join_pipeline

    table_store, join_store = MemoryStore(), MemoryStore()
    t = join_module.registered(runner(pipeline(as_of="latest"), table_store))
    emitter = MemoryEmitter()
    j = join_module.registered(JoinRunner(join_pipeline("inner", 10, 10), None, JOIN_SINK, LATE, left_name="left",
                                          right_name="right", store=join_store,
                                          commit=CommitProtocol(emitter, defer=True)))
    j.checked = True
    try:
        async def go():
            await t.process(TABLE, [(0, [Rec(0, 1, {"k": 1, "name": "old"}, 10)])])
            await t.commit.before_commit()
            await j.process("l", [(0, [JoinRec(0, {"k": 1, "ts": 100})])])
            await j.commit.before_commit()
            # Another worker owned the partitions meanwhile: its changes are in the stores.
            other_t = runner(pipeline(as_of="latest"), table_store)
            await other_t.process(TABLE, [(0, [Rec(1, 1, {"k": 1, "name": "new"}, 20)])])
            await other_t.commit.before_commit()
            other_j = JoinRunner(join_pipeline("inner", 10, 10), None, JOIN_SINK, LATE, left_name="left",
                                 right_name="right", store=join_store, commit=CommitProtocol(MemoryEmitter(), defer=True))
            other_j.checked = True
            await other_j.process("l", [(0, [JoinRec(1, {"k": 1, "ts": 101})])])
            await other_j.commit.before_commit()
            await join_module._on_moved()
            assert t.stale and j.stale
            await t.process(STREAM, [(0, [Rec(0, 1, {"k": 1, "ts": 30}, 30)])])
            await j.process("r", [(0, [JoinRec(0, {"k": 1, "ts": 102})])])

        asyncio.run(go())
    finally:
        join_module.RUNNERS.remove(t)
        join_module.RUNNERS.remove(j)
    assert [o["right"]["name"] for o in outputs(t)] == ["new"]
    assert sorted(orjson.loads(v)["left"]["ts"] for topic, _, v, _, _ in emitter.sent if topic is JOIN_SINK) == [100, 101]


class TableReadConsumer:
    """What ``release_when_read`` asks of the worker's consumer: the assignment, the end
    offsets, and whether a table partition's records were delivered up to an offset."""

    def __init__(self, assigned, ends, positions):
        self.assigned, self.ends, self.positions = assigned, ends, positions
        self.asked = []

    def assignment(self):
        return self.assigned

    async def highwaters(self, tp):
        self.asked.append(tp.partition)
        if self.ends[tp.partition] is None:
            raise ConnectionError("the broker is away")
        return {tp: self.ends[tp.partition]}

    def delivered_to(self, tp, end):
        return self.positions[tp.partition] >= end


def test_each_stream_partition_is_held_until_its_table_partition_is_read_to_its_end(monkeypatch):
    """After an assignment the stream's partitions are held (not fetched, not delivered)
    until each one's table partition was read to the end offset it had then (asked
    again while the broker cannot say); a table partition not assigned here holds
    nothing; a stream on a cycle of joins is never held; a revocation releases all,
    and holds of another join on the same stream stay."""
    from faust.types import TP

    import agents.table_join as table_join
    import app.transport as transport

    holds = transport.PartitionHolds()
    monkeypatch.setattr(table_join, "HELD_PARTITIONS", holds)
    monkeypatch.setattr(table_join, "CATCH_UP_CHECK", 0.001)
    tasks = []

    class Task:
        def cancel(self):
            tasks.pop().close()

    class App:
        def add_future(self, coro):
            tasks.append(coro)
            return Task()

    monkeypatch.setattr(table_join, "app", App())

    async def go():
        r = runner(pipeline("event_time"), MemoryStore())
        assigned = {TP("orders", p) for p in range(4)} | {TP("customers", p) for p in range(3)} | {TP("x", 0)}
        holds.hold("another join", [TP("orders", 2)])
        r.hold_assigned(assigned, unheld={"customers"})
        assert holds.held() == {TP("orders", p) for p in range(4)}
        r._release_task = None
        tasks.pop().close()  # run here instead, with the test's consumer
        consumer = TableReadConsumer(assigned, ends={0: 5, 1: 0, 2: None}, positions={0: 0, 1: 0, 2: 3})
        loop = asyncio.ensure_future(r.release_when_read(consumer))
        await asyncio.sleep(0.02)
        # 1: an empty table partition; 3: its table partition is someone else's.
        assert holds.held() == {TP("orders", 0), TP("orders", 2)}
        assert r.describe()["held_partitions"] == [0, 2]
        assert consumer.asked.count(2) > 1  # asked again
        consumer.ends[2] = 7
        consumer.positions[0] = 5
        await asyncio.sleep(0.02)
        assert r.describe()["held_partitions"] == [2]
        consumer.positions[2] = 7
        await asyncio.wait_for(loop, 1)
        assert r.catching_up == {}
        assert holds.held() == {TP("orders", 2)}  # the other join's hold
        r.hold_assigned(assigned)
        r.release_all()
        assert holds.held() == {TP("orders", 2)} and tasks == [] and r.describe()["held_partitions"] == []
        r.hold_assigned(assigned, unheld={"orders"})
        assert holds.held() == {TP("orders", 2)} and tasks == []

    asyncio.run(go())


def test_only_streams_on_a_cycle_of_joins_are_never_held():
    """Held, two joins reading each other's stream as their table would wait for each
    other for good; a chain (A: X with Y, B: Y with Z) waits in turn and is held."""
    from agents.table_join import streams_never_held

    def join(stream, table):
        return TableJoinRunner(pipeline(), None, SINK, stream_name=stream, table_name=table, store=MemoryStore(),
                               commit=CommitProtocol(MemoryEmitter(), defer=True))

    assert streams_never_held([join("x", "y"), join("y", "z")]) == set()
    assert streams_never_held([join("x", "y"), join("y", "x"), join("w", "x")]) == {"x", "y"}
    assert streams_never_held([join("x", "y"), join("y", "z"), join("z", "x")]) == {"x", "y", "z"}
    assert streams_never_held([join("x", "x")]) == {"x"}
    assert streams_never_held([]) == set()
