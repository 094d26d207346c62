"""The pattern engine's event-time clock and the timer that sends ticks
(tables/patterns.py ``EventClock``, agents/patterns.py ``fire_due_timers``): a timer
fires when the event time of the input partition its key is read from, learned from
real events only, passes its deadline; run on with the wall clock only while that
partition is read to its end (docs/delivery.md AY, P6).

The worker's consumer is a stub holding per partition what ``read_to_end`` reads (the
offset last handed to the agents, the end offset), so the real per-partition rule
decides; nothing stubs the decision itself."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types

import orjson
import pytest
from faust.types import TP

from app.batches import BatchRecord
from app.harness import PatternProcessor, Record
from app.kafka_io import KeyPartitioner
from app.patterns import EngineConfig, parse_definition
from app.settings import settings

NO_CONFIRM = [{"name": "no-confirm", "type": "absence", "key_by": "user", "within": 30,
               "trigger": "k == 'pay'", "expect": "k == 'confirm'"}]
#: The backlog is an hour behind the wall clock (a restart after an outage).
T0 = time.time() - 3600
SOURCE, REPARTITION = "events", "patterns-repartition"
PARTITIONS = settings.topic_partitions
partition_of = KeyPartitioner(PARTITIONS)


def same_partition_as(key: str, prefix: str) -> str:
    """Another key that hashes to ``key``'s repartition partition."""
    return next(f"{prefix}{i}" for i in range(1000)
                if f"{prefix}{i}" != key and partition_of(f"{prefix}{i}".encode()) == partition_of(key.encode()))


def other_partition_than(key: str, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if partition_of(f"{prefix}{i}".encode()) != partition_of(key.encode()))


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes]] = []

    async def send(self, topic, key, partition, value):
        self.sent.append((partition, key, value))


class StubConsumer:
    """Faust's consumer as ``read_to_end`` reads it: per assigned partition the offset
    of the last record handed to the agents and the end offset (no fetcher: a partition
    with nothing handed over is not read to its end). Every partition starts read to
    its end."""

    def __init__(self) -> None:
        self.tps = {TP(topic, p) for topic in (SOURCE, REPARTITION) for p in range(PARTITIONS)}
        self._read_offset = {tp: 0 for tp in self.tps}
        self._last_timestamp = {tp: 1000 for tp in self.tps}  # a record of each delivered
        self.ends = {tp: 1 for tp in self.tps}

    def assignment(self) -> set[TP]:
        return set(self.tps)

    def highwater(self, tp: TP) -> int:
        return self.ends[tp]

    def behind(self, topic: str, partition: int) -> None:
        """Records of the partition still to be read."""
        self.ends[TP(topic, partition)] = self._read_offset[TP(topic, partition)] + 2

    def read_up(self, topic: str, partition: int) -> None:
        self.ends[TP(topic, partition)] = self._read_offset[TP(topic, partition)] + 1


@pytest.fixture
def worker(monkeypatch):
    """``fire_due_timers`` of a worker with every partition recovered, a fresh clock and
    timer index (what a restart leaves), ticks into a fake producer. ``run(processor)``
    scans the processor's timers; ``consumer`` says what is read to its end."""
    import agents.patterns as engine
    import tables.patterns as tables

    producer = FakeProducer()
    recovered = asyncio.Event()
    recovered.set()
    consumer = StubConsumer()
    monkeypatch.setattr(engine, "app", types.SimpleNamespace(
        rebalancing=False, consumer=consumer,
        tables=types.SimpleNamespace(recovery=types.SimpleNamespace(completed=recovered))))
    monkeypatch.setattr(engine, "kafka_io", types.SimpleNamespace(producer=producer))
    clock = tables.EventClock()  # the worker's one clock, in both modules
    monkeypatch.setattr(engine, "clock", clock)
    monkeypatch.setattr(tables, "clock", clock)
    monkeypatch.setattr(engine, "timer_index", engine.TimerIndex())
    monkeypatch.setattr(engine, "_ticked", {})

    async def run(processor: PatternProcessor) -> list[dict]:
        monkeypatch.setattr(engine, "timer_store", processor.timers)
        engine._ticked.clear()
        engine.timer_index.assignment = None  # rebuilt from the processor's table
        first = len(producer.sent)
        await engine.fire_due_timers.__wrapped__.__wrapped__()
        return [{"partition": p, "key": k, **orjson.loads(v)} for p, k, v in producer.sent[first:]]

    return types.SimpleNamespace(run=run, consumer=consumer, producer=producer, clock=clock)


def wall_clock_ahead(monkeypatch, seconds: float) -> None:
    """The wall clock, as the clock and the timer read it, ``seconds`` ahead."""
    import agents.patterns as engine
    import tables.patterns as tables

    fake = types.SimpleNamespace(time=lambda: time.time() + seconds, monotonic=time.monotonic)
    monkeypatch.setattr(tables, "time", fake)
    monkeypatch.setattr(engine, "time", fake)


async def rebalance(assigned: set) -> None:
    """The worker's revoke and assign signals, as Faust sends them (aiokafka revokes
    the whole assignment, then assigns the new one)."""
    from app import app

    for signal, tps in ((app.on_partitions_revoked, set()), (app.on_partitions_assigned, assigned)):
        for receiver in signal.iter_receivers(app):
            if receiver.__module__ == "tables.patterns":
                await receiver(app, tps)


def event(offset: int, **fields) -> Record:
    return Record(0, offset, orjson.dumps(fields))


async def deliver_ticks(processor: PatternProcessor, ticks: list[dict]) -> None:
    """The repartition agent handling the ticks ``fire_due_timers`` sent."""
    with processor.installed() as engine:
        for tick in ticks:
            p = tick["partition"]
            offset = processor.forwarded[p] = processor.forwarded.get(p, -1) + 1
            body = orjson.dumps({k: v for k, v in tick.items() if k not in ("partition", "key")})
            item = engine.parse_repartitioned(
                BatchRecord(TP(REPARTITION, p), Record(p, offset, body, tick["key"])))
            await engine.apply_items([item])


def alert_keys(processor: PatternProcessor) -> list[str]:
    return [orjson.loads(v)["key"] for _, _, v, _, _ in processor.commit.emitter.sent]


def test_read_to_end_is_the_partitions_own_read_position():
    from agents.window_aggregate import caught_up, read_to_end

    consumer = StubConsumer()
    tp = TP(SOURCE, 0)
    consumer._read_offset[tp], consumer.ends[tp] = 9, 10
    assert read_to_end(consumer, tp)
    consumer.ends[tp] = 12  # records 10 and 11 still to be read
    assert not read_to_end(consumer, tp)
    del consumer.ends[tp]  # no end offset known yet
    assert not read_to_end(consumer, tp)
    # Nothing handed to the agents yet, or only up to a transaction marker: read to the
    # end once the fetch position is at the end and no fetched record is held back.
    consumer._read_offset[tp], consumer.ends[tp] = None, 5
    state = types.SimpleNamespace(has_valid_position=True, position=5)
    held: dict = {}
    aio = types.SimpleNamespace(
        _subscription=types.SimpleNamespace(subscription=types.SimpleNamespace(
            assignment=types.SimpleNamespace(state_value=lambda _: state))),
        _fetcher=types.SimpleNamespace(_records=held))
    consumer._thread = types.SimpleNamespace(_ensure_consumer=lambda: aio)
    assert read_to_end(consumer, tp)
    held[tp] = object()
    assert not read_to_end(consumer, tp)
    # Windows and joins: every partition of the topics named, only those.
    app = types.SimpleNamespace(consumer=consumer)
    import agents.window_aggregate as windows
    saved = windows.app
    windows.app = app
    try:
        assert not caught_up({SOURCE})
        assert caught_up({REPARTITION})
    finally:
        windows.app = saved


def test_a_partition_assigned_and_sought_to_its_committed_offset_is_not_read_yet():
    """After an assignment Faust seeks the read offset to the committed offset, the next
    record to read: until a batch of it is delivered, that record is still unread."""
    from agents.window_aggregate import read_to_end

    consumer = StubConsumer()
    tp = TP(SOURCE, 0)
    del consumer._last_timestamp[tp]  # nothing delivered in this assignment
    consumer._read_offset[tp], consumer.ends[tp] = 5, 6  # committed 5; record 5 unread
    assert not read_to_end(consumer, tp)
    consumer._last_timestamp[tp] = 1000  # record 5 delivered
    assert read_to_end(consumer, tp)


def test_a_restart_fires_no_stored_timer_ahead_of_the_backlog_that_cancels_it(worker):
    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        await p.commit.before_commit()  # the state and its timer (due at T0 + 30) stored
        worker.clock.__init__()  # a restart: no event time known
        # The confirm at T0 + 5 is still waiting to be read in source partition 0; the
        # repartition partition has nothing to read yet (nothing forwarded so far).
        worker.consumer.behind(SOURCE, 0)
        ticks = await worker.run(p)
        assert ticks == []  # no event read since the restart: no event time yet
        await p.process([(0, [event(1, user="u1", ts=T0 + 5, k="confirm")])])
        # The next trigger of the backlog: its timer is due at T0 + 130 in event time,
        # not now by the wall clock.
        await p.process([(0, [event(2, user="u1", ts=T0 + 100, k="pay")])])
        worker.consumer.behind(REPARTITION, partition_of(b"u1"))
        assert await worker.run(p) == []

    asyncio.run(main())
    assert p.commit.emitter.sent == []


def test_a_tick_does_not_move_the_clock(worker):
    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        await p.commit.before_commit()
        worker.clock.__init__()  # a restart: no event time known
        # Nothing to read at that moment: the timer is due by the wall clock, and the
        # tick carries that reading.
        ticks = await worker.run(p)
        assert len(ticks) == 1 and ticks[0]["now"] > T0 + 3000
        await deliver_ticks(p, ticks)  # the alert
        # Then records come in, from an hour ago: another pay, whose confirm comes 10 s
        # later in event time. The tick's reading is no event time: the new timer
        # (T0 + 130) is not due.
        worker.consumer.behind(SOURCE, 0)
        worker.consumer.behind(REPARTITION, partition_of(b"u1"))
        await p.process([(0, [event(1, user="u1", ts=T0 + 100, k="pay")])])
        assert await worker.run(p) == []
        await p.process([(0, [event(2, user="u1", ts=T0 + 110, k="confirm")])])

    asyncio.run(main())
    assert [orjson.loads(v)["at"] for _, _, v, _, _ in p.commit.emitter.sent] == [T0 + 30]


def test_a_partition_handed_back_has_no_event_time_until_it_sees_an_event(worker):
    p = PatternProcessor(NO_CONFIRM)
    r = partition_of(b"u2")

    async def main():
        await p.process([(0, [event(0, user="u2", ts=T0 + 200, k="view")])])
        assert worker.clock.knows(REPARTITION, r)
        # The partition goes to another worker, then comes back; meanwhile the other
        # worker wrote a state whose timer is due at T0 + 130, and the records after it
        # (its confirm among them) are still to be read here.
        await rebalance(worker.consumer.tps - {TP(REPARTITION, r)})
        await rebalance(worker.consumer.tps)
        with p.installed():
            key = orjson.dumps("user=u2")
            p.store.partition_db(r)[key] = orjson.dumps({"o": {}, "s": {}, "t": T0 + 130})
            p.timers.partition_db(r)[key] = orjson.dumps(
                {"d": T0 + 130, "p": r, "i": REPARTITION, "k": "user", "v": "u2", "src": SOURCE})
        worker.consumer.behind(REPARTITION, r)
        assert await worker.run(p) == []

    asyncio.run(main())
    assert not worker.clock.knows(REPARTITION, r)


def test_an_idle_partition_that_saw_events_fires_on_time_without_new_input(worker, monkeypatch):
    # u1 and u2 in one repartition partition (whatever source partition they are read
    # from): its own newest event time, u2's, is what runs on.
    u2 = same_partition_as("u1", "u")
    r = partition_of(b"u1")
    now = time.time()

    async def main(source_partition: int) -> list[str]:
        p = PatternProcessor(NO_CONFIRM)
        worker.clock.__init__()
        await p.process([(source_partition, [event(0, user="u1", ts=now - 20, k="pay"),
                                             event(1, user=u2, ts=now, k="pay")])])
        # Records still to be read: the clock stays at the newest event time (now).
        worker.consumer.behind(REPARTITION, r)
        assert await worker.run(p) == []
        # 15 s later, nothing else to read: the clock is at now + 15, past u1's deadline
        # (now + 10), not u2's (now + 30).
        worker.consumer.read_up(REPARTITION, r)
        with monkeypatch.context() as m:
            wall_clock_ahead(m, 15)
            ticks = await worker.run(p)
        assert [t["t"] for t in ticks] == ["user=u1"]
        await deliver_ticks(p, ticks)
        return alert_keys(p)

    assert asyncio.run(main(0)) == ["u1"]
    assert asyncio.run(main(1)) == ["u1"]


def test_a_source_keyed_timer_follows_its_source_partition_not_the_repartition_partition_of_that_number(
        worker, monkeypatch):
    """B: partition p of the source topic and partition p of the repartition topic are
    different inputs, with clocks of their own."""
    import agents.patterns as engine

    monkeypatch.setattr(engine, "ENGINE", dataclasses.replace(engine.ENGINE, source_key="user"))
    device = next(f"d{i}" for i in range(1000) if partition_of(f"d{i}".encode()) == 0)
    p = PatternProcessor(NO_CONFIRM + [{"name": "big", "type": "threshold", "key_by": "device",
                                        "where": "v > 100"}])

    async def main():
        # u1, matched in place on source partition 0, pays at T0; its confirm (T0 + 5)
        # is still to be read there.
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        worker.consumer.behind(SOURCE, 0)
        # Source partition 1, read further, forwards an event at T0 + 100 to
        # repartition partition 0.
        await p.process([(1, [event(0, user="u9", device=device, ts=T0 + 100, v=1)])])
        assert await worker.run(p) == []
        await p.process([(0, [event(1, user="u1", ts=T0 + 5, k="confirm")])])

    asyncio.run(main())
    assert p.commit.emitter.sent == []
    assert orjson.loads(p.timers.partition_db(0)[orjson.dumps("user=u1")]) == {}


def test_a_rebalance_keeps_the_event_time_of_the_partitions_that_stay(worker):
    """C: after a rebalance that leaves a partition here, its timers follow its event
    time on, not the wall clock."""
    p = PatternProcessor(NO_CONFIRM)
    lag = 600  # events are stamped 10 min before they reach Kafka
    now = time.time()

    async def main():
        await p.process([(0, [event(0, user="u1", ts=now - lag, k="pay")])])  # due now - 570
        assert await worker.run(p) == []
        await rebalance(worker.consumer.tps)  # a worker joins; this one keeps its partitions
        assert await worker.run(p) == []
        await p.process([(0, [event(1, user="u1", ts=now - lag + 10, k="confirm")])])

    asyncio.run(main())
    assert p.commit.emitter.sent == []


def test_a_rebalance_forgets_what_was_lost_and_everything_after_a_lapsed_session(worker, monkeypatch):
    import app.transport as transport

    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay"), event(1, user="u2", ts=T0, k="pay")])])
        r1, r2 = partition_of(b"u1"), partition_of(b"u2")
        assert r1 != r2
        await rebalance(worker.consumer.tps - {TP(REPARTITION, r1)})
        assert not worker.clock.knows(REPARTITION, r1) and worker.clock.knows(REPARTITION, r2)
        # Woken after its group session lapsed: what it applied was dropped unwritten
        # and is read again, older than its clock.
        monkeypatch.setattr(transport.commit_guard, "session_lapsed", lambda: True)
        await rebalance(worker.consumer.tps)
        assert not worker.clock.knows(REPARTITION, r2) and not worker.clock.knows(SOURCE, 0)

    asyncio.run(main())


def test_a_partition_read_to_its_end_fires_while_another_partition_lags(worker, monkeypatch):
    """D: records still to be read elsewhere (a hot partition under sustained lag) do
    not freeze a quiet partition's clock."""
    p = PatternProcessor(NO_CONFIRM)
    other = other_partition_than("u1", "u")
    t = time.time()

    async def main():
        await p.process([(0, [event(0, user="u1", ts=t, k="pay")])])  # due at t + 30
        worker.consumer.behind(SOURCE, 1)
        worker.consumer.behind(REPARTITION, partition_of(other.encode()))
        with monkeypatch.context() as m:
            wall_clock_ahead(m, 60)
            ticks = await worker.run(p)
        assert [tick["t"] for tick in ticks] == ["user=u1"]
        await deliver_ticks(p, ticks)

    asyncio.run(main())
    assert alert_keys(p) == ["u1"]


def test_a_late_event_does_not_step_the_clock_back(worker, monkeypatch):
    """E: only a newer event time moves the wall-clock anchor."""
    p = PatternProcessor(NO_CONFIRM)
    u2 = same_partition_as("u1", "u")
    t = time.time()

    async def main():
        await p.process([(0, [event(0, user="u1", ts=t, k="pay")])])  # due at t + 30
        with monkeypatch.context() as m:
            wall_clock_ahead(m, 20)  # 20 s later, a late event (a device's old reading)
            await p.process([(0, [event(1, user=u2, ts=t - 100, k="view")])])
        with monkeypatch.context() as m:
            wall_clock_ahead(m, 35)
            ticks = await worker.run(p)  # t + 35, not t + 15
        assert [tick["t"] for tick in ticks] == ["user=u1"]

    asyncio.run(main())


def test_a_rebalance_during_the_scans_sends_does_not_change_what_is_due(worker):
    """F: every tick is decided before the first send; a rebalance completing while a
    send is awaited does not turn the rest of the scan to the wall clock."""
    p = PatternProcessor(NO_CONFIRM)
    u2 = same_partition_as("u1", "u")
    r = partition_of(b"u1")
    send = worker.producer.send

    async def send_during_rebalance(topic, key, partition, value):
        await send(topic, key, partition, value)
        # The partition goes elsewhere while this send is awaited.
        await rebalance(worker.consumer.tps - {TP(REPARTITION, r)})

    async def main():
        worker.producer.send = send_during_rebalance
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay"),        # due T0 + 30
                              event(1, user=u2, ts=T0 + 50, k="pay")])])  # due T0 + 80
        ticks = await worker.run(p)
        assert [tick["t"] for tick in ticks] == ["user=u1"]

    asyncio.run(main())


def test_a_key_matched_in_place_for_two_sources_follows_the_slower_one(worker, monkeypatch):
    """Two sources keyed by the source key share each key's state and timer entry: its
    entry names the source whose batch last set the deadline, but partition p of each
    source feeds it, and a confirm still unread on one of them must be able to cancel."""
    import agents.patterns as engine

    clicks = "clicks"
    monkeypatch.setattr(engine, "ENGINE", dataclasses.replace(engine.ENGINE, source_key="user"))
    monkeypatch.setattr(engine, "source_topics", {
        name: types.SimpleNamespace(get_topic_name=lambda name=name: name) for name in (SOURCE, clicks)})
    consumer = worker.consumer
    for q in range(PARTITIONS):
        tp = TP(clicks, q)
        consumer.tps.add(tp)
        consumer._read_offset[tp], consumer._last_timestamp[tp], consumer.ends[tp] = 0, 1000, 1
    engine_config = EngineConfig(sources=(SOURCE, clicks), source_key="user")
    definitions = [
        {"name": "X", "type": "absence", "source": SOURCE, "key_by": "user", "within": 30,
         "trigger": "k == 'pay'", "expect": "k == 'confirm'"},
        {"name": "Y", "type": "absence", "source": clicks, "key_by": "user", "within": 10,
         "trigger": "k == 'open'", "expect": "k == 'close'"}]
    p = PatternProcessor([])
    p.patterns = {d["name"]: parse_definition(dict(d), engine_config, "runtime") for d in definitions}

    async def main():
        p.source = SOURCE
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        p.source = clicks
        await p.process([(0, [event(0, user="u1", ts=T0, k="open")])])
        await p.process([(0, [event(1, user="u1", ts=T0 + 1, k="close"),
                              event(2, user="u1", ts=T0 + 100, k="noise")])])
        assert orjson.loads(p.timers.partition_db(0)[orjson.dumps("user=u1")])["i"] == clicks
        consumer.behind(SOURCE, 0)  # u1's confirm (T0 + 5) is still to be read there
        assert await worker.run(p) == []
        p.source = SOURCE
        await p.process([(0, [event(1, user="u1", ts=T0 + 5, k="confirm")])])

    asyncio.run(main())
    assert p.commit.emitter.sent == []


def test_a_worker_whose_group_session_lapsed_sends_no_tick(worker, monkeypatch):
    """Woken after a pause past its session, before the rebalance: its partitions are
    most likely another worker's, and its clock ran on across the pause."""
    import agents.patterns as engine

    now = time.time()
    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=now, k="pay")])])
        assert await worker.run(p) == []
        wall_clock_ahead(monkeypatch, 60)
        monkeypatch.setattr(engine, "commit_guard", types.SimpleNamespace(session_lapsed=lambda: True))
        assert await worker.run(p) == []

    asyncio.run(main())
