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
from collections import defaultdict, deque
from weakref import WeakSet

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from app.batches import BATCH_AGENTS, Batch, BatchAgent, BatchRecord
from app.transport import MAX_FINISHING, FastConsumer

TOPIC = "t"


def record(partition: int, offset: int, value: bytes = b"v", headers=()) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, offset, 1_700_000_000_123, 0, b"k", value, None, 1, len(value),
                          tuple(headers))


class FakeTables:
    aborted_writes = False

    def on_aborted_writes(self) -> None:
        self.aborted_writes = True


class FakeApp:
    def __init__(self) -> None:
        self.consumer_generation_id = 1
        self.rebalancing = False
        self.crashed: list[BaseException] = []
        self.in_transaction = False
        self.tables = FakeTables()

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


class ConsumerHost:
    """Just the state ``deliver_batches`` and ``ack_spans`` use."""

    deliver_batches = FastConsumer.deliver_batches
    ack_spans = FastConsumer.ack_spans
    _still_current = FastConsumer._still_current
    _new_offset = FastConsumer._new_offset
    _filter_tps_with_pending_acks = FastConsumer._filter_tps_with_pending_acks
    section_interrupted = FastConsumer.section_interrupted
    commit = FastConsumer.commit
    _commit_guarded = FastConsumer._commit_guarded
    seek_after_drop = FastConsumer.seek_after_drop
    seek_and_rewind = FastConsumer.seek_and_rewind
    rewind_dropped = FastConsumer.rewind_dropped
    take_prefetch = FastConsumer.take_prefetch
    _rewind = FastConsumer._rewind
    forget_batches = FastConsumer.forget_batches
    fetch = FastConsumer.fetch
    _finish = FastConsumer._finish
    _finish_and_ack = FastConsumer._finish_and_ack
    wait_finishing = FastConsumer.wait_finishing
    _release = FastConsumer._release
    ack_if_none_failed = FastConsumer.ack_if_none_failed
    hold_back = FastConsumer.hold_back
    hold_fetched = FastConsumer.hold_fetched
    release_fetched = FastConsumer.release_fetched
    merge_held = FastConsumer.merge_held
    first_held = FastConsumer.first_held
    position = FastConsumer.position
    delivered_to = FastConsumer.delivered_to

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
        self._finishing: deque = deque()
        self._finish_failed = None
        self._broken_section = None
        self.log = logging.getLogger("test")
        self.should_stop = False
        self.seeks = 0  # perform_seek calls (seek to the committed offsets)
        #: Whether perform_seek moves assigned partitions with a committed offset there
        #: (what it is meant to do; a woken worker's seek was seen not to).
        self.seek_moves = True
        self._thread = FetchPositions()
        self._position_moves = 0
        self._held: dict = {}

    async def perform_seek(self) -> None:
        self.seeks += 1
        if self.seek_moves:
            for tp in self._thread.positions:
                if self._committed_offset.get(tp):
                    self._thread.positions[tp] = self._committed_offset[tp]
                    self._read_offset[tp] = self._committed_offset[tp]  # as Faust's does



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


@pytest.mark.parametrize("failure", [RuntimeError("handler failed"), asyncio.CancelledError()],
                         ids=["raised", "cancelled"])
def test_under_exactly_once_an_interrupted_batch_forbids_every_later_commit(failure):
    """Issue 23, finding 1: a graceful stop cancels the fetch loop in the middle of a
    batch and then commits (Faust's _stop_consumer); the open transaction held the
    outputs that batch had sent so far, without its offsets. The next owner processed
    the batch again: window results emitted twice. Under exactly_once no commit may
    follow an interrupted batch (its transaction is then aborted)."""
    sent: list[int] = []

    async def handler(batch: Batch) -> None:
        sent.append(len(list(batch)))  # outputs sent into the open transaction
        raise failure

    for in_transaction in (True, False):
        host = ConsumerHost()
        host.app.in_transaction = in_transaction
        BATCH_AGENTS[TOPIC] = [BatchAgent("test", None, handler)]
        try:
            with pytest.raises(type(failure)):
                asyncio.run(host.deliver_batches({TP(TOPIC, 0): [record(0, 0)]}, None, 1))
        finally:
            BATCH_AGENTS.pop(TOPIC, None)
        assert host._new_offset(TP(TOPIC, 0)) is None  # never acked
        if in_transaction:
            assert asyncio.run(host.commit()) is False
            # Its writes may be in the local RocksDB: no clean-shutdown marker (local_state).
            assert host.app.tables.aborted_writes
        else:
            assert host._broken_section is None  # at_least_once: later batches commit as before


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


class FetchPositions:
    """aiokafka's fetch positions, as ``FastConsumerThread.rewind`` moves them: back only,
    and only for assigned partitions that have one."""

    def __init__(self) -> None:
        self.positions: dict = {}

    async def position(self, tp):
        return self.positions.get(tp)

    async def rewind(self, tp, offset: int) -> bool:
        position = self.positions.get(tp)
        if position is None or position <= offset:
            return False
        self.positions[tp] = offset
        return True


def changelog_record(tp: TP, offset: int) -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, 1_700_000_000_123, 0, b"k", b"v", None, 1, 1, ())


def test_a_dropped_fetch_rewinds_the_changelog_partitions_recovery_is_reading():
    """Issue 23, finding 3 (a worker stuck in table recovery after a rebalance): Recovery
    seeks a changelog partition and resumes flow; the fetch begun in the old generation
    returns that partition's records in the new one and is dropped. The seek to the
    committed offsets does not move a changelog partition (nothing is committed for it),
    so its position stayed past the dropped records and Recovery never got them. The
    drop must put such a partition back to its first dropped record; a partition the
    committed seek positions is left to it."""
    host = ConsumerHost()
    changelog, source, unassigned = TP("app-table-changelog", 1), TP(TOPIC, 0), TP("app-table-changelog", 3)
    host._committed_offset[source] = 7000  # perform_seek positions it
    host._read_offset[changelog] = 100  # Recovery's seek (Faust sets the read offset with it)
    host._thread.positions = {changelog: 120, source: 7058}  # past the fetched records

    async def wait_next_records(timeout):
        host.app.consumer_generation_id = 2  # the fetch began in generation 1
        return ({changelog: [changelog_record(changelog, o) for o in range(100, 120)],
                 source: [record(0, 7057)], unassigned: [changelog_record(unassigned, 5)]},
                {changelog, source, unassigned})

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host.seeks == 1
    assert host._thread.positions == {changelog: 100, source: 7000}
    assert host._read_offset[changelog] == 100  # records from 100 on are delivered again
    assert unassigned not in host._thread.positions


def test_a_dropped_fetch_puts_a_partition_the_seek_left_past_it_back_to_its_committed_offset():
    """Issue 23, session 13 long mode (at_least_once, seed 1; docs/delivery.md, "Open: a
    new owner…"): a worker woken after a pause that the group outlasted (the broker was
    restarting) dropped a fetch and sought to the committed offsets, but its partitions
    stayed past the dropped records; the next batch's jump was acked as a gap and the
    records from the committed offset on were never processed (18 ids lost). The drop
    must put such a partition back to its committed offset."""
    host = ConsumerHost()
    host.seek_moves = False  # the seek that did not move the partition
    source = TP(TOPIC, 1)
    host._committed_offset[source] = 4494
    host._thread.positions = {source: 5950}

    async def wait_next_records(timeout):
        host.app.consumer_generation_id = 2
        return {source: [record(1, o) for o in range(5913, 5950)]}, {source}

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host._thread.positions == {source: 4494}
    assert host._read_offset[source] == 4494


def test_a_dropped_fetch_never_moves_a_partition_behind_a_later_committed_offset():
    """A committed offset past the dropped records: the group went on beyond them (the
    seek moved the partition forward, or another owner committed); nothing moves back."""
    host = ConsumerHost()
    host.seek_moves = False
    source = TP(TOPIC, 1)
    host._committed_offset[source] = 9000
    host._thread.positions = {source: 5950}

    async def wait_next_records(timeout):
        host.app.consumer_generation_id = 2
        return {source: [record(1, o) for o in range(5913, 5950)]}, {source}

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host._thread.positions == {source: 5950}
    assert host._read_offset[source] is None


def test_a_fetch_begun_before_a_seek_is_not_delivered(agent, monkeypatch):
    """Issue 23, long mode (docs/delivery.md, AF): the fetch loop begins the next fetch
    before it delivers the batch in hand. A worker woken after its session lapsed (the
    group kept it through a broker restart) dropped that batch and sought to the
    committed offsets, then delivered the fetch begun before the seek: its first record
    lay past the read offset the seek had set, the jump was acked as a gap, and
    everything from the committed offset to it was never processed (18 ids lost at
    at_least_once seed 1; window input, so whole windows, at seed 3). Such a fetch must
    be dropped, its partition left at the seek's position, and what the next fetch
    brings from there delivered."""
    import time

    from app.transport import _done, commit_guard

    seen, _during, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp = TP(TOPIC, 1)
    host._committed_offset[tp] = 4494
    host._read_offset[tp] = 5912  # delivered up to here before the pause, not committed
    host._thread.positions = {tp: 5990}  # past the batch in hand and the prefetch
    in_hand = {tp: [record(1, o) for o in range(5913, 5950)]}
    prefetched = ({tp: [record(1, o) for o in range(5950, 5990)]}, {tp}, 1)
    moves = host._position_moves  # when the prefetch began
    monkeypatch.setattr(commit_guard, "session_timeout", 45.0)
    monkeypatch.setattr(commit_guard, "session_ok_at", time.monotonic() - 70)  # paused 70 s
    asyncio.run(host.deliver_batches(in_hand, None, 1))
    assert seen == [] and host._thread.positions == {tp: 4494} and host._read_offset[tp] == 4494
    commit_guard.note_session_ok()  # its next heartbeat is answered: the group kept it

    # The fetch loop's next steps: the prefetch (delivered if take_prefetch gives it),
    # then the next fetch, from wherever the position is then.
    fetched = asyncio.run(host.take_prefetch(_done(prefetched), moves))
    if fetched is not None:
        asyncio.run(host.deliver_batches(*fetched))
    position = host._thread.positions[tp]
    asyncio.run(host.deliver_batches({tp: [record(1, o) for o in range(position, 5990)]}, None, 1))
    delivered = [r.offset for batch in seen for r in batch]
    assert delivered == list(range(4494, 5990))  # from the committed offset, none skipped
    assert host._new_offset(tp) == 5990
    assert fetched is None


def test_a_fetch_begun_after_a_seek_is_fetched_again_from_its_first_record():
    """A prefetch that overlapped a seek may also have been taken after it, at the new
    positions: dropped all the same, its partitions go back to its first records (never
    below the committed offset), so nothing is skipped. Without a move since it began,
    a prefetch is delivered as it is."""
    from app.transport import _done

    host = ConsumerHost()
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    host._committed_offset[tp0] = 100
    host._committed_offset[tp1] = 300
    host._thread.positions = {tp0: 140, tp1: 340}
    fetched = ({tp0: [record(0, o) for o in range(100, 140)], tp1: [record(1, o) for o in range(250, 340)]},
               {tp0, tp1}, 1)
    moves = host._position_moves
    assert asyncio.run(host.take_prefetch(_done(fetched), moves)) is fetched  # nothing moved
    assert host._thread.positions == {tp0: 140, tp1: 340}
    host._position_moves += 1  # a seek or a rewind since the prefetch began
    assert asyncio.run(host.take_prefetch(_done(fetched), moves)) is None
    assert host._thread.positions == {tp0: 100, tp1: 300}
    assert host._read_offset[tp0] == 100 and host._read_offset[tp1] == 300


def test_a_rewind_never_moves_a_partition_forward():
    """Issue 23, finding 3: a seek that came after the fetch (the consumer in its own
    thread) stands when it went further back; moving forward would skip records."""
    host = ConsumerHost()
    changelog = TP("app-table-changelog", 1)
    host._thread.positions = {changelog: 40}  # Recovery sought back to 40 meanwhile

    async def wait_next_records(timeout):
        host.app.consumer_generation_id = 2
        return {changelog: [changelog_record(changelog, o) for o in range(100, 120)]}, {changelog}

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host._thread.positions == {changelog: 40}
    assert host._read_offset[changelog] is None


def test_partitions_not_active_are_not_delivered(agent):
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    asyncio.run(host.deliver_batches({tp0: [record(0, 0)], tp1: [record(1, 0)]}, {tp1}, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(1, 0)]
    assert host._new_offset(tp0) is None and host._new_offset(tp1) == 1


def test_records_of_a_partition_not_active_are_fetched_again(agent):
    """Issue 23 (docs/delivery.md, "Open"): records that a fetch returned for a partition
    outside the batch's active set are not delivered, and aiokafka's position is already
    past them. Without a rewind nothing fetched them again, and the next batch's jump
    past the read offset was committed as a gap. The position goes back to the first
    of them (never forward); delivery is unchanged."""
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    host._thread.positions = {tp0: 12, tp1: 1}  # after fetching tp0 10-11 and tp1 0
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)], tp1: [record(1, 0)]}, {tp1}, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(1, 0)]
    assert host._thread.positions == {tp0: 10, tp1: 1}
    assert host._new_offset(tp0) is None


def test_records_of_a_held_partition_are_put_back_and_delivered_once_released(agent, monkeypatch):
    """A held partition (``PartitionHolds``: a stream-table join's stream side while its
    table partition is read) delivers nothing, even from a fetch begun before the hold:
    its position goes back to the first of those records, and once no holder holds it
    they are delivered, once; other partitions flow meanwhile."""
    import app.transport as transport

    holds = transport.PartitionHolds()
    monkeypatch.setattr(transport, "HELD_PARTITIONS", holds)
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    host._thread.positions = {tp0: 12, tp1: 1}
    holds.hold("join a", [tp0])
    holds.hold("join b", [tp0])
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)], tp1: [record(1, 0)]}, None, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(1, 0)]
    assert host._thread.positions == {tp0: 10, tp1: 1}
    assert host._new_offset(tp0) is None
    holds.release("join a", [tp0])  # join b still holds it
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)]}, None, 1))
    assert len(seen) == 1 and host._thread.positions[tp0] == 10
    holds.release("join b", [tp0])
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)]}, None, 1))
    assert [(r.partition, r.offset) for r in seen[1]] == [(0, 10), (0, 11)]
    assert host._new_offset(tp0) == 12


def test_a_partition_is_delivered_to_an_offset_once_no_record_before_it_waits():
    """``delivered_to``: the fetch position (past markers) at or past the offset, and no
    record before it taken from aiokafka and not yet handed to the agents; records
    fetched past it do not count."""
    host = ConsumerHost()
    tp = TP(TOPIC, 0)
    positions: dict = {}
    host._fetch_position = positions.get
    assert not host.delivered_to(tp, 10)  # no position yet
    positions[tp] = 9
    assert not host.delivered_to(tp, 10)
    positions[tp] = 12  # a fetch of 8-11 taken, not delivered
    fetch = {tp: [record(0, 8), record(0, 11)]}
    host.hold_fetched(fetch)
    assert not host.delivered_to(tp, 10)
    host.release_fetched(fetch)
    assert host.delivered_to(tp, 10) and host.delivered_to(tp, 12) and not host.delivered_to(tp, 13)
    later = {tp: [record(0, 12)]}
    host.hold_fetched(later)
    assert host.delivered_to(tp, 12)


def test_holds_are_taken_at_an_assignment_and_dropped_at_a_revocation():
    from app.transport import PartitionHolds

    holds = PartitionHolds()
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    holds.on_assign.append(lambda assigned: holds.hold("join", [tp for tp in assigned if tp.partition == 0]))
    holds.assigned({tp0, tp1})
    assert holds.held() == {tp0} and tp0 in holds and holds
    holds.revoked({tp0, tp1})
    assert holds.held() == set() and not holds


def test_the_holds_of_an_assignment_are_taken_before_faust_handles_it(monkeypatch):
    """Faust's assignment handling starts the recovery, which resumes the fetches: the
    holders must have held their partitions by then. Not when the worker stops."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    import app.transport as transport

    holds = transport.PartitionHolds()
    monkeypatch.setattr(transport, "HELD_PARTITIONS", holds)
    tp0 = TP(TOPIC, 0)
    holds.on_assign.append(lambda assigned: holds.hold("join", assigned))
    held_when_faust_ran: list = []

    async def faust_assigned(self, assigned, generation_id=0):
        held_when_faust_ran.append(holds.held())

    monkeypatch.setattr(faust_aiokafka.Consumer, "on_partitions_assigned", faust_assigned)
    consumer = object.__new__(FastConsumer)
    consumer.app = FakeApp()
    consumer.app.should_stop = False
    asyncio.run(consumer.on_partitions_assigned({tp0}, 1))
    assert held_when_faust_ran == [{tp0}]
    holds.revoked({tp0})
    consumer.app.should_stop = True
    asyncio.run(consumer.on_partitions_assigned({tp0}, 2))
    assert held_when_faust_ran == [{tp0}, set()]


def test_a_fetch_asks_aiokafka_for_the_active_partitions_less_the_held(monkeypatch):
    """aiokafka reads an empty partition set as every partition: with all of them held a
    fetch returns nothing, after a short pause, instead of asking for all. While any is
    held a fetch waits at most ``HELD_FETCH_TIMEOUT``: a released partition's buffered
    records would not wake it."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    import app.transport as transport

    holds = transport.PartitionHolds()
    monkeypatch.setattr(transport, "HELD_PARTITIONS", holds)
    monkeypatch.setattr(transport, "HELD_FETCH_TIMEOUT", 0.001)
    asked: list = []

    async def getmany(self, active_partitions, timeout):
        asked.append((active_partitions, timeout))
        return {"fetched": True}

    monkeypatch.setattr(faust_aiokafka.Consumer, "_getmany", getmany)
    consumer = object.__new__(FastConsumer)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    holds.hold("join", [tp0])
    assert asyncio.run(consumer._getmany({tp0, tp1}, 1.0)) == {"fetched": True}
    assert asked == [({tp1}, 0.001)]
    holds.hold("join", [tp1])
    assert asyncio.run(consumer._getmany({tp0, tp1}, 1.0)) == {}
    assert len(asked) == 1
    holds.release("join", [tp0, tp1])
    asyncio.run(consumer._getmany({tp0, tp1}, 1.0))
    assert asked[-1] == ({tp0, tp1}, 1.0)


def test_a_fetch_before_the_rebalance_ended_is_held_back(agent, monkeypatch):
    """Issue 23 (docs/delivery.md AB): Faust's Recovery resumes the stream partitions
    before it seeks them to their committed offsets, flow running. Records fetched in
    between were processed, and the seek then put the partitions back: processed twice
    (exactly_once alerts repeated). Until the rebalance ended nothing is delivered or
    acked; each partition goes back to its first fetched record, delivered once after."""
    import app.transport as transport

    monkeypatch.setattr(transport, "HOLD_BACK_PAUSE", 0)
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    host._thread.positions = {tp0: 12, tp1: 1}
    host.app.rebalancing = True
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)], tp1: [record(1, 0)]}, None, 1))
    assert seen == []
    assert host._thread.positions == {tp0: 10, tp1: 0}
    assert host._read_offset[tp0] == 10 and host._read_offset[tp1] == 0
    assert host._new_offset(tp0) is None and host._new_offset(tp1) is None

    host.app.rebalancing = False
    asyncio.run(host.deliver_batches({tp0: [record(0, 10), record(0, 11)], tp1: [record(1, 0)]}, None, 1))
    assert [(r.partition, r.offset) for r in seen[0]] == [(0, 10), (0, 11), (1, 0)]
    assert host._new_offset(tp0) == 12 and host._new_offset(tp1) == 1


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


def test_the_revocations_commit_covers_the_batches_acked_before_it(agent):
    """Issue 23, finding 1: Faust forgets the revoked partitions' ``_acked`` before its
    revoke handler commits (``wait_empty`` -> ``commit_and_end_transactions``), so that
    commit found nothing, and under exactly_once the open transactions (outputs and
    state of every batch since the last commit) stayed open across the rebalance while
    the worker re-read those batches from the committed offsets. Batches acked before
    the revocation are still pending commit after Faust's forgetting."""
    seen, _, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp0, tp1 = TP(TOPIC, 0), TP(TOPIC, 1)
    asyncio.run(host.deliver_batches({tp0: [record(0, o) for o in range(100, 123)],
                                      tp1: [record(1, 0)]}, None, 1))
    for tp in (tp0, tp1):  # Faust's on_partitions_revoked, before its handler commits
        host._acked.pop(tp, None)
        host._committed_offset.pop(tp, None)
    pending = set(host._filter_tps_with_pending_acks())
    assert pending == {tp0, tp1} == set(host._filter_tps_with_pending_acks({TOPIC}))
    assert {tp: host._new_offset(tp) for tp in pending} == {tp0: 123, tp1: 1}


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


def test_deferred_work_finishes_before_the_ack_while_the_next_batches_are_handled(deferring):
    """Batches finish in the background in order: the next batch is delivered at once
    (the fetch loop does not wait for the previous batch's broker round trips), each
    batch's work starts after the one before it is done, and acks stay in offset order
    even when a later batch's wait ends first."""
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def run() -> None:
        await host.deliver_batches({tp: [record(0, 0), record(0, 1)]}, None, 1)
        # Handled, not finished: nothing acked, the batch still counts as in flight
        # (what a rebalance waits for), and the next batch is handled at once.
        assert host._new_offset(tp) is None and len(host._unacked_messages) == 1
        # (Bounded: a loop that still waited for the first batch would time out here.)
        await asyncio.wait_for(host.deliver_batches({tp: [record(0, 2)]}, None, 1), 5)
        assert deferring.handled == [[0, 1], [2]] and len(host._unacked_messages) == 2
        deferring.gates[1].set_result(None)  # the later batch's wait ends first...
        await asyncio.sleep(0.01)
        assert deferring.finished == [] and host._batch_next == {}  # ...it waits its turn
        deferring.gates[0].set_result(None)
        await host.wait_finishing()
        assert deferring.finished == [1, 2] and host._batch_next == {tp: 3}
        assert not host._unacked_messages and not host.app.crashed

    asyncio.run(run())


def test_the_fetch_loop_waits_once_max_finishing_batches_are_still_finishing(deferring):
    """The background is bounded: with ``MAX_FINISHING`` batches still finishing, the
    next delivery waits for the oldest to finish (and be acked) before it returns."""
    host = ConsumerHost()
    tp = TP(TOPIC, 0)

    async def run() -> None:
        for offset in range(MAX_FINISHING):
            await asyncio.wait_for(host.deliver_batches({tp: [record(0, offset)]}, None, 1), 5)
        over = asyncio.ensure_future(host.deliver_batches({tp: [record(0, MAX_FINISHING)]}, None, 1))
        await asyncio.sleep(0.01)
        assert len(deferring.handled) == MAX_FINISHING + 1  # handled, then it waits
        assert not over.done()
        deferring.gates[0].set_result(None)
        await over
        assert host._batch_next == {tp: 1} and deferring.finished == [0]
        for gate in deferring.gates[1:]:
            gate.set_result(None)
        await host.wait_finishing()
        assert host._batch_next == {tp: MAX_FINISHING + 1} and not host._unacked_messages

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
        assert not host._finishing and host._batch_next == {tp: 1}

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


def test_freshen_does_not_top_up_a_fetch_the_loop_waited_for():
    """Issue 22 (docs/performance.md, "Issue 22, session 15"): a fetch the loop waited
    for (idle: the prefetch had not arrived when the last batch was done) is delivered
    as it is. Its records did not wait behind a batch; the top-ups only waited up to
    ``FRESHEN_TIMEOUT`` each for later records, 3-7 ms of a window end's latency at
    1,000 events/s. A fetch that was ready at once is still topped up."""
    tp0 = TP(TOPIC, 0)
    more = ({tp0: [record(0, 2)]}, None, 1)
    host = ScriptedFetches([more])
    fetched = ({tp0: [record(0, 1)]}, None, 1)
    assert asyncio.run(host.freshen(fetched, waited=True)) == (fetched, None)
    assert host.fetches == 0
    (records, _a, _g), _ = asyncio.run(host.freshen(({tp0: [record(0, 1)]}, None, 1), waited=False))
    assert [r.offset for r in records[tp0]] == [1, 2] and host.fetches == 2


def test_freshen_keeps_a_newer_generations_fetch_for_later():
    tp0 = TP(TOPIC, 0)
    newer_fetch = ({tp0: [record(0, 0)]}, None, 2)
    host = ScriptedFetches([newer_fetch])

    async def run():
        (records, _a, generation), newer = await host.freshen(({tp0: [record(0, 9)]}, None, 1))
        assert generation == 1 and [r.offset for r in records[tp0]] == [9]
        assert await newer == newer_fetch

    asyncio.run(run())


def test_a_commit_waiting_for_a_batch_that_is_interrupted_commits_nothing():
    """Issue 23, finding 1 (docs/delivery.md, L): a timer commit began while a batch was
    being handled, waited for its section to end, and went on when a SIGTERM cancelled
    the batch: it committed the batch's partial outputs (46 events repeated after a
    graceful leave)."""
    host = ConsumerHost()
    host.app.in_transaction = True
    gate: list[asyncio.Future] = []

    async def handler(batch: Batch) -> None:
        gate.append(asyncio.get_running_loop().create_future())
        await gate[0]  # outputs sent, state not yet stored

    async def main():
        delivery = asyncio.ensure_future(host.deliver_batches({TP(TOPIC, 0): [record(0, 0)]}, None, 1))
        while not gate:
            await asyncio.sleep(0)
        commit = asyncio.ensure_future(host.commit())  # waits for the section to end
        await asyncio.sleep(0.01)
        assert not commit.done()
        delivery.cancel()  # the fetch loop stopped mid-batch
        with pytest.raises(asyncio.CancelledError):
            await delivery
        return await commit  # Faust's commit would fail here on this host: never reached

    BATCH_AGENTS[TOPIC] = [BatchAgent("slow", None, handler)]
    try:
        assert asyncio.run(main()) is False
    finally:
        BATCH_AGENTS.pop(TOPIC, None)


def test_a_worker_whose_session_lapsed_processes_and_commits_nothing(agent, monkeypatch):
    """Issue 23 (docs/delivery.md, P): a worker paused past its session (the chaos
    verifier's zombie), woken, processed the records it had fetched and committed,
    flushing state cached before the pause (``before_commit``) over the new owner's
    writes; under exactly_once its sends met fenced producers and crashed it. While
    its session has lapsed it delivers nothing (the fetch is dropped and sought back
    to the committed offsets) and, under at_least_once, runs no commit hook and commits
    nothing. Once it is in the group again (``note_session_ok``) it goes on."""
    import time

    from app.transport import commit_guard

    seen, _during, host_ref = agent
    host = ConsumerHost()
    host_ref.append(host)
    tp = TP(TOPIC, 0)
    hooked: list = []

    async def hook():
        hooked.append(1)

    monkeypatch.setattr(commit_guard, "before_commit", [hook])
    monkeypatch.setattr(commit_guard, "session_timeout", 45.0)
    monkeypatch.setattr(commit_guard, "session_ok_at", time.monotonic() - 70)  # paused 70 s
    asyncio.run(host.deliver_batches({tp: [record(0, 5)]}, None, 1))
    assert seen == [] and host.seeks == 1 and not host._batch_next
    assert asyncio.run(host.commit()) is False and hooked == []
    commit_guard.note_session_ok()  # the next assignment
    asyncio.run(host.deliver_batches({tp: [record(0, 5)]}, None, 1))
    assert [r.offset for r in seen[0]] == [5]


def test_the_session_lapses_only_past_the_session_timeout(monkeypatch):
    import time

    from app.transport import CommitGuard

    guard = CommitGuard()
    assert not guard.session_lapsed()  # nothing known yet (before the first heartbeat)
    guard.session_timeout = 45.0
    guard.note_session_ok()
    assert not guard.session_lapsed()
    guard.session_ok_at = time.monotonic() - 46
    assert guard.session_lapsed()


def test_records_taken_but_not_delivered_keep_the_position_before_them():
    """docs/delivery.md BB (chaos seed 17, exactly_once): a new owner's recovery sought
    a dedupe changelog partition to 11665; the fetch begun in the old generation came
    back with 11665-14300 in the new one and was dropped, and before the drop's seek to
    the committed offsets (a round trip to the coordinator) and its rewind were done,
    the recovery's end check saw aiokafka's position past the highwater, nothing
    queued and the applied offset unchanged: it ended the recovery without those
    records. The new owner let copies its dedupe table should have held back through.
    Until a fetch's records are delivered or put back, the consumer's position is its
    first record."""
    host = ConsumerHost()
    changelog = TP("app-pipeline-dedupe-changelog", 0)
    host._read_offset[changelog] = 11665  # Recovery's seek
    host._thread.positions = {changelog: 14301}  # aiokafka's: past the fetch

    async def run():
        seek_may_end = asyncio.Event()

        async def slow_seek():
            host.seeks += 1
            await seek_may_end.wait()

        host.perform_seek = slow_seek

        async def wait_next_records(timeout):
            host.app.consumer_generation_id = 2  # the fetch began in generation 1
            return {changelog: [changelog_record(changelog, o) for o in range(11665, 14301)]}, {changelog}

        host._wait_next_records = wait_next_records
        fetch = asyncio.ensure_future(host.fetch(1.0))
        await asyncio.sleep(0.01)
        assert not fetch.done()  # waiting for the seek to the committed offsets
        during = await host.position(changelog)
        seek_may_end.set()
        assert await fetch is None
        return during, await host.position(changelog)

    during, after = asyncio.run(run())
    assert during == 11665
    assert after == 11665 and host._thread.positions[changelog] == 11665  # put back
    assert host._held == {}


def test_a_fetch_handed_over_stays_held_until_released_and_merges_keep_the_first_offset():
    """The fetch loop releases a fetch once it delivered it (or dropped and put back its
    records); a top-up merged into it (``freshen``) is held with it, from the earlier
    of the two first offsets; a dropped prefetch is released once put back."""
    from app.transport import _done

    host = ConsumerHost()
    tp = TP(TOPIC, 0)
    host._thread.positions = {tp: 30}
    first = {tp: [record(0, o) for o in range(10, 20)]}
    more = {tp: [record(0, o) for o in range(20, 30)]}
    host.hold_fetched(first)
    host.hold_fetched(more)
    assert asyncio.run(host.position(tp)) == 10
    first[tp] = first[tp] + more[tp]
    host.merge_held(first, more)
    assert len(host._held) == 1 and host.first_held(tp) == 10
    host.release_fetched(first)
    assert asyncio.run(host.position(tp)) == 30 and host.first_held(tp) is None

    prefetched = ({tp: [record(0, o) for o in range(30, 40)]}, {tp}, 1)
    host._thread.positions = {tp: 40}
    host.hold_fetched(prefetched[0])
    moves = host._position_moves
    host._position_moves += 1  # a seek since the prefetch began: dropped
    assert asyncio.run(host.take_prefetch(_done(prefetched), moves)) is None
    assert host._held == {} and asyncio.run(host.position(tp)) == 30


def test_a_partition_with_records_held_is_not_fetched_to_its_end():
    """``fetched_to`` (the window and pattern idle rule's "read to its end" before a
    first delivery) is False while records of the partition are taken but not
    delivered: aiokafka's position is past them already."""
    from types import SimpleNamespace

    from app.transport import fetched_to

    tp = TP(TOPIC, 0)
    state = SimpleNamespace(has_valid_position=True, position=50)
    aio = SimpleNamespace(
        _subscription=SimpleNamespace(subscription=SimpleNamespace(
            assignment=SimpleNamespace(state_value=lambda _tp: state))),
        _fetcher=SimpleNamespace(_records={}))
    host = ConsumerHost()
    host._thread = SimpleNamespace(_ensure_consumer=lambda: aio)
    assert fetched_to(host, tp, 50)
    held = {tp: [record(0, o) for o in range(40, 50)]}
    host.hold_fetched(held)
    assert not fetched_to(host, tp, 50)
    host.release_fetched(held)
    assert fetched_to(host, tp, 50)


def test_a_dropped_fetch_is_put_back_even_when_the_seek_to_the_committed_offsets_fails():
    """A review of BB's fix: the drop's seek to the committed offsets and its rewind ran
    in one ``try``, so a seek that raised skipped the rewind, and the fetch's hold then
    ended with aiokafka's position still past the dropped changelog records (nothing is
    committed for a changelog: only the rewind puts it back). The rewind runs anyway."""
    host = ConsumerHost()
    changelog = TP("app-pipeline-dedupe-changelog", 0)
    host._thread.positions = {changelog: 14301}

    async def failing_seek():
        host.seeks += 1
        raise RuntimeError("coordinator not available")

    host.perform_seek = failing_seek

    async def wait_next_records(timeout):
        host.app.consumer_generation_id = 2
        return {changelog: [changelog_record(changelog, o) for o in range(11665, 14301)]}, {changelog}

    host._wait_next_records = wait_next_records
    assert asyncio.run(host.fetch(1.0)) is None
    assert host.seeks == 1 and host._held == {}
    assert asyncio.run(host.position(changelog)) == 11665
