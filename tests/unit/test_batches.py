"""The batch delivery path (app/batches.py, FastConsumer.deliver_batches), no broker.

What must hold: a handler sees each fetched record once, in offset order per partition;
records fetched before a seek (below the read offset) are dropped; offsets are acked only
after the handler returned, never below the committed offset, never twice; a failing
handler acks nothing and crashes the worker; a rebalance overtaking a fetch delivers
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from weakref import WeakSet

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from app.batches import BATCH_AGENTS, Batch, BatchAgent, BatchRecord
from app.transport import FastConsumer

TOPIC = "t"


def record(partition: int, offset: int, value: bytes = b"v", headers=()) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, offset, 1_700_000_000_123, 0, b"k", value, None, 1, len(value),
                          tuple(headers))


class FakeApp:
    def __init__(self) -> None:
        self.consumer_generation_id = 1
        self.crashed: list[BaseException] = []
        self.in_transaction = False

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


class ConsumerHost:
    """Just the state ``deliver_batches`` and ``ack_spans`` use."""

    deliver_batches = FastConsumer.deliver_batches
    ack_spans = FastConsumer.ack_spans
    _still_current = FastConsumer._still_current
    _new_offset = FastConsumer._new_offset
    seek_after_drop = FastConsumer.seek_after_drop
    forget_batches = FastConsumer.forget_batches
    fetch = FastConsumer.fetch
    _finish = FastConsumer._finish
    _finish_and_ack = FastConsumer._finish_and_ack
    wait_finishing = FastConsumer.wait_finishing
    _release = FastConsumer._release
    ack_if_none_failed = FastConsumer.ack_if_none_failed

    def __init__(self) -> None:
        self.app = FakeApp()
        self.flow_active = True
        self._read_offset: dict = defaultdict(lambda: None)
        self._committed_offset: dict = defaultdict(lambda: None)
        self._acked: dict = defaultdict(list)
        self._acked_index: dict = defaultdict(set)
        self._n_acked = 0
        self._buffered_partitions: set = set()
        self._unacked_messages: WeakSet = WeakSet()
        self._waiting_for_ack = None
        self._batch_next: dict = {}
        self._last_timestamp: dict = {}
        self._finishing = None
        self._finish_failed = None
        self.log = logging.getLogger("test")
        self.should_stop = False
        self.seeks = 0  # perform_seek calls (seek to the committed offsets)
        self.seeked: list[tuple[TP, int]] = []  # seek(tp, offset) calls
        self.assigned: set[TP] = {TP(TOPIC, p) for p in range(4)}

    async def perform_seek(self) -> None:
        self.seeks += 1

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeked.append((tp, offset))

    def assignment(self) -> set[TP]:
        return self.assigned


@pytest.fixture
def agent():
    seen: list[list[BatchRecord]] = []
    during: list[int] = []

    async def handler(batch: Batch) -> None:
        during.append(len(host_ref[0]._unacked_messages))
        seen.append(list(batch))

    host_ref: list[ConsumerHost] = []
    BATCH_AGENTS[TOPIC] = [BatchAgent("test", None, handler)]
    try:
        yield seen, during, host_ref
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_batch_wraps_lazily_and_records_mirror_faust_events():
    tp = TP(TOPIC, 2)
    batch = Batch()
    batch.add(tp, [record(2, 5, headers=[("a", b"1")]), record(2, 6)])
    assert len(batch) == 2
    first, second = list(batch)
    assert (first.topic, first.partition, first.offset, first.key, first.value) == (TOPIC, 2, 5, b"k", b"v")
    assert first.message is first and first.tp == tp
    assert first.timestamp == pytest.approx(1_700_000_000.123)
    assert first.headers == {"a": b"1"} and second.headers == {}


def test_records_are_acked_after_the_handler_and_only_once(agent):
    seen, during, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    records = {tp0: [record(0, o) for o in range(10, 13)], tp1: [record(1, o) for o in range(0, 2)]}
    asyncio.run(host.deliver_batches(records, None, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(0, 10), (0, 11), (0, 12), (1, 0), (1, 1)]
    assert during == [1]  # the batch was in flight (a rebalance waits for it)
    assert not host._unacked_messages
    assert set(host._acked) == {tp0, tp1}  # both have something to commit
    assert host._new_offset(tp0) == 13 and host._new_offset(tp1) == 2
    assert host._new_offset(tp0) is None  # committed once
    assert host._n_acked == 5
    assert host._read_offset[tp0] == 12 and host._read_offset[tp1] == 1
    # The same offsets again (a re-fetch after a seek) are not delivered twice.
    asyncio.run(host.deliver_batches({tp0: [record(0, o) for o in range(10, 14)]}, None, 1))
    assert [r.offset for r in seen[1]] == [12, 13]
    assert host._new_offset(tp0) == 14


def test_offsets_between_records_are_committed_past_and_old_batches_ignored(agent):
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp = TP(TOPIC, 0)
    # Offset 22 holds no record (a transaction marker): the commit goes past it.
    asyncio.run(host.deliver_batches({tp: [record(0, 20), record(0, 21), record(0, 23), record(0, 24)]}, None, 1))
    assert host._new_offset(tp) == 25
    # A batch entirely below the committed offset commits nothing.
    host._committed_offset[tp] = 30
    asyncio.run(host.deliver_batches({tp: [record(0, 25), record(0, 26)]}, None, 1))
    assert host._new_offset(tp) is None


def test_a_jump_past_the_read_offset_is_committed_past_like_a_gap(agent):
    _, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp = TP(TOPIC, 0)
    host._read_offset[tp] = 5
    asyncio.run(host.deliver_batches({tp: [record(0, 9)]}, None, 1))
    assert host._new_offset(tp) == 10


def test_a_failing_handler_acks_nothing_and_crashes_the_worker():
    async def handler(batch: Batch) -> None:
        raise RuntimeError("sink down")

    BATCH_AGENTS[TOPIC] = [BatchAgent("failing", None, handler)]
    try:
        host = ConsumerHost()
        tp = TP(TOPIC, 0)
        with pytest.raises(RuntimeError):
            asyncio.run(host.deliver_batches({tp: [record(0, 0), record(0, 1)]}, None, 1))
        assert host._new_offset(tp) is None and host._n_acked == 0
        assert [str(e) for e in host.app.crashed] == ["sink down"]
        assert host._read_offset[tp] is None
        assert not host._unacked_messages
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_nothing_is_delivered_after_a_rebalance_or_while_flow_is_suspended(agent):
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp = TP(TOPIC, 0)
    host.app.consumer_generation_id = 2
    asyncio.run(host.deliver_batches({tp: [record(0, 0)]}, None, 1))  # fetched in generation 1
    host.app.consumer_generation_id = 1
    host.flow_active = False
    asyncio.run(host.deliver_batches({tp: [record(0, 0)]}, None, 1))
    assert seen == [] and host._new_offset(tp) is None
    # Dropped in a newer generation: aiokafka's position is past the records and the
    # rebalance's own seek may already have run, so the consumer seeks again. While
    # flow is suspended (same generation), the rebalance's seek is still to come.
    assert host.seeks == 1


def test_a_fetch_overtaken_by_a_rebalance_is_dropped_and_rewound():
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def wait_next_records(timeout):
        # Faust waits for flow to resume, then fetches: in the next generation, possibly
        # after Recovery's seek to the committed offsets (the graceful-leave loss).
        host.app.consumer_generation_id = 2
        return {tp: [record(0, 7057)]}, {tp}

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host.seeks == 1

    async def nothing(timeout):
        host.app.consumer_generation_id = 3
        return {}, {tp}

    host._wait_next_records = nothing
    assert asyncio.run(host.fetch(1.0)) is None
    assert host.seeks == 1  # nothing was dropped: no seek


def test_a_dropped_fetch_of_a_never_committed_partition_is_fetched_again():
    """Found through issue 20's lag metric: aiokafka's seek_to_committed does not move a
    partition with no committed offset, so after a dropped fetch its records were never
    delivered (the partition stayed behind until new input came, and records nobody had
    processed were skipped). Such a partition is rewound to the first dropped record."""
    host = ConsumerHost()
    committed, uncommitted, revoked = TP(TOPIC, 0), TP(TOPIC, 1), TP(TOPIC, 3)
    host._committed_offset[committed] = 40
    host.assigned = {committed, uncommitted}
    dropped = {committed: [record(0, 40)], uncommitted: [record(1, 0), record(1, 1)],
               revoked: [record(3, 0)], TP(TOPIC, 2): []}
    asyncio.run(host.seek_after_drop(dropped))
    assert host.seeks == 1  # the committed one: perform_seek's seek to the committed offset
    assert host.seeked == [(uncommitted, 0)]


def test_partitions_not_active_are_not_delivered(agent):
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    asyncio.run(host.deliver_batches({tp0: [record(0, 0)], tp1: [record(1, 0)]}, {tp1}, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(1, 0)]
    assert host._new_offset(tp0) is None and host._new_offset(tp1) == 1


def test_every_batch_agent_of_a_topic_gets_the_batch_before_it_is_acked():
    calls = []

    def make(name):
        async def handler(batch: Batch) -> None:
            calls.append((name, [r.offset for r in batch], dict(host._batch_next)))
        return BatchAgent(name, None, handler)

    host = ConsumerHost()
    BATCH_AGENTS[TOPIC] = [make("pipeline"), make("patterns")]
    try:
        tp = TP(TOPIC, 0)
        asyncio.run(host.deliver_batches({tp: [record(0, 0), record(0, 1)]}, None, 1))
        assert calls == [("pipeline", [0, 1], {}), ("patterns", [0, 1], {})]
        assert host._new_offset(tp) == 2
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_revoked_partitions_forget_their_uncommitted_batches(agent):
    # Faust does not commit on revocation: the next owner restarts at the committed
    # offset, so an acked-but-uncommitted batch must not be committed later (ahead of
    # what the new generation processed).
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    asyncio.run(host.deliver_batches({tp0: [record(0, o) for o in range(100, 123)],
                                      tp1: [record(1, 0)]}, None, 1))
    host.forget_batches({tp0})
    host._read_offset[tp0] = 91  # the seek to the committed offset, next generation
    asyncio.run(host.deliver_batches({tp0: [record(0, o) for o in range(91, 95)]}, None, 1))
    assert host._new_offset(tp0) == 95  # not 123
    assert host._new_offset(tp1) == 1


class Deferring:
    """A batch agent that hands "wait for the broker" to ``finish_later``; the test
    releases each batch's wait by hand."""

    def __init__(self) -> None:
        self.handled: list[list[int]] = []
        self.gates: list[asyncio.Future] = []
        self.finished: list[int] = []

    async def handler(self, batch: Batch) -> None:
        offsets = [r.offset for r in batch]
        self.handled.append(offsets)
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)

        async def finish() -> None:
            await gate
            self.finished.append(offsets[-1])

        batch.finish_later(finish())


@pytest.fixture
def deferring():
    agent = Deferring()
    BATCH_AGENTS[TOPIC] = [BatchAgent("deferring", None, agent.handler)]
    try:
        yield agent
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_deferred_work_finishes_before_the_ack_while_the_next_batch_is_handled(deferring):
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def run() -> None:
        await host.deliver_batches({tp: [record(0, 0), record(0, 1)]}, None, 1)
        # Handled, not finished: nothing acked, the batch still counts as in flight
        # (what a rebalance waits for), and the next batch may be handled already.
        assert host._new_offset(tp) is None and len(host._unacked_messages) == 1
        second = asyncio.ensure_future(host.deliver_batches({tp: [record(0, 2)]}, None, 1))
        await asyncio.sleep(0.01)
        assert deferring.handled == [[0, 1], [2]]
        assert not second.done()  # waits for the first batch to finish: one at a time
        deferring.gates[0].set_result(None)
        await second
        assert deferring.finished == [1]
        assert host._batch_next == {tp: 2}
        deferring.gates[1].set_result(None)
        await host.wait_finishing()
        assert deferring.finished == [1, 2] and host._batch_next == {tp: 3}
        assert not host._unacked_messages and not host.app.crashed

    asyncio.run(run())


def test_failing_deferred_work_acks_nothing_and_crashes_the_worker(deferring):
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def run() -> None:
        await host.deliver_batches({tp: [record(0, 0)]}, None, 1)
        deferring.gates[0].set_exception(RuntimeError("sink down"))
        await host.wait_finishing()

    asyncio.run(run())
    assert host._new_offset(tp) is None and host._n_acked == 0
    assert [str(e) for e in host.app.crashed] == ["sink down"]
    assert not host._unacked_messages


def test_no_later_batch_is_acked_after_one_failed_to_finish(deferring):
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def run() -> None:
        await host.deliver_batches({tp: [record(0, 0)]}, None, 1)
        second = asyncio.ensure_future(host.deliver_batches({tp: [record(0, 1)]}, None, 1))
        await asyncio.sleep(0.01)
        deferring.gates[0].set_exception(RuntimeError("sink down"))
        await second
        deferring.gates[1].set_result(None)  # the later batch finishes fine...
        await host.wait_finishing()

    asyncio.run(run())
    # ...but acking it would let a commit skip the failed one.
    assert host._new_offset(tp) is None and host._n_acked == 0
    assert [str(e) for e in host.app.crashed] == ["sink down"]


def test_a_batch_without_deferred_work_acks_after_the_one_still_finishing():
    tp = TP(TOPIC, 0)
    gates: list[asyncio.Future] = []

    async def handler(batch: Batch) -> None:
        if not gates:  # only the first batch defers
            gate = asyncio.get_running_loop().create_future()
            gates.append(gate)
            batch.finish_later(gate)

    BATCH_AGENTS[TOPIC] = [BatchAgent("sometimes", None, handler)]
    try:
        host = ConsumerHost()

        async def run() -> None:
            await host.deliver_batches({tp: [record(0, 0)]}, None, 1)
            second = asyncio.ensure_future(host.deliver_batches({tp: [record(0, 1)]}, None, 1))
            await asyncio.sleep(0.01)
            assert not second.done() and host._batch_next == {}
            gates[0].set_result(None)
            await second
            assert host._batch_next == {tp: 2}

        asyncio.run(run())
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_under_exactly_once_deferred_work_is_awaited_before_the_ack(deferring):
    host = ConsumerHost()
    host.app.in_transaction = True
    tp = TP(TOPIC, 0)

    async def run() -> None:
        delivery = asyncio.ensure_future(host.deliver_batches({tp: [record(0, 0)]}, None, 1))
        await asyncio.sleep(0.01)
        assert not delivery.done() and host._new_offset(tp) is None
        deferring.gates[0].set_result(None)
        await delivery
        assert host._finishing is None and host._batch_next == {tp: 1}

    asyncio.run(run())


class ScriptedFetches(ConsumerHost):
    """``fetch`` returns the scripted results in turn, then None (nothing more)."""

    freshen = FastConsumer.freshen

    def __init__(self, results: list) -> None:
        super().__init__()
        self.results = list(results)
        self.fetches = 0

    async def fetch(self, timeout: float):
        self.fetches += 1
        return self.results.pop(0) if self.results else None


def test_freshen_adds_what_arrived_meanwhile_in_offset_order():
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    host = ScriptedFetches([({tp0: [record(0, 2)], tp1: [record(1, 7)]}, {tp0, tp1}, 1),
                            ({tp0: [record(0, 3), record(0, 4)]}, {tp0, tp1}, 1)])
    (records, _active, generation), newer = asyncio.run(host.freshen(({tp0: [record(0, 1)]}, {tp0}, 1)))
    assert generation == 1 and newer is None
    assert {tp: [r.offset for r in rs] for tp, rs in records.items()} == {tp0: [1, 2, 3, 4], tp1: [7]}
    assert host.fetches == 2  # FRESHEN_ROUNDS


def test_freshen_stops_when_nothing_more_came_or_the_batch_is_large():
    tp0 = TP(TOPIC, 0)
    host = ScriptedFetches([])
    (records, _a, _g), _ = asyncio.run(host.freshen(({tp0: [record(0, 1)]}, None, 1)))
    assert [r.offset for r in records[tp0]] == [1] and host.fetches == 1
    from app import transport

    big = {tp0: [record(0, o) for o in range(transport.FRESHEN_BELOW)]}
    host = ScriptedFetches([({tp0: [record(0, 5000)]}, None, 1)])
    asyncio.run(host.freshen((big, None, 1)))
    assert host.fetches == 0  # a backlog: deliver what came at once


def test_freshen_keeps_a_newer_generations_fetch_for_later():
    tp0 = TP(TOPIC, 0)
    newer_fetch = ({tp0: [record(0, 0)]}, None, 2)
    host = ScriptedFetches([newer_fetch])

    async def run():
        (records, _a, generation), newer = await host.freshen(({tp0: [record(0, 9)]}, None, 1))
        assert generation == 1 and [r.offset for r in records[tp0]] == [9]
        assert await newer == newer_fetch

    asyncio.run(run())
