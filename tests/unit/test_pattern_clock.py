"""The pattern engine's event-time clock and the timer that sends ticks
(tables/patterns.py ``EventClock``, agents/patterns.py ``fire_due_timers``): a timer
fires when the partition's event time, learned from real events only, passes its
deadline (docs/delivery.md AY, P6)."""

from __future__ import annotations

import asyncio
import time
import types

import orjson
import pytest
from faust.types import TP

from app.batches import BatchRecord
from app.harness import PatternProcessor, Record

NO_CONFIRM = [{"name": "no-confirm", "type": "absence", "key_by": "user", "within": 30,
               "trigger": "k == 'pay'", "expect": "k == 'confirm'"}]
#: The backlog is an hour behind the wall clock (a restart after an outage).
T0 = time.time() - 3600


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes]] = []

    async def send(self, topic, key, partition, value):
        self.sent.append((partition, key, value))


@pytest.fixture
def timer_run(monkeypatch):
    """``fire_due_timers`` of a worker with partitions 0 and 1 recovered, a fresh clock
    and timer index (what a restart leaves), ticks into a fake producer; call it with
    the processor whose timers it scans and whether its inputs are read to their ends."""
    import agents.patterns as engine
    import tables.patterns as tables

    producer = FakeProducer()
    recovered = asyncio.Event()
    recovered.set()
    monkeypatch.setattr(engine, "app", types.SimpleNamespace(
        rebalancing=False, consumer=types.SimpleNamespace(assignment=lambda: {0, 1}),
        tables=types.SimpleNamespace(recovery=types.SimpleNamespace(completed=recovered))))
    monkeypatch.setattr(engine, "kafka_io", types.SimpleNamespace(producer=producer))
    clock = tables.EventClock()  # the worker's one clock, in both modules
    monkeypatch.setattr(engine, "clock", clock)
    monkeypatch.setattr(tables, "clock", clock)
    monkeypatch.setattr(engine, "timer_index", engine.TimerIndex())
    monkeypatch.setattr(engine, "_ticked", {})

    async def run(processor: PatternProcessor, idle: bool) -> list[dict]:
        monkeypatch.setattr(engine, "timer_store", processor.timers)
        monkeypatch.setattr(engine, "caught_up", lambda names: idle, raising=False)
        engine._ticked.clear()
        first = len(producer.sent)
        await engine.fire_due_timers.__wrapped__.__wrapped__()
        return [{"partition": p, "key": k, **orjson.loads(v)} for p, k, v in producer.sent[first:]]

    return run


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
                BatchRecord(TP("patterns-repartition", p), Record(p, offset, body, tick["key"])))
            await engine.apply_items([item])


def test_a_restart_fires_no_stored_timer_ahead_of_the_backlog_that_cancels_it(timer_run):
    import agents.patterns as engine

    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        await p.commit.before_commit()  # the state and its timer (due at T0 + 30) stored
        engine.clock.__init__()  # a restart: no event time known
        # The confirm at T0 + 5 is still waiting to be read.
        ticks = await timer_run(p, idle=False)
        assert ticks == []  # no event read since the restart: no event time yet
        await deliver_ticks(p, ticks)
        await p.process([(0, [event(1, user="u1", ts=T0 + 5, k="confirm")])])
        # The next trigger of the backlog: its timer is due at T0 + 130 in event time,
        # not now by the wall clock.
        await p.process([(0, [event(2, user="u1", ts=T0 + 100, k="pay")])])
        assert await timer_run(p, idle=False) == []

    asyncio.run(main())
    assert p.commit.emitter.sent == []


def test_a_tick_does_not_move_the_clock(timer_run):
    import agents.patterns as engine

    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0, k="pay")])])
        await p.commit.before_commit()
        engine.clock.__init__()  # a restart: no event time known
        # Nothing to read at that moment: the timer is due by the wall clock, and the
        # tick carries that reading.
        ticks = await timer_run(p, idle=True)
        assert len(ticks) == 1 and ticks[0]["now"] > T0 + 3000
        await deliver_ticks(p, ticks)  # the alert
        # Then records come in, from an hour ago: another pay, whose confirm comes 10 s
        # later in event time. The tick's reading is no event time: the new timer
        # (T0 + 130) is not due.
        await p.process([(0, [event(1, user="u1", ts=T0 + 100, k="pay")])])
        assert await timer_run(p, idle=False) == []
        await p.process([(0, [event(2, user="u1", ts=T0 + 110, k="confirm")])])

    asyncio.run(main())
    assert [orjson.loads(v)["at"] for _, _, v, _, _ in p.commit.emitter.sent] == [T0 + 30]


def test_a_partition_handed_back_has_no_event_time_until_it_sees_an_event(timer_run):
    import agents.patterns as engine
    from app import app

    p = PatternProcessor(NO_CONFIRM)

    async def main():
        await p.process([(0, [event(0, user="u1", ts=T0 + 200, k="pay")])])
        # The partition is revoked, then assigned again (a rebalance); meanwhile another
        # worker wrote a state whose timer is due at T0 + 130, and the records after it
        # (its confirm among them) are still to be read here.
        for signal in (app.on_partitions_revoked, app.on_partitions_assigned):
            for receiver in signal.iter_receivers(app):
                if receiver.__module__ == "tables.patterns":
                    await receiver(app, set())
        with p.installed():
            key = orjson.dumps("user=u2")
            p.store.partition_db(0)[key] = orjson.dumps({"o": {}, "s": {}, "t": T0 + 130})
            p.timers.partition_db(0)[key] = orjson.dumps(
                {"d": T0 + 130, "p": 0, "k": "user", "v": "u2", "src": "events"})
        assert await timer_run(p, idle=False) == []

    asyncio.run(main())
    assert 0 not in engine.clock._seen


def test_an_idle_partition_that_saw_events_fires_on_time_without_new_input(timer_run, monkeypatch):
    import tables.patterns as tables

    p = PatternProcessor(NO_CONFIRM)
    now = time.time()

    async def main():
        await p.process([(0, [event(0, user="u1", ts=now - 20, k="pay"),
                              event(1, user="u2", ts=now, k="pay")])])
        # Records still to be read: the clock stays at the newest event time (now).
        assert await timer_run(p, idle=False) == []
        # 15 s later, nothing else to read: the clock is at now + 15, past u1's deadline
        # (now + 10), not u2's (now + 30).
        monkeypatch.setattr(tables, "time", types.SimpleNamespace(time=lambda: time.time() + 15))
        ticks = await timer_run(p, idle=True)
        assert [t["t"] for t in ticks] == ["user=u1"]
        await deliver_ticks(p, ticks)

    asyncio.run(main())
    assert [orjson.loads(v)["key"] for _, _, v, _, _ in p.commit.emitter.sent] == ["u1"]
