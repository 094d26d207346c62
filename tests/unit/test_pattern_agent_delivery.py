"""Delivery of the pattern agents (agents/patterns.py) over the processor harness
(app/harness.py): what a crash, a redelivery or a replaced pattern leaves behind
(docs/delivery.md AW)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from faust.types import TP

from app.batches import BatchRecord
from app.harness import PatternProcessor, Record
from app.transport import CommitGuard


@pytest.fixture(autouse=True)
def isolated_engine():
    """A failed test leaves its slowed ``send_alerts`` and a batch of its event loop in
    flight behind: the next tests would wait for them."""
    import agents.patterns as engine

    send_alerts = engine.send_alerts
    yield
    engine.send_alerts = send_alerts
    engine.InFlight.running.clear()


def forwarded(engine, partition: int, offset: int, **fields):
    """One record of the repartition topic as the repartition agent parses it."""
    fields.setdefault("ts", 100.0)
    body = orjson.dumps({"k": "user", "v": fields["user"], "src": "events", "ts": fields["ts"],
                         "id": f"{fields['user']}-{offset}", "e": fields})
    return engine.parse_repartitioned(
        BatchRecord(TP("patterns-repartition", partition), Record(partition, offset, body)))


def sent_alerts(processor: PatternProcessor) -> list[dict]:
    return [orjson.loads(v) for _, _, v, _, _ in processor.commit.emitter.sent]


def alerts_held(engine) -> tuple[asyncio.Event, object]:
    """Hold every batch's alerts back until the returned event is set (the broker has
    not acknowledged them yet); returns it and the real ``send_alerts``."""
    gate = asyncio.Event()
    real_send = engine.send_alerts

    async def slow_send(alerts):
        if alerts:
            await gate.wait()
        await real_send(alerts)

    engine.send_alerts = slow_send
    return gate, real_send


def stored_offsets(processor: PatternProcessor, key: str) -> dict:
    stored = processor.store.data.get(0, {}).get(orjson.dumps(key))
    return orjson.loads(stored)["o"] if stored is not None else {}


BIG = [{"name": "big", "type": "threshold", "key_by": "user", "where": "v > 100"}]


def test_a_flush_by_another_batch_does_not_write_a_state_whose_alert_is_unsent():
    async def main():
        p = PatternProcessor(BIG, cache_limit=4)  # at most 2 unwritten states
        with p.installed() as engine:
            await engine.apply_items([forwarded(engine, 0, 0, user="K", v=1)])
            gate, real_send = alerts_held(engine)  # the broker has not acknowledged them yet
            a = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 1, user="K", v=500)]))
            await asyncio.sleep(0)
            # Another agent's batch: over the limit of unwritten states, it flushes.
            b = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 2, user="L", v=1)]))
            for _ in range(20):
                await asyncio.sleep(0)
            assert stored_offsets(p, "user=K") in ({}, {"patterns-repartition": 0})  # not offset 1
            a.cancel()  # the crash: the alert never reaches the broker
            # The cache failed with it: the other batch's flush writes nothing.
            with pytest.raises(RuntimeError, match="batch failed"):
                await b
            assert stored_offsets(p, "user=K") in ({}, {"patterns-repartition": 0})
            engine.send_alerts = real_send
            assert not sent_alerts(p)
        q = PatternProcessor(BIG, cache_limit=4)
        q.store = p.store  # restart on the stored state: offset 1 is redelivered
        with q.installed() as engine:
            await engine.apply_items([forwarded(engine, 0, 1, user="K", v=500)])
        assert [a["pattern"] for a in sent_alerts(q)] == ["big"]

    asyncio.run(main())


def test_a_flush_outside_any_batch_waits_for_the_batch_changing_states_in_place():
    """The commit protocol flushes on a rebalance (``partitions_moved``) while a batch
    may be in flight: a lone batch changes the cached state itself, so the flush waits
    until that batch's alert is acknowledged."""
    async def main():
        p = PatternProcessor(BIG)
        with p.installed() as engine:
            await engine.apply_items([forwarded(engine, 0, 0, user="K", v=1)])
            await engine.flush_states()
            gate, real_send = alerts_held(engine)  # the broker has not acknowledged them yet
            a = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 1, user="K", v=500)]))
            await asyncio.sleep(0)
            assert p.cache.changing is not None  # alone: in place
            flush = asyncio.create_task(p.cache.flush())
            for _ in range(20):
                await asyncio.sleep(0)
            assert not flush.done()
            assert stored_offsets(p, "user=K") == {"patterns-repartition": 0}
            gate.set()
            await a
            await flush
            assert stored_offsets(p, "user=K") == {"patterns-repartition": 1}
            assert [x["pattern"] for x in sent_alerts(p)] == ["big"]

    asyncio.run(main())


def test_a_batch_starting_while_a_flush_waits_matches_copies():
    async def main():
        p = PatternProcessor(BIG)
        with p.installed() as engine:
            gate, real_send = alerts_held(engine)  # the broker has not acknowledged them yet
            a = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 0, user="K", v=500)]))
            await asyncio.sleep(0)
            first = p.cache.changing
            flush = asyncio.create_task(p.cache.flush())
            await asyncio.sleep(0)
            b = asyncio.create_task(engine.apply_items([forwarded(engine, 1, 0, user="L", v=1)]))
            await asyncio.sleep(0)
            assert p.cache.changing is first  # the second batch did not take over
            gate.set()
            await asyncio.gather(a, b, flush)
            assert p.cache.changing is None

    asyncio.run(main())


def test_concurrent_batches_for_one_key_both_reach_its_state():
    burst = [{"name": "burst", "type": "frequency", "key_by": "user", "where": "v > 0",
              "count": 3, "within": 60}]

    async def main():
        p = PatternProcessor(burst)
        with p.installed() as engine:
            gate = asyncio.Event()
            real_send = engine.emitter.send
            calls = 0

            async def slow_send(*args, **kw):  # the first batch's outputs wait for the broker
                nonlocal calls
                calls += 1
                if calls == 1:
                    await gate.wait()
                await real_send(*args, **kw)

            p.commit.emitter.send = slow_send
            a = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 0, user="K", v=1)]))
            await asyncio.sleep(0)
            b = asyncio.create_task(engine.apply_items([forwarded(engine, 0, 1, user="K", v=1)]))
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(a, b)
            await engine.apply_items([forwarded(engine, 0, 2, user="K", v=1)])
        assert [a["pattern"] for a in sent_alerts(p)] == ["burst"]

    asyncio.run(main())


BURST = [{"name": "burst", "type": "frequency", "key_by": "card", "source": "tx",
          "count": 3, "within": 60}]


def tx(offset: int, ts: float) -> Record:
    return Record(0, offset, orjson.dumps({"card": "c1", "ts": ts, "event_id": f"e{offset}"}))


def test_a_redelivered_source_batch_is_not_applied_twice_for_a_repartitioned_key():
    from app.harness import pattern_processor, run_batches

    batch = [tx(0, 100.0), tx(1, 101.0)]  # two events: below count=3
    # The batch's state flushed by the commit hook, its source offset commit lost: the
    # broker redelivers it, forwarded again at new offsets of the repartition topic.
    outputs, state = run_batches(pattern_processor(BURST, source="tx"), [batch, batch])
    assert outputs == []
    stored = next(v for db in state.values() for v in db.values())
    assert stored["o"] == {"tx:0": 1}
    assert stored["s"]["burst"]["st"] == {"h": [[100.0, "e0"], [101.0, "e1"]]}


def test_a_state_and_a_forwarded_record_without_source_positions_are_still_read():
    from app.kafka_io import KeyPartitioner
    from app.settings import settings

    p = PatternProcessor(BURST, source="tx")
    part = KeyPartitioner(settings.topic_partitions)(b"c1")
    old = {"o": {"patterns-repartition": 7}, "s": {"burst": {"f": p.patterns["burst"].fingerprint,
                                                            "st": {"h": [[99.0, "e-old"]]}}}}
    p.store.data[part] = {b'"card=c1"': orjson.dumps(old)}

    async def main():
        with p.installed() as engine:
            # A record forwarded by the old code (no "sp"/"so"), redelivered: skipped.
            body = orjson.dumps({"k": "card", "v": "c1", "src": "tx", "ts": 100.0, "id": "e7",
                                 "e": {"card": "c1", "ts": 100.0}})
            item = engine.parse_repartitioned(
                BatchRecord(TP("patterns-repartition", part), Record(part, 7, body)))
            await engine.apply_items([item])
        await p.process([(0, [tx(0, 100.0), tx(1, 101.0)])])  # new records: applied

    asyncio.run(main())
    assert [orjson.loads(v)["evidence"][0]["event_id"] for _, _, v, _, _ in p.commit.emitter.sent] == ["e-old"]


def test_a_replaced_pattern_leaves_no_timer_that_stays_due():
    from app.patterns import EngineConfig, parse_definition

    hb = {"name": "hb", "type": "absence", "key_by": "dev", "within": 30,
          "trigger": "k == 'beat'", "expect": "k == 'beat'"}
    p = PatternProcessor([hb])

    async def main():
        await p.process([(0, [Record(0, 0, orjson.dumps({"dev": "d1", "ts": 100, "k": "beat"}))])])
        await p.commit.before_commit()
        with p.installed() as engine:
            assert engine.timer_index.entries["dev=d1"]["d"] == 130
        # PUT /api/v1/patterns: the same name, a new definition (a new fingerprint).
        p.patterns = {"hb": parse_definition({**hb, "within": 3600}, EngineConfig(), "runtime")}
        with p.installed() as engine:
            timer = engine.timer_index.entries["dev=d1"]
            body = orjson.dumps({"tick": True, "t": "dev=d1", "k": timer["k"], "v": timer["v"],
                                 "src": timer["src"], "now": 200})
            item = engine.parse_repartitioned(
                BatchRecord(TP("patterns-repartition", timer["p"]), Record(timer["p"], 0, body)))
            await engine.apply_items([item])  # the tick fire_due_timers sends
            assert "dev=d1" not in engine.timer_index.entries
        await p.commit.before_commit()

    asyncio.run(main())
    stored = next(orjson.loads(v) for db in p.store.data.values() for v in db.values())
    assert stored["s"] == {} and "t" not in stored
    assert p.commit.emitter.sent == []


class TwoSources(PatternProcessor):
    """A processor whose patterns read two sources (``process_source``)."""

    def __init__(self, definitions, sources):
        from app.patterns import EngineConfig, parse_definition

        super().__init__([], source=sources[0])
        engine = EngineConfig(sources=tuple(sources))
        self.patterns = {d["name"]: parse_definition(dict(d), engine, "runtime") for d in definitions}

    async def process_source(self, source, parts):
        self.source = source
        await self.process(parts)


def ev(partition: int, offset: int, **fields) -> Record:
    return Record(partition, offset, orjson.dumps(fields))


async def forward_to_partition_1(p, engine, src: str, records: list[Record]) -> list:
    """``records`` of ``src`` split as the source agent does, their forwarded events read
    back from partition 1 of the repartition topic (the next offsets there)."""
    before = len(p.commit.emitter.sent)
    await engine.split_source_batch(src, [(TP(src, 0), records)])
    out = p.commit.emitter.sent[before:]
    del p.commit.emitter.sent[before:]
    items = []
    for _, key, value, _, _ in out:
        offset = p.forwarded[1] = p.forwarded.get(1, -1) + 1
        items.append(engine.parse_repartitioned(
            BatchRecord(TP("patterns-repartition", 1), Record(1, offset, value, key))))
    return items


def test_an_event_of_one_source_keeps_the_state_of_another_sources_patterns():
    defs = [
        {"name": "fails", "type": "frequency", "key_by": "user", "source": "logins",
         "count": 3, "within": 60},
        {"name": "no-confirm", "type": "absence", "key_by": "user", "source": "logins",
         "trigger": "kind == 'pay'", "expect": "kind == 'confirm'", "within": 30},
        {"name": "big-click", "type": "threshold", "key_by": "user", "source": "clicks",
         "where": "n > 1000"},
    ]
    p = TwoSources(defs, ("logins", "clicks"))

    async def main():
        await p.process_source("logins", [(0, [ev(0, 0, user="u1", ts=100, kind="fail"),
                                               ev(0, 1, user="u1", ts=101, kind="pay")])])
        await p.commit.before_commit()
        await p.process_source("clicks", [(0, [ev(0, 0, user="u1", ts=102, n=1)])])
        await p.commit.before_commit()
        with p.installed() as engine:
            assert engine.timer_index.entries["user=u1"]["d"] == 131.0
        await p.process_source("logins", [(0, [ev(0, 2, user="u1", ts=103, kind="fail")])])
        await p.process_source("logins", [(0, [ev(0, 3, user="u1", ts=200, kind="other")])])

    asyncio.run(main())
    assert sorted(a["pattern"] for a in sent_alerts(p)) == ["fails", "no-confirm"]


def test_a_batch_with_events_of_two_sources_matches_each_by_its_own_sources_patterns():
    defs = [{"name": "fails", "type": "frequency", "key_by": "user", "source": "logins",
             "where": "kind == 'fail' or n > 0", "count": 3, "within": 60},
            {"name": "big-click", "type": "threshold", "key_by": "user", "source": "clicks",
             "where": "n > 1000"}]
    p = TwoSources(defs, ("logins", "clicks"))

    async def main():
        with p.installed() as engine:
            items = []  # one fetched batch of the repartition agent
            for src, records in (("logins", [ev(0, 0, user="u1", ts=100, kind="fail")]),
                                 ("clicks", [ev(0, 0, user="u1", ts=101, n=5),
                                             ev(0, 1, user="u1", ts=102, n=6)])):
                items += await forward_to_partition_1(p, engine, src, records)
            await engine.apply_items(items)

    asyncio.run(main())
    assert sent_alerts(p) == []


def test_a_tick_fires_the_timed_patterns_of_every_source_of_the_key():
    defs = [{"name": "no-confirm", "type": "absence", "key_by": "user", "source": "logins",
             "trigger": "kind == 'pay'", "expect": "kind == 'confirm'", "within": 30},
            {"name": "big-click", "type": "threshold", "key_by": "user", "source": "clicks",
             "where": "n > 1000"}]
    p = TwoSources(defs, ("logins", "clicks"))

    async def main():
        with p.installed() as engine:
            items = []
            # One repartition batch whose first item is a click: the timer is the logins
            # pattern's all the same.
            for src, record in (("clicks", ev(0, 0, user="u1", ts=100, n=5)),
                                ("logins", ev(0, 0, user="u1", ts=101, kind="pay"))):
                items += await forward_to_partition_1(p, engine, src, [record])
            await engine.apply_items(items)
            timer = engine.timer_index.entries["user=u1"]
            assert timer["d"] == 131.0
            body = orjson.dumps({"tick": True, "t": "user=u1", "k": timer["k"], "v": timer["v"],
                                 "src": timer["src"], "now": 140.0})
            offset = p.forwarded[1] = p.forwarded.get(1, -1) + 1
            await engine.apply_items([engine.parse_repartitioned(
                BatchRecord(TP("patterns-repartition", timer["p"]), Record(timer["p"], offset, body)))])
            assert "user=u1" not in engine.timer_index.entries

    asyncio.run(main())
    assert [a["pattern"] for a in sent_alerts(p)] == ["no-confirm"]


def test_a_batch_failing_between_the_parts_of_a_commit_stops_that_commit():
    """A commit's snapshot took every unwritten state and encodes them a part at a time,
    with batches in between. A batch that fails there drops the cache: the commit must
    not go on and cover the states it no longer has (their items would be skipped as
    applied after a restart, their matches never made)."""
    twice = [{"name": "twice", "type": "frequency", "key_by": "user", "where": "v > 0",
              "count": 2, "within": 600}]

    async def main():
        p = PatternProcessor(twice)
        guard = CommitGuard()
        p.commit._guard = guard
        p.commit.ENCODE_PART = 1  # two keys, two parts (production: more than 100 keys)
        with p.installed() as engine:
            async with guard.processing():
                await engine.apply_items([forwarded(engine, 0, 0, user="K", v=1),
                                          forwarded(engine, 0, 1, user="L", v=1)])
            async with guard.committing():
                rest = await p.commit.begin_commit()
            assert rest is not None
            writing = asyncio.ensure_future(rest)

            async def broken(alerts):
                raise RuntimeError("send failed")

            real_send, engine.send_alerts = engine.send_alerts, broken
            with pytest.raises(RuntimeError, match="send failed"):
                async with guard.processing():
                    await engine.apply_items([forwarded(engine, 0, 2, user="M", v=1)])
            engine.send_alerts = real_send
            with pytest.raises(RuntimeError, match="batch failed"):
                await writing  # so its offsets are not committed
        q = PatternProcessor(twice)
        q.store = q.cache.store = p.store
        with q.installed() as engine:
            # Redelivered from the last committed offset (none): K's first two events.
            await engine.apply_items([forwarded(engine, 0, 0, user="K", v=1),
                                      forwarded(engine, 0, 3, user="K", v=1)])
        assert [a["pattern"] for a in sent_alerts(q)] == ["twice"]

    asyncio.run(main())


def test_a_commit_encodes_no_part_while_a_batch_changes_states_in_place():
    async def main():
        p = PatternProcessor(BIG)
        p.commit.ENCODE_PART = 1
        with p.installed() as engine:
            async with p.guard.processing():
                await engine.apply_items([forwarded(engine, 0, 0, user="K", v=1),
                                          forwarded(engine, 0, 1, user="L", v=1)])
            async with p.guard.committing():
                rest = await p.commit.begin_commit()
            writing = asyncio.ensure_future(rest)
            gate, real_send = alerts_held(engine)  # the broker has not acknowledged them yet

            async def batch():
                async with p.guard.processing():
                    await engine.apply_items([forwarded(engine, 0, 2, user="K", v=500)])

            b = asyncio.create_task(batch())
            await asyncio.sleep(0.05)  # ample for the commit's parts (1 ms apart)
            assert p.cache.changing is not None
            assert stored_offsets(p, "user=K") in ({}, {"patterns-repartition": 0})
            b.cancel()  # the crash: the alert never reaches the broker
            with pytest.raises(RuntimeError, match="batch failed"):
                await writing
            assert stored_offsets(p, "user=K") in ({}, {"patterns-repartition": 0})

    asyncio.run(main())
