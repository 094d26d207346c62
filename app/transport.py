"""A faster consume hot path for Faust's aiokafka transport, installed through Faust's
own transport registry (broker URL scheme → ``Transport`` class).

Why: faust-streaming 0.15.3's ``Consumer._drain_messages`` delivers every message with
``await self.wait_first(callback(message), self.suspend_flow.wait())``, which creates
four tasks and one ``asyncio.wait`` *per message* so that a delivery blocked on a full
stream buffer can be interrupted when flow is suspended (rebalance, recovery). A
delivery almost never blocks, so that machinery is pure overhead on the hot path.

What changes (and only this):

* ``FastConsumer._drain_messages`` runs the delivery coroutine inline, up to its first
  suspension point. If it completes without suspending (the common case: there is room
  in the stream buffer), nothing else happens. If it suspends (buffer full, producer
  buffer full, flow control), the rest of the *same* coroutine is handed to the
  original ``wait_first(..., suspend_flow.wait())``, so a suspended flow still
  interrupts a blocked delivery exactly as before. If flow is already suspended, the
  original path is taken unchanged.
* Under exactly_once, ``FastConsumer.commit`` waits for agents' processing sections
  (:class:`CommitGuard`) so a transaction never holds outputs of unacked events.
* ``FastConsumer.fetch`` reports each partition's end offset to the monitor once per
  fetched batch instead of once per message (the value is the same for the batch).
* Topics with batch agents (app/batches.py) get each fetch's records in one call
  (``deliver_batches``), acked once per partition (``ack_spans``), as aiokafka's own
  parsed record objects rather than ``ConsumerRecord`` copies (:class:`RawPartitionRecords`).
* Work a batch handler defers (``Batch.finish_later``: waiting for acks, storing state)
  runs while the next batch is handled, under at_least_once; the batch is acked after it.
* A fetch that a rebalance overtook is dropped *and* followed by a seek to the committed
  offsets (``seek_after_drop``); revoked partitions forget their uncommitted batch acks
  (``forget_batches``). Both closed losses on rebalances (docs/delivery.md). Partitions
  that seek does not position (changelogs Recovery is reading) go back to their first
  dropped record (``rewind_dropped``): else Recovery waited for them for good.
* Table recovery that a rebalance interrupts starts over for the new assignment
  (:class:`Recovery`): Faust went on and sought partitions it had no offsets for.
* Under exactly_once, :class:`TransactionManager` puts every output sent while input is
  processed into a transaction (Faust sent outputs to topics the consumer does not read
  outside any transaction; docs/delivery.md).
* A subscription waits (at most 30 s) until the broker's metadata lists every topic in
  it (``FastConsumerThread.subscribe``): a topic created just before the group join
  was otherwise left unassigned for five minutes (docs/delivery.md, D).
* Under exactly_once, a rebalance first commits what was acked (``commit_on_revoke``),
  and ``TransactionManager.on_rebalance`` leaves every assigned partition in a fresh
  transaction, replacing a producer whose transaction timed out during the rebalance
  (docs/delivery.md, issue 23 finding 4).
* Static group membership (``group.instance.id``) with a LeaveGroup on graceful stop: a
  worker restarted after kill -9 gets its partitions back without a rebalance
  (``static_identity``, ``StaticLeave``; issue 23 finding 6).
* Faust's consumer "thread" (the service that owns the aiokafka consumer) runs in the
  worker's own event loop (``FastConsumerThread``, ``Settings.consumer_in_loop``):
  handing each fetch between two loops was most of a live stream's wait.

Everything else is Faust's: read offsets, gap tracking, acks, ``commit_every``,
commits, rebalance listeners, transactional producers and commits.

Constraint this relies on: the delivery callback must not use ``asyncio.timeout`` or
``asyncio.current_task()`` across its first suspension point (its first step runs in
the fetcher's task). Faust's conductor callback does not.

There is no switch back to Faust's own consumer: it cannot serve batch agents (every
processor of this project is one) and lacks the delivery fixes above (docs/delivery.md, issue 23 finding 5).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import inspect
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import faust
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.errors import IllegalOperation, IllegalStateError, KafkaError, ProducerFenced
from aiokafka.producer import sender as aiokafka_sender
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String
from faust import current_event as faust_current_event
from faust.agents.replies import ReplyConsumer as FaustReplyConsumer
from faust.assignor import PartitionAssignor as FaustPartitionAssignor
from faust.exceptions import ProducerSendError
from faust.models import maybe_model
from faust.streams import _current_event as faust_current_event_var
from faust.tables.manager import TableManager as FaustTableManager
from faust.tables.recovery import RebalanceAgain
from faust.tables.recovery import Recovery as FaustRecovery
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.consumer import TransactionManager as FaustTransactionManager
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer as FaustProducerBuffer
from faust.types.tuples import TP, ack_lock
from faust.web.drivers import DRIVERS as WEB_DRIVERS
from faust.web.drivers import aiohttp as faust_aiohttp_web
from mode import Service
from mode.utils.futures import notify

from app.batches import BATCH_AGENTS, PROCESSING_TOPIC, SOURCE_PARTITION, Batch, for_topic

log = logging.getLogger(__name__)

#: How aiokafka reports a transaction the coordinator fenced or aborted under this
#: producer (a zombie's): its commit is refused, not a crash (``FastConsumer.commit``).
FENCED = (ProducerFenced, IllegalOperation)

#: The broker URL scheme that selects this transport (``streametl-kafka://host:port``).
SCHEME = "streametl-kafka"
#: The web driver URL scheme that selects :class:`Web`.
WEB_SCHEME = "streametl-aiohttp"

#: ``FastConsumer.freshen``: at most this many extra fetches per batch, each waiting at
#: most this long for records, and only while a batch has fewer records than this.
FRESHEN_ROUNDS = 2
FRESHEN_TIMEOUT = 0.003
FRESHEN_BELOW = 1000


async def _done(value: Any) -> Any:
    return value


#: How long the fetch loop pauses after holding a fetch back until a rebalance ends.
HOLD_BACK_PAUSE = 0.05


class PartitionHolds:
    """Assigned batch-topic partitions whose records are not delivered for now: not
    fetched (``FastConsumer._getmany``) and, when a fetch begun before the hold has
    some, put back to the first of them (``deliver_batches``), to be fetched again once
    no holder holds them. A partition is held for the whole consumer: every batch agent
    of its topic waits.

    The stream side of a stream-table join is held until its table partition is read
    to its end after an assignment (agents/table_join.py). Holders say at each
    assignment what they hold (``on_assign``: called with the new assignment before
    Faust's assignment handling starts the table recovery, so no fetch of the new
    generation comes first); a revocation drops every hold of the revoked partitions."""

    def __init__(self) -> None:
        #: partition -> the holders holding it
        self.holders: dict[TP, set[Any]] = {}
        #: called with each new assignment (``FastConsumer.on_partitions_assigned``)
        self.on_assign: list[Callable[[set[TP]], None]] = []

    def __bool__(self) -> bool:
        return bool(self.holders)

    def __contains__(self, tp: Any) -> bool:
        return tp in self.holders

    def held(self) -> set[TP]:
        return set(self.holders)

    def hold(self, holder: Any, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.holders.setdefault(tp, set()).add(holder)

    def release(self, holder: Any, tps: Iterable[TP]) -> None:
        """``holder`` holds these partitions no more (others may still)."""
        for tp in tps:
            holders = self.holders.get(tp)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self.holders[tp]

    def assigned(self, assigned: set[TP]) -> None:
        for on_assign in self.on_assign:
            on_assign(assigned)

    def revoked(self, revoked: Iterable[TP]) -> None:
        for tp in revoked:
            self.holders.pop(tp, None)


HELD_PARTITIONS = PartitionHolds()

#: Seconds a fetch waits at most while partitions are held: a released partition's
#: records, buffered by aiokafka already, do not wake a fetch of the others.
HELD_FETCH_TIMEOUT = 0.05


#: How long a stopping consumer waits for the batches finishing in the background.
FINISH_ON_STOP_SECONDS = 10.0

#: How many batches may finish in the background (``Batch.finish_later``) before the
#: fetch loop waits for the oldest. Why more than one: a transform batch finishes with
#: two broker round trips (its outputs' acks, then its dedupe changelog's), and a loop
#: that waited for the previous batch's before it delivered the next held every record
#: fetched meanwhile (docs/performance.md, "Issue 22, session 17").
MAX_FINISHING = 4


class Observers:
    """Where the worker reports what it timed (``app.metrics`` sets these when metrics
    are on; None: nothing is timed, so metrics off cost nothing on the consume path).

    ``batch(agent_name, batch, seconds)``: once per batch agent call, after it returned.
    ``commit(seconds)``: once per offset commit (the before-commit flushes included).
    ``commit_hold(seconds)``: once per commit section (``CommitGuard.committing``), from
    the end of the batch it waited for until batches may run again.
    ``rebalance(phase, seconds)``: ``"assign"`` from a rebalance's start until this
    worker's partitions are assigned, ``"restore"`` from then until table recovery has
    completed (Faust's rebalance end)."""

    batch: Callable[[str, Batch, float], None] | None = None
    commit: Callable[[float], None] | None = None
    commit_hold: Callable[[float], None] | None = None
    rebalance: Callable[[str, float], None] | None = None


#: The one set of observers of this worker process.
observers = Observers()


#: Yield to the event loop after this many inline deliveries, so the web server, timers
#: and the stream's own tasks get a turn even when deliveries never suspend.
YIELD_EVERY = 100


class ResumeDelivery:
    """Awaitable that continues a coroutine which already ran to its first suspension.

    ``pending`` is what the coroutine yielded (a future it waits for, or ``None`` for a
    bare ``sleep(0)``); awaiting this object re-yields it to the event loop and then
    keeps driving the coroutine, forwarding results and exceptions (cancellation too).
    """

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.pending
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation must reach the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def start_inline(coro: Any) -> tuple[bool, Any]:
    """Run ``coro`` until it first suspends: ``(True, result)`` if it finished, else
    ``(False, ResumeDelivery)`` to await for the rest. Exceptions propagate."""
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, ResumeDelivery(coro, pending)


class CommitGuard:
    """Keeps offset commits out of an agent's processing section.

    Why: under exactly_once, Faust commits a transaction (outputs + consumer offsets)
    on a timer. If that happens while an agent is half-way through a batch, the
    transaction holds outputs of events whose offsets are not in it yet; a kill -9 then
    makes the next worker reprocess them and the committed output holds them twice
    (measured: tests/integration/test_exactly_once.py, with Faust's own consumer too).
    An agent wraps "send the outputs of a batch, then ack it" in :meth:`processing`;
    :class:`FastConsumer` commits only between such sections.
    """

    def __init__(self) -> None:
        self._active = 0
        self._committing = 0
        self._idle: asyncio.Event | None = None
        self._open: asyncio.Event | None = None
        #: Called (awaited, in order) before every offset commit, between processing
        #: sections: state kept in memory across batches (the window agents' write-back
        #: buffers) is made durable here, like Kafka Streams flushing its record caches
        #: at commit. A hook that raises stops the commit: its offsets stay uncommitted.
        #: A hook may return an awaitable, the rest of its work: under at_least_once it
        #: runs after the section is open again, with the offsets taken before, and
        #: those offsets commit only once it returned (app/commit.py, ``begin_commit``).
        self.before_commit: list[Callable[[], Awaitable[Awaitable[None] | None]]] = []
        self._one_commit: asyncio.Lock | None = None
        #: Processing sections waiting for a commit section to end.
        self._waiting = 0
        #: When this worker last knew its group session alive (a heartbeat answered, an
        #: assignment received; ``time.monotonic()``), and the session timeout (s).
        self.session_ok_at: float | None = None
        self.session_timeout: float | None = None

    def note_session_ok(self) -> None:
        self.session_ok_at = time.monotonic()

    def session_lapsed(self) -> bool:
        """Whether longer than the session timeout passed since this worker last knew
        its group session alive: the group has most likely gone on without it (a worker
        paused past its session, or its loop blocked that long) and other workers
        process its partitions from their committed offsets.

        Why (issue 23, docs/delivery.md, P): such a worker, woken, flushed the state it
        had cached before the pause to the changelogs (the commit's ``before_commit``
        hooks, then the revocation's flush), after the new owner's newer writes of the
        same keys and partition bookkeeping. Under at_least_once nothing fences those
        writes: the window state of a minute of input was reverted, and its windows
        were never emitted. aiokafka's own heartbeat routine uses the same rule to give
        its coordinator up; the broker decided at about the same time."""
        ok_at, timeout = self.session_ok_at, self.session_timeout
        return ok_at is not None and timeout is not None and time.monotonic() - ok_at > timeout

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        # Created lazily: the worker's event loop does not exist at import time.
        if self._idle is None or self._open is None:
            self._idle, self._open = asyncio.Event(), asyncio.Event()
            self._idle.set()
            self._open.set()
        return self._idle, self._open

    @contextlib.asynccontextmanager
    async def processing(self) -> AsyncIterator[None]:
        """A section no commit may interleave with (waits while a commit is pending)."""
        idle, open_ = self._events()
        while not open_.is_set():
            self._waiting += 1
            try:
                await open_.wait()
            finally:
                self._waiting -= 1
        self._active += 1
        idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                idle.set()

    async def let_waiting_in(self) -> None:
        """Between two sections of one commit: let the batches that wait for the section
        to end start first (the event loop wakes them a few steps after ``open`` is set,
        and a commit that closed it again at once kept them out of every section)."""
        _idle, open_ = self._events()
        while self._waiting and open_.is_set():
            await asyncio.sleep(0)

    def one_commit(self) -> asyncio.Lock:
        """Held by a commit from its snapshot until its offsets are committed: one commit
        at a time, so a later snapshot's offsets never commit before an earlier one's."""
        if self._one_commit is None:
            self._one_commit = asyncio.Lock()
        return self._one_commit

    @contextlib.asynccontextmanager
    async def committing(self) -> AsyncIterator[None]:
        """Wait until no processing section is open and keep new ones out meanwhile."""
        idle, open_ = self._events()
        self._committing += 1
        open_.clear()
        t0 = None
        try:
            while not idle.is_set():
                await idle.wait()
            t0 = time.perf_counter()
            yield
        finally:
            self._committing -= 1
            if not self._committing:
                open_.set()
            if observers.commit_hold is not None and t0 is not None:
                observers.commit_hold(time.perf_counter() - t0)


#: The one guard of this worker process (agents: ``async with commit_guard.processing()``).
commit_guard = CommitGuard()


class FastConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with an inline (task-free) delivery fast path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Batch partitions: the offset after the last acked batch, not yet committed.
        self._batch_next: dict[Any, int] = {}
        #: The batches whose deferred work (``Batch.finish_later``) runs in the
        #: background, oldest first; each waits for the one before it (``MAX_FINISHING``).
        self._finishing: collections.deque[asyncio.Future] = collections.deque()
        #: Set when a batch's deferred work failed: no later batch may be acked.
        self._finish_failed: BaseException | None = None
        #: exactly_once: why a batch's processing section did not finish (no more commits).
        self._broken_section: BaseException | None = None
        #: Batch partitions: Kafka timestamp (ms) of the last record handed to agents.
        self._last_timestamp: dict[Any, int] = {}
        #: Moves of aiokafka's fetch positions by this consumer (seeks to the committed
        #: offsets, rewinds) so far: a fetch begun before one is not delivered
        #: (``take_prefetch``).
        self._position_moves = 0
        #: The commit that ``commit_every`` acked records started (``commit_by_count``).
        self._count_commit: asyncio.Future | None = None
        #: Set while the fetch loop is not handing a fetch to batch agents (created with
        #: the loop: ``_between_batches``); what a stop waits for (``finish_batch``).
        self._no_batch: asyncio.Event | None = None
        #: Fetches whose records were taken from aiokafka (its positions are past them)
        #: and are not yet delivered or put back, by ``id(records)``. See :meth:`position`.
        self._held: dict[int, dict[Any, list[Any]]] = {}

    def hold_fetched(self, records: dict[Any, list[Any]] | None) -> None:
        """Note a fetch's records as taken and not yet delivered (:meth:`position`)."""
        if records and any(records.values()):
            self._held[id(records)] = records

    def release_fetched(self, records: dict[Any, list[Any]] | None) -> None:
        """A held fetch's records are delivered, or dropped and put back."""
        if records is not None:
            self._held.pop(id(records), None)

    def merge_held(self, into: dict[Any, list[Any]], merged: dict[Any, list[Any]]) -> None:
        """``merged``'s records were added to ``into`` (``freshen``): one hold for both."""
        if self._held.pop(id(merged), None) is not None:
            self._held[id(into)] = into

    def first_held(self, tp: Any) -> int | None:
        """The first offset of ``tp`` among records taken from aiokafka and not yet
        delivered or put back (None: none). A partition's records in a fetch are in
        offset order, a top-up's after the fetch's own (``freshen``)."""
        firsts = [rs[0].offset for records in self._held.values() if (rs := records.get(tp))]
        return min(firsts) if firsts else None

    async def position(self, tp: Any) -> int | None:
        """aiokafka's fetch position of ``tp``, but never past a record of it that the
        fetch loop took and has not delivered (or put back) yet.

        Why (docs/delivery.md, BB): the recovery's end check (``Recovery.
        _find_transactional_ends``, and Faust's ``detect_aborted_tx``) takes a changelog
        position past its highwater, with no record queued and the applied offset
        unchanged, for "read to its end". aiokafka's position moves when the loop takes
        a fetch, not when it delivers it. A fetch that a rebalance overtook is dropped
        and only then put back (``seek_after_drop``: a seek to the committed offsets, a
        round trip to the coordinator first), and a prefetch waits for the batch before
        it: records taken but not delivered for longer than two checks made a new
        owner end its recovery without them. It then ran on a dedupe table without the
        ids of the last 2,600 changelog records and let two copies through under
        exactly_once (chaos seed 17)."""
        position = await self._thread.position(tp)
        first = self.first_held(tp)
        if first is not None and (position is None or first < position):
            return first
        return position

    def _between_batches(self) -> asyncio.Event:
        if self._no_batch is None:
            self._no_batch = asyncio.Event()
            self._no_batch.set()
        return self._no_batch

    async def finish_batch(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` s, until no batch is being processed; whether none is.

        Called by a stopping worker after the flow stopped (Faust's ``_stop_consumer``:
        ``stop_flow``, then ``_stop_fetcher``) and before the fetch loop is cancelled: a
        stopped flow starts no new batch (``_still_current``), so the loop is then
        cancelled between batches. Why: a batch cancelled half-way forbids every later
        commit under exactly_once (``section_interrupted``); the stop was then unclean
        and the next start restored every table in full (docs/delivery.md, "A graceful
        stop during a batch"). Under at_least_once its records were processed again.
        Kafka Streams' ``close()`` likewise finishes the records in hand."""
        no_batch = self._between_batches()
        if no_batch.is_set():
            return True
        try:
            await asyncio.wait_for(no_batch.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def commit_by_count(self) -> None:
        """Start the commit due after ``commit_every`` acked records (Faust's
        ``broker_commit_every``) as a task of its own, as the timer's commits are; one
        at a time (Faust's ``commit`` also waits for any commit in progress).

        Why (issue 22): Faust awaits this commit inside the fetch loop, so nothing was
        fetched or delivered until it ended. An at_least_once commit writes the changed
        state in parts and lets waiting batches in between them (app/commit.py), but
        no batch could be waiting: the loop that delivers them was the one awaiting the
        commit. The pattern benchmark's backlog of 200,000 records ended with such a
        commit of 10,000 states (320 ms), and the first live alerts waited for all of
        it (docs/performance.md, "Issue 22, session 16")."""
        if self._count_commit is None or self._count_commit.done():
            self._count_commit = self.add_future(self.commit())

    def _new_consumer_thread(self) -> FastConsumerThread:
        return FastConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        commit_guard.note_session_ok()  # a new generation: the session is alive again
        if not self.app.should_stop:
            HELD_PARTITIONS.assigned(assigned)  # before Faust's handling can resume a fetch
        await super().on_partitions_assigned(assigned, generation_id)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.app.in_transaction and not self.app.should_stop and self.assignment():
            try:
                await self.commit_on_revoke()
            except Exception as exc:
                # Faust's revoke handling and ``forget_batches`` must run all the same
                # (raised, it reached aiokafka, which logs it and rebalances on). A
                # transaction that did not commit is aborted at the assignment
                # (``TransactionManager.ready_transaction``) or, moved, by its next owner.
                self.log.warning("exactly_once: the commit before a rebalance failed (%r); its "
                                 "partitions go on from their committed offsets", exc)
        await super().on_partitions_revoked(revoked)
        self.forget_batches(revoked)
        HELD_PARTITIONS.revoked(revoked)

    async def commit_on_revoke(self) -> None:
        """exactly_once: before a rebalance, finish the batches in flight and commit every
        acked offset, ending the transactions that hold them (as Kafka Streams commits
        its tasks when they are revoked).

        Why (issue 23, finding 4; docs/delivery.md): Faust forgets every partition's acks
        when a rebalance starts (aiokafka's eager protocol revokes them all) and only
        then commits, so its commit on revocation covers the batch in flight at most.
        Every other transaction stayed open through the rebalance, holding outputs of
        records that the new generation processes again from the committed offset. A
        rebalance (or a chain of them) longer than the transaction timeout made the
        coordinator abort them and bump the producers' epochs: the worker, never killed,
        crashed with ProducerFenced. Committed here, no transaction is open while the
        group rebalances, and nothing is processed twice on the partitions it keeps."""
        self.stop_flow()  # no new batch starts (Faust's revoke handler does this next anyway)
        await self.wait_empty()  # batches in flight ack; ends with Faust's commit
        # That commit returns without committing when a timer commit was running: once more.
        await self.commit(start_new_transaction=False)

    def forget_batches(self, revoked: Any) -> None:
        """Drop the committable offsets of revoked partitions' acked batches.

        Why: Faust forgets the revoked partitions' acks (``_acked``) and the next owner
        starts from the committed offset. The revoke handler's commit takes what
        ``_batch_next`` holds (``_filter_tps_with_pending_acks``); whatever it did not
        commit (a failed or refused commit) must be forgotten too, and only after
        Faust's revoke handler returned (it waits for a batch in flight, which acks on
        its way out).
        A stale entry outlived the revocation (seen: ``{p2: 6123}`` kept while the new
        generation restarted p2 at 5991) and would be committed when the partition comes
        back, ahead of what that generation processed: under exactly_once the outputs
        of those offsets were in the aborted transaction, so they would be lost."""
        for tp in revoked:
            self._batch_next.pop(tp, None)
            self._last_timestamp.pop(tp, None)

    def partition_progress(self) -> list[tuple[Any, int | None, int | None, int | None]]:
        """Per partition assigned now: ``(tp, next offset to process, end offset,
        timestamp in ms of the last record handed to batch agents)``; None where not
        known yet. Read at scrape time by the lag metrics and the cluster status (the
        assignment is read each time, so a revoked partition is never reported).

        The next offset is the read offset + 1 once this assignment delivered a record
        to a batch agent; until then Faust's read offset is the committed offset, which
        is already the next one. With neither (the group never committed the partition
        and nothing was delivered yet) it is aiokafka's fetch position.
        The end offset is the last stable offset (``FastConsumerThread.highwater``) of
        the latest fetch response."""
        progress = []
        read_offset, committed = self._read_offset, self._committed_offset
        last_ts = self._last_timestamp
        for tp in self.assignment():
            try:
                end = self.highwater(tp)
            except Exception:  # not fetched yet: no end offset known
                end = None
            read = read_offset.get(tp)
            if read is not None:
                position = read + 1 if tp in last_ts else read
            else:
                position = committed.get(tp)
                if position is None:
                    position = self._fetch_position(tp)
            progress.append((tp, position, end, last_ts.get(tp)))
        return progress

    def delivered_to(self, tp: Any, end: int) -> bool:
        """Whether every record of ``tp`` before offset ``end`` was handed to the agents:
        aiokafka's fetch position at or past ``end`` (it moves past transaction markers
        and aborted records) and none of those records taken and not yet delivered.
        Records past ``end`` may be waiting in aiokafka."""
        position = self._fetch_position(tp)
        first = self.first_held(tp)
        return position is not None and position >= end and (first is None or first >= end)

    def _fetch_position(self, tp: Any) -> int | None:
        """aiokafka's fetch position of ``tp`` (None: none yet)."""
        try:
            state = self._thread._ensure_consumer()._subscription.subscription.assignment.state_value(tp)
            return state.position if state.has_valid_position else None
        except Exception:  # not assigned (any more), or no consumer
            return None

    async def track_topic_metadata(self, topic: str) -> None:
        """Make the consumer's client fetch (and keep fetching) metadata for ``topic``,
        so ``key_partition`` can place records for it (see :class:`TransactionManager`)."""
        await self._thread.track_topic_metadata(topic)

    def section_interrupted(self, exc: BaseException) -> None:
        """Under exactly_once, a batch's processing section that did not finish (its
        handler raised, or was cancelled) forbids every later commit of this worker.

        Why (issue 23; docs/delivery.md, L): a stopping worker cancels its fetch loop,
        in the middle of a batch that did not finish in time (``App._stop_fetcher``),
        then commits (Faust's ``_stop_consumer``: ``_stop_fetcher``, then
        ``wait_empty`` → ``commit_and_end_transactions``); a crashing one does the same.
        The open transaction held the outputs the interrupted batch had sent so far,
        without that batch's offsets: committed, they were visible, and the next owner
        processed the batch again (window results emitted twice after a graceful leave).
        Not committed, the transaction is aborted when the next owner's producer takes
        its transactional id over."""
        if self.app.in_transaction and self._broken_section is None:
            self._broken_section = exc
            self.app.tables.on_aborted_writes()
            self.log.warning("exactly_once: a batch was interrupted (%r); this worker commits "
                             "nothing more, its open transactions are aborted", exc)

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Faust's commit; under exactly_once, or when ``before_commit`` hooks exist, only
        between agents' processing sections (so the offsets it commits are those of
        batches whose state the hooks just flushed). Under exactly_once, nothing after a
        section was interrupted (``section_interrupted``)."""
        if self._broken_section is not None and self.app.in_transaction:
            return False
        observe = observers.commit
        if observe is None:
            return await self._commit_guarded(topics, start_new_transaction)
        t0 = time.perf_counter()
        try:
            return await self._commit_guarded(topics, start_new_transaction)
        finally:
            observe(time.perf_counter() - t0)

    async def _commit_guarded(self, topics: Any, start_new_transaction: bool) -> bool:
        if not self.app.in_transaction and commit_guard.session_lapsed():
            # A worker whose session lapsed writes no state and commits nothing (the
            # broker would refuse the offsets anyway; the state writes it would accept):
            # its partitions' new owners process what it did not commit
            # (``CommitGuard.session_lapsed``). Under exactly_once its transactions are
            # fenced instead.
            self.log.warning("Group session lapsed (no heartbeat answered for over %.0f s): "
                             "not committing or writing state until the group takes this "
                             "worker back", commit_guard.session_timeout)
            return False
        hooks = commit_guard.before_commit
        if not self.app.in_transaction and not hooks:
            return await super().commit(topics, start_new_transaction=start_new_transaction)
        if not self.app.in_transaction:
            return await self._commit_snapshot(topics, hooks, start_new_transaction)
        async with commit_guard.committing():
            if self._broken_section is not None and self.app.in_transaction:
                # Interrupted while this commit waited for its section to end (seen: a
                # timer commit begun 80 ms before a SIGTERM cancelled the batch).
                return False
            for hook in hooks:
                rest = await hook()
                if rest is not None:
                    # The transaction about to commit is the one a batch would send
                    # into: all of it before the section opens again.
                    await rest
            try:
                return await super().commit(topics, start_new_transaction=start_new_transaction)
            except FENCED as exc:
                # A worker paused past its session (a zombie) finds its transactions
                # fenced by the partitions' new owner: its commit must fail, and nothing
                # of it becomes visible (the coordinator aborted it). Crashing the worker
                # (the chaos verifier's zombie, issue 23) helped nothing: the rebalance
                # that follows hands its partitions on, and the transaction manager
                # replaces the fenced producers (``TransactionManager.ready_transaction``).
                self.log.warning("exactly_once: commit refused, this worker's transaction was fenced "
                                 "(%r); nothing of it is committed, the rebalance hands its partitions on",
                                 exc)
                self.app.tables.on_aborted_writes()
                return False

    async def _commit_snapshot(self, topics: Any, hooks: list[Any], start_new_transaction: bool) -> bool:
        """at_least_once with commit hooks: the offsets acked so far and the hooks' first
        halves between two processing sections, then (batches running again) the hooks'
        rests, then those offsets (app/commit.py, ``CommitProtocol.begin_commit``).

        Why: a batch used to wait for the whole commit (outputs acknowledged, every
        changed state encoded, its changelog acknowledged, RocksDB written): pattern
        alerts at 5,000 events/s had a p99 of 130 ms (issue 22). The offsets are taken
        in the same section-free moment as the state, so they cover exactly the batches
        whose changes the rests make durable; a rest that raises commits nothing."""
        async with commit_guard.one_commit():
            rests: list[Awaitable[None]] = []
            async with commit_guard.committing():
                # First the offsets, then the state: whatever the hooks take covers at
                # least the batches these offsets end with.
                offsets = self._filter_committable_offsets(list(self._filter_tps_with_pending_acks(topics)))
                try:
                    for hook in hooks:
                        rest = await hook()
                        if rest is not None:
                            rests.append(rest)
                except BaseException:
                    for rest in rests:  # a hook's rest ends what it began (its locks)
                        with contextlib.suppress(Exception):
                            await rest
                    raise
            for i, rest in enumerate(rests):
                try:
                    await rest
                except BaseException:
                    for later in rests[i + 1:]:
                        with contextlib.suppress(Exception):
                            await later
                    raise
            if not offsets:
                return False
            # Faust's ``force_commit`` → ``_commit_tps`` with the offsets taken above.
            sensor_state = self.app.sensors.on_commit_initiated(self)
            try:
                await self._handle_attached(offsets)
            except ProducerSendError as exc:
                await self.crash(exc)
                return False
            did_commit = await self._commit_offsets(offsets, start_new_transaction=start_new_transaction)
            self.app.sensors.on_commit_completed(self, sensor_state)
            return did_commit

    async def deliver(self, callback: Callable[[Any], Awaitable[Any]], message: Any) -> None:
        """Deliver one message; a suspended flow still interrupts a blocked delivery."""
        suspend_flow = self.suspend_flow
        if suspend_flow.is_set():
            await self.wait_first(callback(message), suspend_flow.wait())
            return
        finished, rest = start_inline(callback(message))
        if not finished:
            await self.wait_first(rest, suspend_flow.wait())

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        """Faust's fetch of the active partitions, less the held ones
        (``HELD_PARTITIONS``)."""
        if HELD_PARTITIONS and active_partitions:
            timeout = min(timeout, HELD_FETCH_TIMEOUT)
            active_partitions = active_partitions - HELD_PARTITIONS.held()
            if not active_partitions:
                # aiokafka reads an empty set as every partition.
                await asyncio.sleep(timeout)
                return {}
        return await super()._getmany(active_partitions, timeout)

    async def fetch(self, timeout: float) -> tuple[dict[Any, list[Any]], Any, int] | None:
        """One fetch: ``(records by partition, active partitions, generation id)``, or
        None when there is nothing to deliver (Faust's ``getmany`` preamble, unchanged:
        a fetch while flow is suspended seeks back to the committed offsets)."""
        started_in = self.app.consumer_generation_id
        records, active_partitions = await self._wait_next_records(timeout)
        # Taken from aiokafka: held until delivered (the caller releases them) or put
        # back here (``position``).
        self.hold_fetched(records)
        generation_id = self.app.consumer_generation_id
        handed_over = False
        try:
            if records is None or self.should_stop:
                return None
            if generation_id != started_in:
                # A rebalance overtook this fetch: its records are not delivered.
                await self.seek_after_drop(records)
                return None
            if not self.flow_active:
                self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
                # As after a rebalance's drop: partitions the seek does not position
                # (changelogs) go back to their first dropped record.
                await self.seek_and_rewind(records, "exception performing seek when flow not active")
                return None
            track_end = self.app.monitor.track_tp_end_offset
            for tp in records:
                # Once per partition per fetch (Faust: once per message; same value).
                track_end(tp, self.highwater(tp))
            handed_over = True
            return records, active_partitions, generation_id
        finally:
            if not handed_over:
                self.release_fetched(records)

    async def freshen(self, fetched: tuple[dict[Any, list[Any]], Any, int], waited: bool = False
                      ) -> tuple[tuple[dict[Any, list[Any]], Any, int], asyncio.Future | None]:
        """Add what arrived since ``fetched`` was fetched: up to ``FRESHEN_ROUNDS`` more
        fetches of at most ``FRESHEN_TIMEOUT`` each, while the batch is small. Returns
        the merged fetch, and a fetch of a newer generation to deliver next (or None).
        Not when the loop ``waited`` for ``fetched`` to arrive (see below).

        Why: aiokafka fetches a partition again only once its previous response was
        taken, and that response then waits for the batch being handled; so a record
        of a caught-up stream waited for one or two whole batches before its own began
        (measured: the oldest record of a batch 35-40 ms old at 5,000 events/s, where a
        batch takes about 10 ms). Taking the waiting response and the one its taking
        triggers starts each batch with records a fetch round trip old. A backlog
        (a full fetch) skips this.

        A fetch the loop ``waited`` for (idle, the previous batch long done) arrived
        just now: its records did not wait behind a batch, and a top-up could only
        wait up to ``FRESHEN_TIMEOUT`` for records that come after them. At low rates
        that was 3-7 ms of every batch's latency (a window end's results among them:
        docs/performance.md, "Issue 22, session 15"), for a fuller batch that a fast
        handler does not need."""
        records, active_partitions, generation_id = fetched
        if waited:
            return fetched, None
        count = sum(len(rs) for rs in records.values())
        for _ in range(FRESHEN_ROUNDS):
            if count >= FRESHEN_BELOW or self.should_stop:
                break
            more = await self.fetch(timeout=FRESHEN_TIMEOUT)
            if more is None:
                break
            if more[2] != generation_id:
                # A rebalance in between: deliver_batches drops the older records and
                # seeks; the newer ones are delivered after that, on their own.
                return fetched, asyncio.ensure_future(_done(more))
            added = 0
            for tp, rs in more[0].items():
                if rs:
                    mine = records.get(tp)
                    records[tp] = rs if mine is None else mine + rs
                    added += len(rs)
            self.merge_held(records, more[0])
            if not added:
                break
            count += added
            active_partitions = more[1]
        return (records, active_partitions, generation_id), None

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets, counted as a move of the positions
        (before and after: a fetch that overlaps it in any way counts as begun before)."""
        self._position_moves += 1
        try:
            await super().perform_seek()
        finally:
            self._position_moves += 1

    async def take_prefetch(self, prefetch: Awaitable[Any], moves: int
                            ) -> tuple[dict[Any, list[Any]], Any, int] | None:
        """The fetch ``prefetch`` (begun when ``_position_moves`` was ``moves``), or None
        when this consumer moved its positions since: its records are dropped, and each
        of their partitions is put back to its first dropped record (never forward, and
        never below its committed offset).

        That rewind is exact either way. Taken before the move (a seek to the committed
        offsets, a rewind: both go back), the records lie at or past the new position,
        so nothing moves. Taken after it, they start at the new position, to which the
        partition goes back. (Not ``rewind_dropped``'s committed offset: records acked
        since it would be processed again.)

        Why (issue 23; docs/delivery.md, AF): the fetch loop begins the next fetch before it
        delivers the batch in hand. When that delivery drops the batch and seeks to the
        committed offsets (a woken worker whose session lapsed; a rebalance), the next
        fetch may already hold the records after the dropped ones, taken at the old
        positions. Delivered, its first record lay past the read offset the seek had
        set, so the jump was acked as a gap, and the dropped records (and every one
        from the committed offset on) were never processed: 18 ids lost in the long
        mode (at_least_once, seed 1), 53 under exactly_once, and whole windows when the
        partitions were the window's re-keyed input (seed 3). The generation check
        does not catch it: a lapsed worker that the group kept has no new generation."""
        fetched = await prefetch
        if fetched is None or self._position_moves == moves:
            return fetched
        try:
            records = {tp: rs for tp, rs in fetched[0].items() if rs}
            if records:
                self.log.info("Dropped a fetch begun before this consumer sought (%s); fetching from "
                              "the new positions", {f"{tp.topic}[{tp.partition}]": rs[0].offset
                                                    for tp, rs in records.items()})
                committed = self._committed_offset
                for tp, rs in records.items():
                    await self._rewind(tp, max(rs[0].offset, committed.get(tp) or 0))
        finally:
            self.release_fetched(fetched[0])
        return None

    async def _rewind(self, tp: Any, offset: int) -> bool:
        """``FastConsumerThread.rewind`` (back only), and deliver from ``offset`` on."""
        if not await self._thread.rewind(tp, offset):
            return False
        self._position_moves += 1
        self._read_offset[tp] = offset  # as Faust's seek does
        return True

    async def seek_after_drop(self, records: dict[Any, list[Any]] | None) -> None:
        """Seek back to the committed offsets after dropping fetched records that a
        rebalance overtook.

        Why (root cause of the graceful-leave loss, docs/delivery.md): aiokafka's
        positions are already past the records a fetch returned. Faust's
        ``_wait_next_records`` waits for flow to resume *before* it fetches, and flow
        resumes after a rebalance just before Recovery seeks to the committed offsets.
        So a fetch begun in the old generation can run, in the new one, after that
        seek; dropping its records then left nothing to fetch them again: the
        partition stalled, or, once later input was fetched and acked past the jump,
        the dropped run was committed as processed (measured: offsets 7057-7405 of
        every partition). Seeking to the committed offsets again is exact here: the
        dropped fetch is the only one in flight, so nothing of the new generation was
        delivered yet, and the old generation's progress was committed on revocation.
        """
        if not records or not any(records.values()):
            return
        self.log.info("Dropped a fetch a rebalance overtook (%s); seeking to committed offsets",
                      {f"{tp.topic}[{tp.partition}]": rs[0].offset for tp, rs in records.items() if rs})
        self._position_moves += 1  # (also when the seek fails half-way)
        await self.seek_and_rewind(records, "Seek after dropping an overtaken fetch failed")

    async def seek_and_rewind(self, records: dict[Any, list[Any]], failed: str) -> None:
        """The seek to the committed offsets, then ``rewind_dropped``, which runs even
        when the seek failed: a changelog partition has no committed offset, so only the
        rewind puts it back before the fetch's hold ends (``FastConsumer.position``)."""
        try:
            await self.perform_seek()
        except Exception as ex:  # as Faust's flow-inactive seek: nothing is assigned
            self.log.warning("%s: %r", failed, ex)
        try:
            await self.rewind_dropped(records)
        except Exception as ex:  # not assigned any more: the next assignment seeks anew
            self.log.warning("%s (putting the dropped records back): %r", failed, ex)

    async def rewind_dropped(self, records: dict[Any, list[Any]]) -> None:
        """Seek each partition of a dropped fetch that the seek to committed offsets did
        not position back to its first dropped record (never forward).

        Why (issue 23, finding 3; docs/delivery.md, I): ``seek_after_drop`` repositions
        only partitions with a committed offset (aiokafka's ``seek_to_committed`` skips
        the others). Changelog partitions have none: Recovery positions them with its own
        seek, and a fetch begun in the old generation (waiting for flow to resume, or for
        records) can return their records right after that seek, in the new generation.
        Dropped without a rewind, they were never fetched again, and Recovery waited for
        them for good (a worker stuck in recovery after a rebalance, /health 503) or,
        under exactly_once, took the position past them for the end of an aborted
        transaction and finished without them. A source partition with nothing committed
        yet lost its dropped records the same way.

        Exact here: records of this fetch were taken at the new generation's positions
        (aiokafka re-creates every partition's position at each rebalance), so each
        partition's position was its first dropped record's offset. With the consumer
        in its own thread a seek can come in between: one that went further back is
        kept (never forward), one that went forward is undone, which only makes Recovery
        read changelog records again that it ignores by offset.

        A partition with a committed offset at or before its first dropped record is
        also put back, to that committed offset, which the seek to the committed offsets
        has normally done already (a seek that failed half-way has not). A committed
        offset past the first dropped record means the group went on beyond it: nothing
        moves back then. (The loss this was first added for, a woken worker's records
        skipped after such a drop, came from the fetch begun before the seek:
        ``take_prefetch``, docs/delivery.md AF.)"""
        for tp, tp_records in records.items():
            if not tp_records:
                continue
            first = tp_records[0].offset
            committed = self._committed_offset.get(tp)
            if committed:
                if committed > first:
                    continue
                first = committed
            await self._rewind(tp, first)

    async def hold_back(self, records: dict[Any, list[Any]]) -> None:
        """Deliver none of a fetch's batch-topic records while a rebalance is not done:
        put each partition back to its first fetched record (never forward), to be
        fetched again once the rebalance ended.

        Why (issue 23, docs/delivery.md AB): at the end of a rebalance Faust's Recovery
        resumes the stream partitions and only then seeks them to their committed
        offsets, with the flow already running (it ran for the changelogs). A fetch in
        between was delivered and processed, its transaction could commit, and the seek
        (its committed offsets read before that commit) put the partitions back: the
        same records processed twice, their outputs twice in ``read_committed`` (the
        repeated alerts of the chained exactly_once case). Faust's ``on_rebalance_end``,
        after that seek, ends ``app.rebalancing``."""
        moved = False
        for tp, tp_records in records.items():
            if tp_records and tp.topic in BATCH_AGENTS and await self._rewind(tp, tp_records[0].offset):
                moved = True
        if moved:
            # Not a busy loop while the rebalance finishes: the records come again anyway.
            await asyncio.sleep(HOLD_BACK_PAUSE)

    def _still_current(self, generation_id: int) -> bool:
        # Faust's stop conditions inside a fetch: flow suspended or a new generation
        # (rebalance) ends it; the rest is fetched again after seeking.
        return self.flow_active and self.app.consumer_generation_id == generation_id

    async def deliver_batches(self, records: dict[Any, list[Any]], active_partitions: Any,
                              generation_id: int) -> None:
        """Hand each batch agent its topic's records of this fetch, then ack them.

        Per partition the same filtering as the per-message loop: records below the read
        offset (fetched before a seek) are dropped; a jump past it is a gap (offsets with
        no record, e.g. transaction markers), committed past like Faust's gaps."""
        if self.app.rebalancing:
            await self.hold_back(records)
            return
        by_topic: dict[str, tuple[list[Any], Batch, dict[Any, tuple[int, int]]]] = {}
        read_offset = self._read_offset
        buffered = self._buffered_partitions
        last_timestamp = self._last_timestamp
        observe = observers.batch
        for tp, tp_records in records.items():
            agents = for_topic(tp.topic)
            if not agents or not tp_records:
                continue
            if (not (active_partitions is None or tp in active_partitions or tp in buffered)
                    or tp in HELD_PARTITIONS):
                # Not delivered now (not in this fetch's active set: ``freshen`` takes the
                # last merged fetch's; or held, the fetch begun before the hold).
                # aiokafka's position is already past these records, so put it back to
                # the first of them (never forward): skipped without that, they were
                # fetched again by nobody, and the next batch's jump past the read offset
                # was committed as a gap (docs/delivery.md, "Open").
                await self._rewind(tp, tp_records[0].offset)
                continue
            r_offset = read_offset[tp]
            if r_offset is not None:
                if tp_records[0].offset < r_offset:  # fetched before a seek: drop
                    tp_records = [r for r in tp_records if r.offset >= r_offset]
                if not tp_records:
                    continue
                # A jump past the read offset (first record > r_offset + 1) is a gap:
                # acking the batch commits past it (``ack_spans``), as Faust's gaps do.
            entry = by_topic.setdefault(tp.topic, (agents, Batch(), {}))
            entry[1].add(tp, tp_records)
            entry[2][tp] = (tp_records[0].offset, tp_records[-1].offset)
            last_timestamp[tp] = tp_records[-1].timestamp
        if by_topic and commit_guard.session_lapsed():
            # Woken after its session (see ``CommitGuard.session_lapsed``): these
            # partitions are most likely someone else's now. Processing them would
            # send through fenced producers (exactly_once: the worker crashed) or on
            # state cached before the pause; the rebalance that follows starts again
            # from the committed offsets.
            await self.seek_after_drop({tp: rs for tp, rs in records.items() if tp.topic in BATCH_AGENTS})
            return
        for agents, batch, spans in by_topic.values():
            if not self._still_current(generation_id):
                if self.app.consumer_generation_id != generation_id:
                    # The rest of this fetch is dropped: rewind (see seek_after_drop).
                    await self.seek_after_drop({tp: rs for tp, rs in records.items() if tp.topic in BATCH_AGENTS})
                return
            in_flight = InFlight()
            self._unacked_messages.add(in_flight)  # what a rebalance waits for (wait_empty)
            processing = PROCESSING_TOPIC.set(batch.parts[0][0].topic)  # sends join its transactions
            later: list[Awaitable[Any]] = []
            try:
                async with commit_guard.processing():
                    for agent in agents:
                        try:
                            if observe is None:
                                await agent.handler(batch)
                            else:
                                t0 = time.perf_counter()
                                await agent.handler(batch)
                                observe(agent.name, batch, time.perf_counter() - t0)
                        except Exception as exc:
                            self.log.exception("Batch agent %s failed; the worker stops without "
                                               "acking its batch: %r", agent.name, exc)
                            await self.app.crash(exc)
                            raise
                    later = batch.take_later()
                    if later and self.app.in_transaction:
                        # exactly_once: the rest belongs in this section's transaction.
                        work, later = later, []
                        await self._finish(work, agents)
                    if not later:
                        # An earlier batch still finishing must ack first (offset order).
                        await self.wait_finishing()
                        self.ack_if_none_failed(spans)
            except BaseException as exc:
                self.section_interrupted(exc)
                raise
            finally:
                PROCESSING_TOPIC.reset(processing)
                if not later:
                    self._release(in_flight)
            for tp, (_first, last) in spans.items():
                read_offset[tp] = last
            if later:
                # Finished in the background after the batches before it (acks stay in
                # offset order, state writes in batch order); the loop waits only when
                # MAX_FINISHING are still finishing.
                finishing = self._finishing
                while finishing and finishing[0].done():
                    finishing.popleft()
                if len(finishing) >= MAX_FINISHING:
                    await asyncio.wait({finishing[0]})
                    finishing.popleft()
                previous = finishing[-1] if finishing else None
                finishing.append(asyncio.ensure_future(
                    self._finish_and_ack(later, agents, spans, in_flight, after=previous)))

    async def _finish(self, work: list[Awaitable[Any]], agents: list[Any]) -> None:
        """Await a batch's deferred work (``Batch.finish_later``); a failure crashes the
        worker, like a failing handler, and the batch is not acked."""
        try:
            for awaitable in work:
                await awaitable
        except Exception as exc:
            self._finish_failed = exc
            self.log.exception("Finishing a batch of %s failed; the worker stops without "
                               "acking it: %r", [a.name for a in agents], exc)
            await self.app.crash(exc)
            raise

    async def _finish_and_ack(self, work: list[Awaitable[Any]], agents: list[Any],
                              spans: dict[Any, tuple[int, int]], in_flight: InFlight,
                              after: asyncio.Future | None = None) -> None:
        """``work`` once ``after`` (the batch before, if still finishing) is done, then
        the ack unless a batch failed to finish."""
        try:
            if after is not None and not after.done():
                await asyncio.wait({after})
            await self._finish(work, agents)
            self.ack_if_none_failed(spans)
        except Exception:  # noqa: S110 - logged and crashed in _finish; nothing to ack
            pass
        finally:
            self._release(in_flight)

    def ack_if_none_failed(self, spans: dict[Any, tuple[int, int]]) -> None:
        """``ack_spans``, unless an earlier batch failed to finish: acking a later batch
        would let a commit (the one on the way out, too) skip the failed one."""
        if self._finish_failed is None:
            self.ack_spans(spans)

    async def wait_finishing(self, timeout: float | None = None) -> None:
        """Wait for the batches finishing in the background, if any (the last one
        finishes after all the others)."""
        finishing = self._finishing
        if finishing and not finishing[-1].done():
            await asyncio.wait({finishing[-1]}, timeout=timeout)

    def _release(self, in_flight: InFlight) -> None:
        in_flight.acked = True
        self._unacked_messages.discard(in_flight)
        notify(self._waiting_for_ack)

    def ack_spans(self, spans: dict[Any, tuple[int, int]]) -> None:
        """Ack every offset from first to last of each partition: one bookkeeping step per
        partition instead of ``Consumer.ack`` per message.

        A batch partition's records are delivered in offset order, one batch at a time,
        and each batch is acked as a whole (offsets between its records hold no record:
        markers, compaction; a jump before its first record is a gap, as in Faust). So
        everything up to the last acked offset is processed and the committable offset
        is simply ``last + 1``, kept in ``_batch_next`` for ``_new_offset``. Faust's
        per-offset lists (``_acked``) would cost ~1 µs per record at each commit."""
        with ack_lock:
            for tp, (first, last) in spans.items():
                committed = self._committed_offset[tp]
                if committed is not None and last < committed:
                    continue
                self._acked[tp]  # noqa: B018 - registers tp for Faust's commit (pending acks)
                if last + 1 > self._batch_next.get(tp, -1):
                    self._batch_next[tp] = last + 1
                self._n_acked += last - first + 1

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Any:
        """The partitions a commit looks at: Faust's (those with acked offsets in
        ``_acked``) and the batch path's (``_batch_next``).

        Why (issue 23, finding 1; docs/delivery.md, K): at a rebalance Faust forgets the
        revoked partitions' ``_acked`` (all of them: aiokafka revokes everything) *before*
        its revoke handler waits for the batches in flight and commits
        (``wait_empty`` → ``commit_and_end_transactions``). So that commit found nothing
        to commit, and under exactly_once the open transactions, holding the outputs and
        state writes of every batch since the last commit, stayed open across the
        rebalance (``begin_transaction``: "Invalid state transition IN_TRANSACTION ->
        IN_TRANSACTION"). The worker then restored its partitions up to the last
        *committed* changelog record, which rolled the state those batches had written
        back, and re-read their records from the committed offsets, while the old
        transaction, committed with the next commit, still held their outputs: window
        results emitted twice (89 in one graceful leave). ``_batch_next`` survives until
        the revoke handler returned (``forget_batches``), so the revocation's commit
        commits the batches processed before it, and ends their transactions."""
        pending = self._acked.keys() | self._batch_next.keys()
        return (tp for tp in pending if topics is None or tp in topics or tp.topic in topics)

    def _new_offset(self, tp: Any) -> int | None:
        """The offset to commit: a batch partition's next offset after its last acked
        batch (see ``ack_spans``), else Faust's computation from acked offsets and gaps."""
        next_offset = self._batch_next.pop(tp, None)
        if next_offset is not None:
            return next_offset
        return faust_aiokafka.Consumer._new_offset(self, tp)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - run by Fetcher
        # The same loop as Faust's (read offsets, gaps, commit_every, stop handling);
        # what differs: batch agents get their topics' records per fetch
        # (``deliver_batches``), other records are delivered inline (``deliver``), and
        # the commit by count runs beside the loop (``commit_by_count``).
        callback = self.callback
        deliver = self.deliver
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        buffered = self._buffered_partitions
        to_message = self._to_message
        since_yield = 0
        prefetch: asyncio.Future | None = None
        prefetch_moves = 0  # ``_position_moves`` when ``prefetch`` began
        no_batch = self._between_batches()
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                # Whether the loop waits for the fetch: the prefetch begun before the
                # last batch had not arrived when that batch was done (``freshen``).
                waited = False
                if prefetch is not None:
                    waited = not prefetch.done()
                    fetched = await self.take_prefetch(prefetch, prefetch_moves)
                    prefetch = None
                else:
                    fetched = await self.fetch(timeout=1.0)
                if fetched is not None and BATCH_AGENTS:
                    fetched, prefetch = await self.freshen(fetched, waited)
                    prefetch_moves = self._position_moves
                await self.sleep(0)
                if fetched is None or self.should_stop:
                    if fetched is not None:
                        self.release_fetched(fetched[0])
                    unset_flag(CONSUMER_FETCHING)
                    continue
                records, active_partitions, generation_id = fetched
                try:
                    if BATCH_AGENTS and any(tp.topic in BATCH_AGENTS for tp in records):
                        # Fetch (aiokafka parses as the response arrives) the next records while
                        # this batch is processed. Records of a fetch that a rebalance
                        # overtook are never delivered: ``fetch`` reports the generation it
                        # started in, and drops such a fetch and seeks to the committed
                        # offsets (``seek_after_drop``).
                        if prefetch is None:  # (else: a newer generation's fetch, from freshen)
                            prefetch = asyncio.ensure_future(self.fetch(timeout=1.0))
                            prefetch_moves = self._position_moves
                        no_batch.clear()
                        try:
                            await self.deliver_batches(records, active_partitions, generation_id)
                        finally:
                            no_batch.set()
                        records = {tp: rs for tp, rs in records.items() if tp.topic not in BATCH_AGENTS}
                        await asyncio.sleep(0)
                    for tp, record in self.scheduler.iterate(records):
                        if not self._still_current(generation_id):
                            if self.app.consumer_generation_id != generation_id:
                                await self.seek_after_drop(records)  # the rest is dropped: rewind
                            break
                        if not (active_partitions is None or tp in active_partitions or tp in buffered):
                            continue
                        message = to_message(tp, record)
                        since_yield += 1
                        if since_yield > YIELD_EVERY:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = read_offset[tp]
                        if r_offset is not None and offset < r_offset:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                            continue
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            # Faust's gap handling, unchanged. Known problem: after a seek,
                            # records fetched before it can arrive first, and the jump is
                            # then committed as a gap (docs/performance.md, "Known issue").
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            self.commit_by_count()
                        await deliver(callback, message)
                        read_offset[tp] = offset
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        self.commit_by_count()
                    unset_flag(CONSUMER_FETCHING)
                finally:
                    # Delivered, or dropped and put back: ``position`` may pass them now.
                    self.release_fetched(fetched[0])
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            if prefetch is not None and not prefetch.done():
                prefetch.cancel()
            self._held.clear()  # nothing is delivered after the loop
            unset_flag(CONSUMER_FETCHING)
            # Let the batches finishing in the background store and ack what they can (a
            # stop then commits them); bounded, since the broker may be what is failing.
            await self.wait_finishing(timeout=FINISH_ON_STOP_SECONDS)


class InFlight:
    """Stands for a batch being processed in ``Consumer._unacked_messages``, which a
    rebalance waits to empty (``wait_empty``) before it commits and hands partitions on."""

    __slots__ = ("acked", "refcount", "__weakref__")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1


class RawPartitionRecords(aiokafka_fetcher.PartitionRecords):
    """One fetched partition of a topic with batch agents: yields aiokafka's parsed
    record objects themselves (``offset``, ``timestamp`` in ms, ``key``, ``value``,
    ``headers``; no ``topic`` or ``partition``: a batch has them per partition), where
    aiokafka copies each into a ``ConsumerRecord``. Everything else of aiokafka's
    iteration is unchanged: CRC checks, control batches, aborted transactions under
    read_committed, the fetch position.

    Why: the copy (a dataclass of 11 fields, two ``len`` calls, a method call) and
    ``PartitionRecords.__next__`` around aiokafka's generator cost, in the consumer
    thread and under the GIL, ~1-1.7 µs of the 1.9-2.9 µs per record aiokafka spends
    there (5,000 records of ~300 bytes: docs/performance.md), some 4-6 % of a worker's
    CPU per event in the window, pattern and transform benchmarks."""

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        return record

    def __iter__(self) -> Any:
        # FetchResult.getall loops over this object: give it aiokafka's generator
        # itself, not a Python-level __next__ around it per record.
        return self._records_iterator or iter(())


def _partition_records(tp: Any, *args: Any) -> Any:
    """What aiokafka's fetcher builds for each partition of a fetch response: raw
    records for topics with batch agents, aiokafka's ``ConsumerRecord`` otherwise
    (Faust's per-message path reads their ``topic``, ``partition`` and sizes)."""
    cls = RawPartitionRecords if tp.topic in BATCH_AGENTS else _AIOKAFKA_PARTITION_RECORDS
    return cls(tp, *args)


_AIOKAFKA_PARTITION_RECORDS = aiokafka_fetcher.PartitionRecords


def use_raw_records_for_batch_topics() -> None:
    """Make aiokafka's fetcher build :func:`_partition_records` (idempotent).

    aiokafka's ``Fetcher`` looks the class up by name in its module when it parses a
    fetch response and offers no other hook, so the name is rebound there, in this
    process. Only partitions of batch-agent topics are affected."""
    aiokafka_fetcher.PartitionRecords = _partition_records


#: How long a subscription waits for the broker's metadata to list its topics.
TOPIC_METADATA_WAIT = 30.0


async def await_topics_in_metadata(client: Any, topics: set[str],
                                   timeout: float = TOPIC_METADATA_WAIT) -> set[str]:
    """Refresh ``client``'s metadata until it lists partitions for every topic (what
    the assignor needs), or until ``timeout``; returns the topics still missing."""
    for topic in topics:
        client.add_topic(topic)
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        await client.force_metadata_update()
        missing = {t for t in topics if not client.cluster.partitions_for_topic(t)}
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)  # aiokafka logs an error per missing topic per refresh


#: The isolation level of the worker's consumer, under both guarantees. Why: Faust reads
#: ``read_uncommitted`` unless the app runs exactly_once, yet a topic may hold a
#: transactional producer's aborted records whatever this worker's guarantee: a table
#: changelog or repartition topic written by an exactly_once run of this app whose
#: worker was killed mid-transaction, an input topic of an upstream exactly_once app.
#: Read uncommitted, an at_least_once worker applied them as real (a count counted
#: twice; a dedupe id only an aborted transaction wrote dropped its record). A topic
#: without transactions has its last stable offset at its high watermark, so
#: at_least_once gives up nothing. What follows from it: the end offsets are the last
#: stable ones (``FastConsumerThread.highwater`` and ``_highwaters``), and recovery finds
#: the end of a changelog whose last offsets hold no record (a transaction marker,
#: aborted records) under both guarantees (``Recovery._find_transactional_ends``).
WORKER_ISOLATION_LEVEL = "read_committed"


class FastConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer "thread", run in the worker's own event loop, with a shorter
    fetch long-poll.

    In the worker's loop (``Settings.consumer_in_loop``, the default): Faust runs the
    aiokafka consumer in a thread of its own with its own loop, and every fetch,
    commit and seek is a call handed across (a method queue, ``call_soon_threadsafe``
    both ways). Each fetch then waited for the other thread to get the GIL and its
    loop to turn: a live stream at 5,000 events/s took 8.5 ms (median) from asking for
    the next records to having them, and its batches came every 12.5 ms; in the same
    loop 6.4 ms and 9.5 ms, and the transform benchmark's p99 end-to-end latency went
    from 51-56 ms to 41-48 ms (docs/performance.md, session 9). Nothing in the thread
    ran in parallel anyway (the GIL). Here ``thread_loop`` *is* the worker's loop, the
    service starts and stops in it, and ``call_thread`` is a plain await.
    ``STREAMETL_CONSUMER_IN_LOOP=false`` gives Faust's thread back.

    Fetch long-poll: Faust hard-codes ``fetch_max_wait_ms=1500``. aiokafka sends one
    fetch request per broker at a time, so while a request for partitions with no new
    data is parked on the broker, partitions that do have data wait too: measured as
    1.5 s stalls in agent-passthrough, and as latency in a live stream.
    ``Settings.fetch_max_wait_ms`` bounds that wait (the broker still answers at once
    when there is data).
    """

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        from app import settings

        self.in_loop = settings.consumer_in_loop
        if self.in_loop:
            kwargs["thread_loop"] = kwargs.get("loop") or asyncio.get_event_loop()
        super().__init__(consumer, **kwargs)

    async def start(self) -> None:
        if not self.in_loop:
            await super().start()
            return
        # What the thread would run (``ServiceThread._serve``), minus the thread and its
        # keepalive pings between the two loops.
        self._thread_started.set()
        await self._default_start()
        await self.on_thread_started()

    async def stop(self) -> None:
        if not self.in_loop:
            await super().stop()
            return
        if self._started.is_set() and not self._stopped.is_set():
            # ``Service.stop`` would wait for the thread to shut down; here that is us.
            # Not ``ServiceThread._gather_remaining_tasks``: in this loop it would cancel
            # every task of the worker.
            self._stopped.set()
            await self.on_stop()
            await self._shutdown_thread()  # stops the aiokafka consumer, children, futures
            await self.on_shutdown()

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.in_loop:
            return await super().call_thread(fun, *args, **kwargs)
        result = fun(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def highwater(self, tp: Any) -> int | None:
        """The end offset of ``tp`` in the last fetch response: its last stable offset,
        under either guarantee, as the consumer reads ``WORKER_ISOLATION_LEVEL``
        (Faust's answers the high watermark outside exactly_once, past an open
        transaction's records that this consumer does not read until it ends).
        None before the first fetch."""
        return self._ensure_consumer().last_stable_offset(tp)

    async def _highwaters(self, partitions: list[Any]) -> dict[Any, int]:
        """The end offsets, asked of the broker, under either guarantee.

        Why: under exactly_once Faust answers from ``last_stable_offset``, the LSO of
        the last fetch response, which is None (read as -1, "empty") for a partition
        this consumer has not fetched yet, e.g. a changelog at the start of recovery.
        Table recovery then either restored nothing (a worker that took over a killed
        worker's partitions admitted 889 duplicates its dedupe memory had held) or
        refused to start (``ConsistencyError``: persisted offset above highwater -1;
        tests/chaos/test_pipeline_exactly_once.py). ``end_offsets`` asks the broker with
        the consumer's isolation level (``WORKER_ISOLATION_LEVEL``), so it gets the LSO
        itself."""
        return await self._ensure_consumer().end_offsets(partitions)

    async def rewind(self, tp: Any, offset: int) -> bool:
        """Seek ``tp`` back to ``offset`` if aiokafka's fetch position is past it; True
        if it did. Never forward, and nothing for a partition not assigned or still
        waiting for its first position (see ``FastConsumer.rewind_dropped``)."""
        return await self.call_thread(self._rewind, tp, offset)

    def _rewind(self, tp: Any, offset: int) -> bool:
        consumer = self._ensure_consumer()
        subscription = consumer._subscription
        if not subscription.is_assigned(tp):
            return False
        state = subscription.subscription.assignment.state_value(tp)
        if state is None or not state.has_valid_position or state.position <= offset:
            return False
        consumer.seek(tp, offset)
        return True

    def _create_worker_consumer(self, transport: Any) -> Any:
        from app import settings

        use_raw_records_for_batch_topics()
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = settings.fetch_max_wait_ms  # read by start() (Fetcher)
        # aiokafka keeps the level's name and hands it to the Fetcher it builds in start().
        consumer._isolation_level = WORKER_ISOLATION_LEVEL
        return consumer

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Subscribe once the broker's metadata lists every topic (or after a bound).

        Why: Faust creates internal topics (repartition, changelogs) just before it
        subscribes. The broker can answer the group join's metadata request before its
        metadata cache has the new topic: the assignor then logs "Ignoring missing
        topic" and that topic stays unassigned until the next metadata refresh, five
        minutes later. Seen on a loaded machine: a repartition topic created 0.12 s
        before the join never reached its agent (tests/chaos/test_pattern_restart.py).
        """
        topics = set(topics)
        await self.call_thread(self._watch_session)
        await self.call_thread(self._become_static_member, topics)
        missing = await self.call_thread(self._await_topics_in_metadata, topics)
        if missing:
            self.log.warning("Subscribing although the broker's metadata still lacks %s "
                             "after %.0f s; they are assigned once it has them",
                             sorted(missing), TOPIC_METADATA_WAIT)
        await super().subscribe(topics)

    async def _watch_session(self) -> None:
        """Note each answered heartbeat (``CommitGuard.session_lapsed``); once per consumer."""
        coordinator = self._ensure_consumer()._coordinator
        if coordinator is None or getattr(coordinator, "_streametl_watched", False):
            return
        coordinator._streametl_watched = True
        commit_guard.session_timeout = coordinator._session_timeout_ms / 1000
        do_heartbeat = coordinator._do_heartbeat

        async def watched_heartbeat() -> bool:
            ok = await do_heartbeat()
            if ok:
                commit_guard.note_session_ok()
            return ok

        coordinator._do_heartbeat = watched_heartbeat

    async def _become_static_member(self, topics: set[str]) -> None:
        """Before the first join: set the consumer's ``group.instance.id`` (Faust does not
        pass one) from this worker's identity and its topics; a static member leaves the
        group on a graceful stop (:class:`StaticLeave`). Later subscriptions of the same
        process keep the id (a new id would leave the old member entry behind)."""
        from app import settings

        coordinator = self._ensure_consumer()._coordinator
        if coordinator is None or coordinator._group_instance_id is not None:
            return
        identity = static_identity(settings.group_instance_id, self.app.conf.id, self.app.conf.web_port)
        if identity is None:
            return
        coordinator._group_instance_id = group_instance_id(identity, topics)
        coordinator._maybe_leave_group = StaticLeave(coordinator)
        self.log.info("Static group membership: group.instance.id %s", coordinator._group_instance_id)

    async def _await_topics_in_metadata(self, topics: set[str]) -> set[str]:
        return await await_topics_in_metadata(self._ensure_consumer()._client, topics)

    async def track_topic_metadata(self, topic: str) -> None:
        """Add ``topic`` to the metadata the aiokafka client tracks and wait for one
        refresh (through ``call_thread``: the consumer service owns the client)."""

        async def add() -> None:
            client = self._ensure_consumer()._client
            client.add_topic(topic)  # tracked from now on (until the subscription changes)
            await client.force_metadata_update()

        await self.call_thread(add)


def static_identity(configured: str, app_id: str, web_port: int) -> str | None:
    """What makes a worker "the same one" across restarts, or None (dynamic membership).

    Why (issue 23, finding 6): with dynamic membership a worker restarted after kill -9
    joins as a new member, and the group's rebalance waits until the dead member's
    session times out (measured: the restarted worker and the other worker both stood
    still for 50-60 s). A static member (KIP-345) that comes back with its
    ``group.instance.id`` takes over its old member entry: the coordinator hands it the
    same partitions without a rebalance, and the other workers never stop.

    Derived: the app id, the host and the web port the worker serves. Only one live
    process can serve a port on a host, so two live workers never share an identity (the
    broker would fence the older one), and a worker restarted in place (same port, so
    same data folder in a deployment) is recognised. ``configured`` overrides it
    (e.g. a StatefulSet pod name); ``off`` turns static membership off."""
    value = configured.strip()
    if value.lower() == "off":
        return None
    return _legal(value or f"{app_id}.{socket.gethostname()}.{web_port}")


def _legal(name: str) -> str:
    # Kafka accepts ASCII letters, digits, '.', '_' and '-' in instance ids and topics.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]


def group_instance_id(identity: str, topics: Iterable[str]) -> str:
    """The consumer's ``group.instance.id``: the identity and a digest of its topics.

    Why the topics: a static member that rejoins a stable group is handed its previous
    assignment as it was, even if it now subscribes to other topics (the broker compares
    no subscriptions on that path: KAFKA-12759). aiokafka then fails on a partition of a
    topic it no longer subscribes to (AssertionError in the coordinator routine; the
    worker never processes), and a new topic would stay unassigned. A worker restarted
    with other topics (a changed pipelines file) therefore joins as a new member, as with
    dynamic membership."""
    digest = hashlib.sha1("\n".join(sorted(topics)).encode()).hexdigest()[:10]
    return f"{identity}-{digest}"


class LeaveGroupResponse_v3(Response):  # noqa: N801 - Kafka's protocol naming
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(("throttle_time_ms", Int32), ("error_code", Int16),
                    ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")),
                                      ("error_code", Int16))))


class LeaveGroupRequest_v3(RequestStruct):  # noqa: N801
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = LeaveGroupResponse_v3
    SCHEMA = Schema(("group", String("utf-8")),
                    ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))))


class StaticLeaveGroupRequest(Request[LeaveGroupRequest_v3]):
    """LeaveGroup v3 (KIP-345): a static member leaves by its ``group.instance.id``
    (aiokafka has only v0/v1, which cannot name one)."""

    API_KEY = 13

    def __init__(self, group: str, member_id: str, instance_id: str) -> None:
        self.group, self.member_id, self.instance_id = group, member_id, instance_id

    def build(self, request_struct_class: type[LeaveGroupRequest_v3]) -> LeaveGroupRequest_v3:
        return request_struct_class(self.group, [(self.member_id, self.instance_id)])


class StaticLeave:
    """Replaces aiokafka's ``GroupCoordinator._maybe_leave_group`` for a static member.

    Why: aiokafka sends no LeaveGroup at all for a static member (a static member is
    expected to come back), so a graceful stop (SIGTERM, scale-down) left its partitions
    with nobody until its session timed out. A worker that stops gracefully means to
    leave: it sends LeaveGroup v3 naming its instance id, and the others take its
    partitions at once, as with dynamic membership. A kill -9 sends nothing; a restart
    then reclaims the member entry (see :func:`group_instance_id`)."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    async def __call__(self) -> None:
        coordinator = self.coordinator
        if coordinator.generation > 0:
            request = StaticLeaveGroupRequest(coordinator.group_id, coordinator.member_id,
                                              coordinator._group_instance_id)
            try:
                response = await coordinator._send_req(request)
            except Exception as exc:  # best effort, as aiokafka's own LeaveGroup
                log.warning("LeaveGroup (static member %s) failed: %r", coordinator._group_instance_id, exc)
            else:
                errors = [response.error_code] + [m[2] for m in response.members]
                if any(errors):
                    log.warning("LeaveGroup (static member %s) answered error codes %s",
                                coordinator._group_instance_id, errors)
                else:
                    log.info("LeaveGroup (static member %s) succeeded", coordinator._group_instance_id)
        coordinator.reset_generation()


class ZombieRestart(Exception):
    """exactly_once: this worker was out of the group for a generation, or a transaction
    of it was aborted after its table writes reached the local stores; it must restart
    (``TransactionManager.on_rebalance``)."""


class TransactionalSendError(Exception):
    """An exactly_once send, made while processing input, that cannot be placed in a
    transaction (unknown partition or topic group)."""


def stopped_clean(app: Any) -> bool:
    """After the consumer stopped: True when the local table state holds exactly what
    the changelogs hold committed, so it may be kept for the next start
    (tables/local_state.py, the clean-shutdown marker).

    That is: neither the app nor its consumer crashed, no processing section was
    interrupted (``FastConsumer.section_interrupted``: its outputs were never
    committed), and under exactly_once no transactional producer holds records of an
    unfinished transaction (the final commit ended every transaction that had any; an
    aborted one's writes are still in RocksDB)."""
    consumer = app._consumer
    if app.crashed or consumer is None or consumer.crashed:
        return False
    if app.tables.aborted_writes:
        return False
    if getattr(consumer, "_broken_section", None) is not None:
        return False
    if app.in_transaction:
        return not any(holds_unended_records(producer)
                       for producer in list(app.producer._transaction_producers.values()))
    return True


def holds_unended_records(producer: Any) -> bool:
    """Whether a transactional producer's transaction holds records that no commit
    ended (or is in a failed state): stopped or replaced now, they are aborted, while
    the table writes among them are already in the local stores."""
    txn = producer._txn_manager
    if txn.state is TransactionState.READY:
        return False
    return not (txn.state is TransactionState.IN_TRANSACTION and txn.is_empty_transaction()
                and not txn.partitions_to_add())


#: Awaited with the new assignment at the end of ``TransactionManager.on_rebalance``
#: (exactly_once): after the transactional producers are ready, before Faust starts the
#: table recovery. The aggregate API fences a partition's previous owner here, so the
#: recovery reads everything that owner committed (agents/aggregate_api.py).
ASSIGNMENT_HOOKS: list[Any] = []


class TransactionManager(FaustTransactionManager):
    """Faust's transaction manager without its silent non-transactional fallback.

    Why (root cause of the exactly_once kill -9 repeats; evidence in docs/delivery.md):
    Faust's ``TransactionManager.send`` picks the transactional producer
    ``{app id}-{topic group}-{partition}`` only if ``consumer.key_partition(topic)`` is
    not None, and that reads the *consumer's* metadata, which covers only the topics
    the consumer subscribes to. For a sink topic (``passthrough.out``, a pipeline's
    sink) it is None, and Faust then sends with ``transactional_id=None``, through the
    plain producer, outside any transaction. (Had the metadata been there, Faust would
    have failed instead: the assignor knows topic groups of source topics only.) So
    every output of the agents went out non-transactionally: visible to
    ``read_committed`` at once, not tied to the offsets committed in the transaction,
    and written again after a kill -9 (measured: no transaction marker at all in the
    output partitions; a whole 5,000-record fetch repeated on the batch path).

    Here, a send made while input is processed (a batch agent's handler, a stream
    agent's event) always joins a transaction:

    * when the handler names the input partition the output comes from
      (``app.batches.from_partition``): that partition's transaction, which commits
      the input record's offset, whatever partition the output goes to (Kafka
      transactions span partitions; Kafka Streams likewise has one producer per task).
      Batch agents do this for sinks keyed anywhere (pipelines' ``key_by``), pattern
      repartitioning, alerts and dead letters. Otherwise, by the output's partition
      number, as Faust does:
    * partition: the one given, else the key's partition once the consumer has
      fetched metadata for the topic;
    * topic group: the topic's own group if the assignor knows it (changelogs, source
      topics), else the group of the source topic being processed. As in Faust, the
      transaction is the one of *that partition number*, so an agent must send to the
      partition number of its input record (the documented convention) for outputs and
      offsets to commit together. An output partition this worker does not own has no
      transaction to join: it is sent as before (plain producer), with a warning.

    Sends outside any processing (e.g. an HTTP handler writing reference data) are not
    tied to consumed offsets and keep Faust's plain send.
    """

    #: How long a send waits for a sink topic to appear in the consumer's metadata.
    metadata_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned: set[tuple[str, int]] = set()  # output partitions warned about
        #: Transactions whose commit failed after the consumer had handed over their
        #: offsets (``commit``): they hold outputs whose inputs are processed again.
        self.commit_failed: set[str] = set()

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any) -> None:
        """Instead of Faust's: stop every transactional producer whose partition this
        worker no longer holds as an active partition, then make sure every active
        partition's producer is in a fresh transaction (:meth:`ready_transaction`).

        Why, two defects (issue 23, finding 4; docs/delivery.md, G and M):

        * Faust stops the producers of revoked partitions only when they are not
          standbys now (``_tps_to_active_tpgs`` filters revoked partitions by the *new*
          assignment's standbys), and a source partition that moves to another worker
          usually becomes this worker's standby. Its producer stayed, fenced by the new
          owner's, and when the partition came back the first send crashed the worker
          (``ProducerFenced``): seen at graceful leaves that handed partitions back.
        * Faust calls ``begin_transaction`` for every assigned partition, also on a
          producer it kept whose transaction is still open. aiokafka refuses that
          (``Invalid state transition IN_TRANSACTION -> IN_TRANSACTION``, logged and
          ignored), so the open transaction lived on; after a rebalance longer than the
          transaction timeout the coordinator had aborted it and fenced the producer,
          and its next send or commit crashed the worker.

        It restarts the worker instead when a zombie missed a generation (section O) or
        a transaction was aborted after table writes (section AN)."""
        keep = self._tps_to_transactional_ids(assigned)
        gone = sorted(set(self.producer._transaction_producers) - keep)
        if any(holds_unended_records(self.producer._transaction_producers[tid]) for tid in gone):
            self.app.tables.on_aborted_writes()  # stopped with records: aborted by the next owner
        if gone:
            self.log.info("Stopping %d transactional producers of partitions no longer active here: %s",
                          len(gone), gone)
            await self._stop_transactions(gone)
        self.commit_failed.difference_update(gone)  # stopped: the next owner aborts them
        if self.missed_generations():
            # This worker was out of the group (a zombie: paused past its session, or
            # its session expired under load) for at least one generation, in which
            # other workers owned its partitions: its producers are fenced and its open
            # transactions were aborted, but its local stores still hold what those
            # transactions wrote (section E). Going on, with new producers, it processed
            # the partitions it got back on that state: a deduplicating pipeline took
            # the re-delivered records for copies of themselves (91 lost in a chaos
            # run). It restarts instead; at start its stores are restored from the
            # changelogs (issue 23, docs/delivery.md, O).
            raise ZombieRestart(
                "exactly_once: this worker missed a generation of the group (it was out of the "
                "group: paused, or its session expired); its local state may hold writes of "
                "aborted transactions, so it restarts and restores it from the changelogs")
        self.restart_if_tables_hold_aborted_writes()  # aborted or fenced since the last one
        for tid in sorted(keep):
            if commit_guard.session_lapsed():
                # Paused (or blocked) past its session while it set this assignment
                # up: the group has gone on, and these partitions have other owners
                # now. Registering a producer (InitProducerId) for the next id would
                # fence its current owner's (seen in a chaos run: a worker paused in
                # this loop woke and fenced a running worker, which crashed).
                raise ZombieRestart(
                    "exactly_once: this worker's group session lapsed while it started the "
                    "producers of its assignment; it restarts instead of fencing the producers "
                    "of the partitions' current owners")
            await self.ready_transaction(tid)
        self.restart_if_tables_hold_aborted_writes()  # ``ready_transaction`` may have aborted one
        for hook in ASSIGNMENT_HOOKS:
            await hook(assigned)

    def restart_if_tables_hold_aborted_writes(self) -> None:
        """Raise :class:`ZombieRestart` when a transaction of this process was aborted,
        fenced or stopped with records in it (``TableManager.aborted_writes``) after the
        process made table writes: it must not take an assignment on its local state.

        Why (docs/delivery.md, AN): the aborted transaction's batches had already
        written their table changes to the local stores (RocksDB, or memory), and their
        offsets were not committed, so they are processed again: a count applied
        twice, a dedupe key that drops its own record. Replaying a changelog from its
        start overwrites the keys it holds but never removes a key that only the
        aborted transaction wrote. At start the stores are restored from the
        changelogs, read read_committed (no clean-shutdown marker after an abort), as
        Kafka Streams wipes a task's exactly-once stores when it closes it dirty. A
        worker that never wrote a table (pipelines without dedupe) goes on (section G)."""
        tables = self.app.tables
        if tables.aborted_writes and table_writes_made(self.producer):
            raise ZombieRestart(
                "exactly_once: a transaction of this worker was aborted, fenced or left with "
                "records after its batches had written their table changes to the local "
                "stores; it restarts and restores its tables from the changelogs")

    def missed_generations(self) -> bool:
        """Whether the group's generation went up by more than one since this worker's
        previous assignment: generations it was no member of (then its partitions were
        assigned to others). Notes the current generation."""
        generation = getattr(self.app, "consumer_generation_id", None)
        previous = getattr(self, "_last_generation", None)
        self._last_generation = generation
        return previous is not None and generation is not None and generation > previous + 1

    async def commit(self, offsets: Any, start_new_transaction: bool = True) -> bool:
        """Faust's commit, one transaction at a time: a transaction that fails because
        its producer was fenced does not keep the others from committing; the first
        such failure is raised after all were tried (``FastConsumer.commit`` refuses
        the commit then).

        Why (issue 23, docs/delivery.md, O): Faust commits the transactions in turn and
        stops at the first failure. A zombie woken after its session (some partitions
        taken over, their producers fenced, others not) committed nothing after its
        first fenced transaction; the transactions after it kept the outputs of acked
        batches, whose offsets that commit had already taken from the consumer. At the
        rebalance that followed, those transactions were ended (``ready_transaction``)
        without their offsets, and the batches were processed again from the committed
        offset: their outputs twice in ``read_committed`` (a record twice in
        ``patterns-repartition``, its alert repeated). Each transaction holds the
        outputs of its own partition's records and commits that partition's offsets
        (``send``), so committing the others alone is exact."""
        by_tid: dict[str, dict[Any, int]] = {}
        app_id = self.app.conf.id
        for tp, offset in offsets.items():
            by_tid.setdefault(f"{app_id}-{self.app.assignor.group_for_topic(tp.topic)}-{tp.partition}", {})[tp] = offset
        failed: BaseException | None = None
        for tid, tid_offsets in by_tid.items():
            try:
                await self.producer.commit_transactions({tid: tid_offsets}, app_id,
                                                        start_new_transaction=start_new_transaction)
            except Exception as exc:  # fenced, or any other failure (a producer whose sender died)
                self.log.warning("exactly_once: transaction %s could not commit (%r); the others "
                                 "still do", tid, exc)
                self.commit_failed.add(tid)
                # A fence is refused quietly (``FastConsumer.commit``); any other failure
                # is raised in its place, so the worker does not go on past it.
                if failed is None or (isinstance(failed, FENCED) and not isinstance(exc, FENCED)):
                    failed = exc
            else:
                self.commit_failed.discard(tid)
        if failed is not None:
            raise failed
        return True

    async def ready_transaction(self, tid: str) -> None:
        """Leave ``tid``'s producer in an open transaction that holds nothing yet.

        * No producer yet, or its last transaction ended: begin one (Faust's start).
        * In a transaction that holds nothing: kept as it is.
        * In a transaction that holds records (sent while the group rebalanced, with
          no offsets), or failed: that transaction is ended (committed when it still
          can be, else aborted) and a new one begun. One whose commit failed
          (``commit_failed``) is aborted: its records are outputs of inputs whose
          offsets it was to commit, and those inputs are processed again. If the
          coordinator has already aborted it (transaction timeout) or fenced the
          producer, ending it fails:
          the producer is replaced by a new one with the same transactional id, whose
          registration (InitProducerId) bumps the epoch and aborts whatever is left.
          Nothing that was in it is lost from the input: its records carried no
          offsets, and the consumer starts from the committed offsets after a rebalance.
        """
        commit_failed = tid in self.commit_failed
        self.commit_failed.discard(tid)
        producer = self.producer._transaction_producers.get(tid)
        if producer is not None:
            txn = producer._txn_manager
            state = txn.state
            if txn.is_in_transaction() and txn.is_empty_transaction() and not txn.partitions_to_add():
                return
            if state is not TransactionState.READY:
                try:
                    async with self.producer._trn_locks[tid]:  # Faust's per-id lock (sends, commits)
                        if txn.is_in_transaction() and not commit_failed:
                            await producer.commit_transaction()
                        else:
                            self.app.tables.on_aborted_writes()
                            await producer.abort_transaction()
                except Exception as exc:  # fenced, timed out, or a fatal error before
                    self.app.tables.on_aborted_writes()
                    self.log.warning("exactly_once: the open transaction of %s could not be ended "
                                     "(%r; state %s); starting a new producer for it", tid, exc, state.name)
                    await self.producer.stop_transaction(tid)
        await self.producer.maybe_begin_transaction(tid)

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: float | None, headers: Any, *, transactional_id: str | None = None) -> Any:
        source = processing_topic()
        groups = self.app.assignor._topic_groups  # Faust's own map (group_for_topic raises KeyError)
        source_partition = SOURCE_PARTITION.get()
        if source is not None and source_partition is not None and source in groups:
            # The handler said which input partition this output comes from: it joins
            # that partition's transaction (the one committing that record's offset),
            # whatever partition it goes to; Kafka transactions span partitions.
            tid = f"{self.app.conf.id}-{groups[source]}-{source_partition}"
            if tid in self.producer._transaction_producers:
                return await self._send_in(tid, topic, key, value, partition, timestamp, headers)
        group = groups.get(topic)
        if group is None and source is not None:
            group = groups.get(source)
        if group is None:
            if source is not None:
                raise TransactionalSendError(
                    f"no topic group for {topic!r} (source {source!r}): refusing to send outside a transaction")
            # Not processing input: nothing to commit with it (Faust's plain send).
            return await self.producer.send(topic, key, value, partition, timestamp, headers,
                                            transactional_id=None)
        if partition is not None:
            p = partition
        else:
            p = self.consumer.key_partition(topic, key, None)
            if p is None:
                p = await self._partition_with_metadata(topic, key)
        tid = f"{self.app.conf.id}-{group}-{p}"
        if tid not in self.producer._transaction_producers:
            # This worker does not own partition ``p`` of the source group (an output
            # keyed to another partition, several workers): there is no transaction it
            # could join. Faust would raise; before this class such sends silently went
            # out non-transactionally, and they still do, but visibly (docs/delivery.md).
            if (topic, p) not in self._warned:
                self._warned.add((topic, p))
                self.log.warning("exactly_once: %s[%s] is not a partition this worker owns; its "
                                 "outputs are sent outside a transaction (at-least-once)", topic, p)
            return await self.producer.send(topic, key, value, p, timestamp, headers, transactional_id=None)
        return await self._send_in(tid, topic, key, value, p, timestamp, headers)

    async def _send_in(self, tid: str, topic: str, key: bytes | None, value: bytes | None,
                       partition: int | None, timestamp: float | None, headers: Any) -> Any:
        """Send into ``tid``'s open transaction, unless this worker's group session lapsed.

        Why (issue 23, docs/delivery.md AC): a worker woken after a pause longer than its
        session has had its partitions, and their transactional ids, taken over; its
        producers are fenced, and the first send into a transaction the fence ended
        raised ``IllegalOperation`` in Faust's producer buffer (the table writes' sender),
        which crashed the worker. It is a zombie: it restarts (:class:`ZombieRestart`)
        and restores its state from the changelogs, as section O does at its next
        rebalance."""
        if commit_guard.session_lapsed():
            raise ZombieRestart(
                f"exactly_once: this worker's group session lapsed; a send into {tid!r} would join "
                "a transaction that its partition's new owner has fenced, so it restarts")
        try:
            return await self.producer.send(topic, key, value, partition, timestamp, headers, transactional_id=tid)
        except IllegalOperation as exc:
            # The transaction ended under the batch: the coordinator aborted it (its
            # timeout passed while this worker was paused, though a broker restart in
            # the pause kept its group session alive: seen in a chaos run), or a fence
            # did. What the batch wrote to the local stores was aborted with it
            # (section AN): a zombie, which restarts and restores.
            raise ZombieRestart(
                f"exactly_once: the transaction {tid!r} ended under a batch (aborted after its "
                f"timeout, or fenced: {exc}); this worker restarts and restores its tables") from exc

    async def _partition_with_metadata(self, topic: str, key: bytes | None) -> int:
        """The key's partition of ``topic`` once the consumer's metadata knows the topic
        (added to the metadata the consumer tracks, in the consumer's thread)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.metadata_timeout
        while True:
            await self.consumer.track_topic_metadata(topic)
            p = self.consumer.key_partition(topic, key, None)
            if p is not None:
                return p
            if loop.time() >= deadline:
                raise TransactionalSendError(
                    f"no metadata for topic {topic!r} after {self.metadata_timeout}s: refusing to "
                    "send outside a transaction")
            await asyncio.sleep(0.1)


def processing_topic() -> str | None:
    """The source topic whose input is being processed here, if any: a batch agent's
    topic (``PROCESSING_TOPIC``) or the topic of Faust's current stream event."""
    source = PROCESSING_TOPIC.get()
    if source is not None:
        return source
    event = faust_current_event()
    return event.message.topic if event is not None else None


class ReplyConsumer(FaustReplyConsumer):
    """Faust's reply consumer (agent ``ask``: ``POST /api/v1/aggregate``), acking each
    reply as soon as its promise is fulfilled.

    Faust drains replies through a stream, which acks an event only when the next one
    arrives, so the last reply stayed unacked for good and ``Consumer.wait_empty`` made
    every graceful stop of a worker that had served an aggregate request wait forever
    (issue 17). A reply has no effect to protect: acking it at once loses nothing."""

    async def _drain_replies(self, channel: Any) -> None:
        stream = channel.stream()
        async for reply in stream:
            for promise in self._waiting[reply.correlation_id]:
                promise.fulfill(reply.correlation_id, maybe_model(reply.value))
            event = stream.current_event
            if event is not None:
                event.ack()  # the stream's own later ack of it is then a no-op


def reply_topic_name(topic_prefix: str, app_id: str, web_port: int) -> str:
    """A worker's reply topic: the app id, the host name and the web port, which
    together name one worker (two workers on one host cannot share a port). A restarted
    worker reuses its topic instead of creating ``f-reply-<uuid>`` anew: no topics pile
    up, and under static membership it subscribes to the same topics again, so its
    ``group.instance.id`` (:func:`group_instance_id`) is the same."""
    return _legal(f"{topic_prefix}{app_id}-reply-{socket.gethostname()}-{web_port}")


def arm_stop_deadline(seconds: float) -> threading.Timer:
    """End the process ``seconds`` from now unless it has exited by then.

    A graceful stop waits for every started message to be acked and commits; with the
    broker unreachable that commit (and the reference readers' offset requests) retry
    for 40 s and more. Cutting the stop short loses nothing: under at_least_once the
    uncommitted input is processed again after a restart, under exactly_once the open
    transaction is aborted, as after a kill. A thread, not a task: it fires even when
    the event loop is stuck."""

    def give_up() -> None:
        logging.getLogger(__name__).error(
            "graceful stop took longer than %.1f s (STREAMETL_STOP_TIMEOUT): exiting without "
            "finishing it; uncommitted input is processed again after a restart", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


class App(faust.App):
    """Faust's App, with what a worker needs at start and stop:

    - the data folder is created with every missing parent (Faust's
      ``_create_directories`` has no ``parents=True``: a worker whose
      ``STREAMETL_DATA_DIR`` did not exist yet, ``.data`` on a fresh clone or a Docker
      volume path, died at start with FileNotFoundError);
    - replies are acked as they arrive (:class:`ReplyConsumer`), on one reply topic
      per worker (:func:`reply_topic_name`);
    - a graceful stop is bounded (:func:`arm_stop_deadline`);
    - it refuses to start with library versions this module was not written for
      (:func:`check_versions`), or when an autodiscovered module fails to import."""

    #: Seconds a graceful stop may take before the process exits without finishing it
    #: (``Settings.stop_timeout``; 0 = wait for ever).
    stop_timeout: float = 0.0

    #: Prepended to the reply topic's name (``Settings.topic_prefix``).
    topic_prefix: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Awaited once, in order, when the worker's app starts, before anything else
        #: does (not for the other ``streametl`` commands, which do not start the app):
        #: checks, and the local state decision (tables/local_state.py). An exception
        #: stops the worker.
        self.start_checks: list[Callable[[], Awaitable[None]]] = [check_versions]
        self._rebalance_started: float | None = None
        self._rebalance_returned: float | None = None

    async def on_first_start(self) -> None:
        for check in self.start_checks:
            await check()
        Path(self.conf.datadir).mkdir(parents=True, exist_ok=True)
        # Named here, not at construction: ``--web-port`` is applied after that.
        self.conf.reply_to = reply_topic_name(self.topic_prefix, self.conf.id, self.conf.web_port)
        await super().on_first_start()

    def on_rebalance_start(self) -> None:
        self._rebalance_started = time.monotonic()
        super().on_rebalance_start()

    def on_rebalance_return(self) -> None:
        super().on_rebalance_return()
        self._rebalance_returned = time.monotonic()
        observe = observers.rebalance
        if observe is not None and self._rebalance_started is not None:
            observe("assign", self._rebalance_returned - self._rebalance_started)

    def on_rebalance_end(self) -> None:
        super().on_rebalance_end()
        observe = observers.rebalance
        if observe is not None and self._rebalance_returned is not None:
            observe("restore", time.monotonic() - self._rebalance_returned)
        self._rebalance_started = self._rebalance_returned = None

    async def on_stop(self) -> None:
        if self.stop_timeout > 0:
            arm_stop_deadline(self.stop_timeout)
        await super().on_stop()

    async def _stop_fetcher(self) -> None:
        """Faust's (it cancels the fetch loop), once the batch in flight, if any, has
        finished (``FastConsumer.finish_batch``), for at most a quarter of the stop's
        deadline: the commit, the tables' stop and the clean-shutdown marker come after."""
        consumer = self._consumer
        if isinstance(consumer, FastConsumer):
            limit = self.stop_timeout / 4 if self.stop_timeout > 0 else FINISH_ON_STOP_SECONDS
            if not await consumer.finish_batch(limit):
                self.log.warning("graceful stop: the batch in flight did not finish within %.1f s; "
                                 "it is cancelled", limit)
        await super()._stop_fetcher()

    def discover(self, *extra_modules: str, **kwargs: Any) -> None:
        """Faust's autodiscovery inside the start-up path (app/startup.py): the config
        file is read and checked first, the configured processors registered after."""
        from app import startup

        startup.config()
        super().discover(*extra_modules, **kwargs)
        startup.register_processors()

    def _on_autodiscovery_error(self, name: str) -> None:
        """Faust only logs a warning when an autodiscovered module fails to import, and
        the worker then runs without that module's agents or views. A broken module or
        an invalid config file must stop the worker with its error instead."""
        raise  # noqa: PLE0704 - called by venusian inside its ``except`` block

    @cached_property
    def _reply_consumer(self) -> ReplyConsumer:
        return ReplyConsumer(self, loop=self.loop, beacon=self.beacon)


class Recovery(FaustRecovery):
    """Faust's table recovery, restarted (not continued) when a rebalance interrupts it.

    Why (issue 23, finding 4; docs/delivery.md, J): a rebalance replaces Recovery's
    partition sets in place (``on_rebalance``) and signals a restart. Faust's
    ``_restart_recovery`` swallows the ``RebalanceAgain`` raised while it waits for the
    active changelogs (an ``except Exception`` around that wait) and goes on with the
    old pass: it seeks the *new* standby partitions, whose start offsets this pass never
    read (``None`` until then). aiokafka's ``seek`` raises ``ValueError: Offset must be a
    positive integer``, in the same step since the consumer runs in the worker's loop,
    and the worker crashes (seen: every restarted worker under exactly_once, whose wiped
    state leaves every new partition's offset ``None``, 11 times in 90 s). A step that
    acts on the partition sets after a new rebalance was signalled raises
    ``RebalanceAgain`` here instead, which Faust's loop answers with a fresh pass for
    the new assignment, as it does for every other interrupted step."""

    def _check_not_superseded(self) -> None:
        # Set by on_rebalance right after it replaced the sets; cleared when a pass starts.
        if self.signal_recovery_start.is_set():
            raise RebalanceAgain()

    #: True from the seek of the active changelog partitions of a recovery pass (their
    #: highwaters and start offsets known) until the next rebalance.
    _actives_seeked: bool = False

    async def _seek_offsets(self, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
        self._check_not_superseded()
        await super()._seek_offsets(consumer, tps, offsets, title)
        if title == "active":
            self._actives_seeked = True
            # A recovery end signalled for an earlier pass must not end this one: the
            # pass waits for ``signal_recovery_end`` right after this seek, and Faust
            # clears it only at its changelog loop's next turn (a record, or a 5 s
            # timeout). Set by ``_find_transactional_ends`` without that turn, it stayed
            # set, and the next rebalance's pass ended at once, before reading the
            # changelog partitions it had just been given: the new owner of a window
            # partition ran on the state of its standby copy (lost counts after a join
            # and a graceful leave; docs/delivery.md, S).
            self.signal_recovery_end.clear()

    async def on_rebalance(self, *args: Any, **kwargs: Any) -> None:
        self._actives_seeked = False
        await super().on_rebalance(*args, **kwargs)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        # Also after the swallowed RebalanceAgain: do not mark the new assignment as
        # recovered (tables' callbacks, in_recovery) before its pass ran.
        self._check_not_superseded()
        await super().on_recovery_completed(generation_id)

    #: How often, during recovery, the end of each changelog is looked for (see
    #: ``_find_transactional_ends``).
    end_check_interval: float = 0.1

    def _add(self, table: Any, tp: Any, offsets: Any) -> None:
        """Faust's, but a kept partition of an on-disk store with no saved offset is
        read from its start again, not from the offset this process noted in memory.

        Why (docs/delivery.md BE): a store saves the offset of every record it applies,
        so with none saved nothing was applied, and the noted offset can only be an end
        some check marked. A false one (Faust's own ``detect_aborted_tx`` after 10 s
        without records, which no flow guard stops) would skip the whole changelog in
        the next generation, as the one in BE did. A memory store saves no offsets and
        keeps what it applied: left as Faust has it."""
        if hasattr(getattr(table, "data", None), "partition_path") and table.persisted_offset(tp) is None:
            offsets.pop(tp, None)
        super()._add(table, tp, offsets)

    def _flowing(self) -> bool:
        """Whether records are flowing: not from a revocation (the flow stopped, taken
        records dropped or cleared from the changelog queue while the position stays
        past them) until the next pass resumes the flow.

        Why (docs/delivery.md BE, chaos seed 26): the end check ran in that gap, took
        the position past the dropped records for the end, and marked two window
        changelog partitions read to their highwaters. The next generation gave the
        worker the same partitions, Faust kept the in-memory offsets (the store had
        saved none), and the window agent ran on empty state: 600 windows lost, 25
        short."""
        return bool(self.app.consumer.flow_active and self.app.flow_control.is_active())

    @Service.task
    async def _find_transactional_ends(self) -> None:
        """Under either guarantee, mark a changelog whose position is past its
        highwater though its last offsets held no record as read to its end, within a
        fraction of a second.

        Why (issue 22; docs/delivery.md, S and AR): a changelog written in transactions
        ends with a commit or abort marker, maybe after aborted records, none of which
        the consumer delivers (it reads ``WORKER_ISOLATION_LEVEL``), so the recovery
        never sees a record at Faust's highwater (the end offset - 1). Faust notices
        this only after two consecutive 5 s waits for a changelog record, and only
        under exactly_once (``detect_aborted_tx``): every recovery of a non-empty
        changelog under exactly_once took 10 s or more, and an at_least_once worker
        whose changelog an exactly_once run had written waited for ever. Here the test
        (the consumer's position is past the highwater, so the last offset was fetched
        and skipped; nothing is queued) is made every ``end_check_interval`` once the
        pass has sought its active partitions, and, as Faust's, trusted only when it
        held twice in a row with the partition's offset unchanged in between (records
        fetched but not yet queued would move it). Faust's own test takes a position
        *at* the highwater, whose record may still be on its way: under at_least_once
        the last offset is a record, and the recovery would end without it."""
        seen: dict[Any, int] = {}
        while not self.should_stop:
            await self.sleep(self.end_check_interval)
            if (not (self._actives_seeked and self.in_recovery and self._flowing())
                    or self.signal_recovery_start.is_set() or self.tables.changelog_queue.qsize()):
                seen.clear()
                continue
            highwaters, offsets = self.active_highwaters, self.active_offsets
            ended = False
            for tp, highwater in list(highwaters.items()):
                offset = offsets.get(tp)
                if highwater is None or offset is None or offset >= highwater:
                    continue
                try:
                    position = await self.app.consumer.position(tp)
                except IllegalStateError:
                    # Taken away by a rebalance this pass has not seen yet (a session
                    # that lapsed): the next pass reads it, not this one.
                    seen.pop(tp, None)
                    continue
                if position is None or position <= highwater:
                    seen.pop(tp, None)
                elif seen.get(tp) == offset:
                    self.log.info("End of the transactional changelog %s reached (position %d)", tp, position)
                    offsets[tp] = highwater
                    ended = True
                else:
                    seen[tp] = offset
            if ended and self.in_recovery and not self.need_recovery():
                # The pass is waiting for this signal (the seek of its actives is followed,
                # with no await between, by its need_recovery check; offsets below their
                # highwater meant it waits). As Faust's loop: buffers first. Recovery is
                # marked ended by the pass itself (on_recovery_completed); if the signal
                # were cleared before the pass saw it, Faust's loop signals again at its
                # next 5 s wait (still in recovery, nothing needed).
                self.flush_buffers()
                self.signal_recovery_end.set()


class TableManager(FaustTableManager):
    """Faust's table manager with :class:`Recovery` (``App(TableManager=...)``), which
    under exactly_once also stores the changelog offsets its commits made durable."""

    async def on_stop(self) -> None:
        """Faust's, after one full garbage collection and a freeze of what is left.

        Why (issue 22, 1,000,000 keys under exactly_once): Faust's RocksDB store runs a
        full ``gc.collect()`` when it stops (to drop its databases), once per table.
        With a million keys of window state in memory (the caches, the close index),
        each pass took 1.5-3 s on the loaded machine, and five of them passed the stop
        deadline (``STREAMETL_STOP_TIMEOUT``, 8 s): the worker exited without its final
        commit or the clean-shutdown marker, and the next start restored every table in
        full. Collected once here and frozen, what those passes walk is only what the
        stop itself creates; a database is still closed when its store drops it (freed
        by its reference count), before the marker lists the tables' files."""
        gc.collect()
        gc.freeze()
        await super().on_stop()

    async def on_start(self) -> None:
        """Faust's, without the second it sleeps first (for tables declared late).

        Why (issue 22, restarts within 5 s): that sleep was a fixed second of every
        start. Every table of this app is declared before the worker starts (module
        imports and ``startup.register_processors``, both in ``App.discover``), and a
        table added after this point still fails loudly ("Too late to add tables")."""
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    def on_commit(self, offsets: Any) -> None:
        """After a commit of source ``offsets``: store the persisted offset of every
        changelog partition whose transaction that commit ended.

        Why (issue 22; docs/delivery.md, S): under exactly_once Faust holds a changelog
        write's offset until its transaction commits (``persist_offset_on_commit``,
        keyed by the *changelog* partition), but its ``on_commit`` looks those up by
        the committed *source* partitions, so it never finds them: no table ever had
        a persisted offset, and every start replayed every changelog from offset 0,
        even with the local state kept. A changelog partition's writes are in the
        transaction ``{app id}-{topic group}-{partition}`` (``TransactionManager.send``),
        the one of the source partition with the same group and number."""
        super().on_commit(offsets)
        if not self.app.in_transaction or self.aborted_writes:
            return
        assignor = self.app.assignor
        committed = set()
        for tp in offsets:
            try:
                committed.add((assignor.group_for_topic(tp.topic), tp.partition))
            except KeyError:
                continue
        for tp, (store, offset) in list(self._pending_persisted_offsets.items()):
            try:
                group = assignor.group_for_topic(tp.topic)
            except KeyError:
                continue
            if (group, tp.partition) in committed:
                store.set_persisted_offset(tp, offset)
                del self._pending_persisted_offsets[tp]

    #: Set once a transaction of this process that may have written tables was aborted
    #: or fenced: the local RocksDB may hold its writes (tables/local_state.py).
    aborted_writes: bool = False

    def on_aborted_writes(self) -> None:
        """exactly_once: a transaction of this process was aborted, fenced or left
        unfinished while the process goes on, so its table writes may be in the local
        RocksDB. From now on no persisted offset is kept, and those already kept are
        reset: a partition that comes back to this process is replayed from its
        changelog's start, overwriting every key with its committed value (as before
        persisted offsets were kept); and no clean-shutdown marker is written."""
        if self.aborted_writes:
            return
        self.aborted_writes = True
        self._pending_persisted_offsets.clear()
        for table in self.values():
            store = table.data
            partition_path = getattr(store, "partition_path", None)
            if partition_path is None:  # not RocksDB: nothing outlives the process
                continue
            topic = table.changelog_topic.get_topic_name()
            for partition in range(table.partitions or self.app.conf.topic_partitions):
                if partition_path(partition).exists():
                    store.set_persisted_offset(TP(topic, partition), -1)

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class ProducerBuffer(FaustProducerBuffer):
    """Faust's producer buffer (where table writes wait: ``Table[key] = value`` cannot
    await), counting the messages put and handed to the producer, so that
    :meth:`handed_over` can wait for every message put before it.

    Why: Faust's ``flush`` returns once a send has not finished within 0.1 s (a full
    record batch, a slow broker), and as soon as the queue is empty while its last
    message is still being sent. Under exactly_once the batch's transaction could then
    commit its offsets before some of its table writes joined it: they went into the
    next transaction, which a kill -9 aborts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.put_count = 0
        self.handed_count = 0
        self._handed = asyncio.Event()

    def put(self, fut: Any) -> None:
        super().put(fut)
        self.put_count += 1

    async def _send_pending(self, fut: Any) -> None:
        try:
            await super()._send_pending(fut)
            # Not a send that raised: that crashes the buffer, and ``handed_over``
            # raises rather than count a table write the transaction lacks.
            self.handed_count += 1
        finally:
            self._handed.set()

    async def handed_over(self) -> None:
        """Return once every message put so far is in the producer's hands (under
        exactly_once: in its transaction); raise if the buffer stopped before (as
        Faust's ``flush`` does)."""
        target = self.put_count
        while self.handed_count < target:
            if self.state != "running":
                cause = self.crash_reason
                if isinstance(cause, ZombieRestart):
                    # The worker's reason to stop (a send refused as a zombie's), not a
                    # failure of the batch: the supervisor and its logs see it as such.
                    raise cause
                raise RuntimeError(f"producer buffer {self.state} with {target - self.handed_count} "
                                   "table writes not handed over") from cause
            self._handed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._handed.wait(), 0.5)


class Producer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with :class:`ProducerBuffer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.app.conf.producer_threaded:  # a threaded producer keeps its own queue
            self.buffer = ProducerBuffer(loop=self.loop, beacon=self.beacon)
            self.buffer.app = self.app


def table_writes_made(producer: Any) -> bool:
    """Whether this process has written any table: every table write puts its changelog
    record into the producer's buffer (:class:`ProducerBuffer` counts them); True when
    the buffer cannot tell."""
    return getattr(producer.buffer, "put_count", 1) > 0


async def table_writes_handed_over(app: Any) -> None:
    """Every table write made so far is in the producer's hands (see
    :class:`ProducerBuffer`)."""
    buffer = app.producer.buffer
    if isinstance(buffer, ProducerBuffer):
        await buffer.handed_over()
    else:
        await buffer.flush()


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with :class:`FastConsumer` as its consumer, a
    :class:`TransactionManager` that never sends outside a transaction, and a
    :class:`Producer` whose buffer can be drained for sure."""

    Consumer = FastConsumer
    Producer = Producer
    TransactionManager = TransactionManager


class Web(faust_aiohttp_web.Web):
    """Faust's aiohttp web server without Faust's production index at ``/``, where
    streametl serves its dashboard (web/dashboard.py)."""

    production_blueprints: ClassVar[list] = []


def unique_topic_groups(copartitioned: Any) -> dict[str, int]:
    """Topic -> topic group number, one number per copartitioned topic set.

    ``copartitioned``: partition count -> the topic sets of that count (Faust's
    ``_get_copartitioned_groups``). The first set of each count (by sorted topic names)
    keeps Faust's number, the index of its partition count; each further set of a count
    gets a number after all of those. So with one set per count, as when every worker
    subscribes to the same topics, the numbers (and the transactional ids built from
    them) are Faust's."""
    counts = sorted(copartitioned)
    groups: dict[str, int] = {}
    extra = len(counts)
    for index, count in enumerate(counts):
        for rank, topics in enumerate(sorted(sorted(topic_set) for topic_set in copartitioned[count])):
            if rank:
                number, extra = extra, extra + 1
            else:
                number = index
            for topic in topics:
                groups[topic] = number
    return groups


class PartitionAssignor(FaustPartitionAssignor):
    """Faust's assignor with a topic group number per copartitioned topic set
    (``App(PartitionAssignor=...)``).

    Why (docs/delivery.md, X): Faust numbers topic groups by partition count, but
    assigns each set of co-subscribed topics of that count on its own. Topics of one
    count subscribed by different sets of workers (a worker started with another
    pipeline config: a rolling config change) form two sets with one number, so
    partition 0 of a one-partition topic of each set could go to two workers, both
    with the transactional id ``{app id}-{group}-0``: under exactly_once each one's
    producer fences the other's."""

    def _get_copartitioned_groups(self, topics: Any, cluster: Any, subscriptions: Any) -> Any:
        groups = super()._get_copartitioned_groups(topics, cluster, subscriptions)
        self._copartitioned = {count: [set(topic_set) for topic_set in sets] for count, sets in groups.items()}
        return self._copartitioned

    def _protocol_assignments(self, assignments: Any, cl_distribution: Any, tp_distribution: Any,
                              topic_groups: Any) -> Any:
        return super()._protocol_assignments(assignments, cl_distribution, tp_distribution,
                                             unique_topic_groups(self._copartitioned))


#: How long a transactional producer waits before asking again when the broker answers
#: the first AddPartitionsToTxn of a transaction with CONCURRENT_TRANSACTIONS (aiokafka:
#: 20 ms, its ``BACKOFF_OVERRIDE``; see ``shorten_concurrent_transactions_backoff``).
CONCURRENT_TRANSACTIONS_BACKOFF = 0.002


def shorten_concurrent_transactions_backoff() -> None:
    """Make aiokafka ask again after ``CONCURRENT_TRANSACTIONS_BACKOFF`` instead of 20 ms
    when a transaction's first partition is refused with CONCURRENT_TRANSACTIONS.

    Why (issue 22, docs/performance.md, "exactly_once aggregate tail"): the broker
    answers so while it still writes the previous transaction's commit markers, a few
    ms after that commit returned. A producer that begins its next transaction at once
    (``POST /api/v1/aggregate`` under exactly_once: one transaction per request on the
    owner's producer of that partition) then slept 20 ms, which was the whole p99 tail
    (p50 4.7, p99 24.6-30 ms). Asking sooner changes nothing the broker decides: the
    partition joins the transaction only once the previous one is complete."""
    aiokafka_sender.BACKOFF_OVERRIDE = CONCURRENT_TRANSACTIONS_BACKOFF


def install() -> None:
    """Register :data:`SCHEME` in Faust's transport registry and :data:`WEB_SCHEME` in
    its web driver registry; guard transactional producer registration, retry a
    coordinator lookup that lost its connection, and shorten aiokafka's wait after
    CONCURRENT_TRANSACTIONS (all idempotent)."""
    TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
    WEB_DRIVERS.aliases.setdefault(WEB_SCHEME, f"{__name__}:Web")
    refuse_registration_after_lapsed_session()
    retry_coordinator_lookup_on_lost_connections()
    shorten_concurrent_transactions_backoff()


def retry_coordinator_lookup_on_lost_connections() -> None:
    """Make aiokafka's producer sender look its transaction coordinator up again when
    the lookup failed with a retriable error (the broker's connection closed or
    refused), as it already does for "coordinator not available" and timeouts.

    Why (issue 23, docs/delivery.md AD): aiokafka retries the lookup only for those
    three errors and turns every other one into ``KafkaError("Unexpected error during
    batch delivery")``, which ends the sender: the producer is dead, the next commit
    fails and the worker stops. A broker restart during an exactly_once commit (the
    lookup of the EndTxn's coordinator found the connection closed) ended a running
    worker that way in the long chaos mode."""
    Sender = aiokafka_sender.Sender
    find = Sender._find_coordinator
    if getattr(find, "retries_lost_connections", False):
        return

    async def find_again(self: Any, coordinator_type: Any, coordinator_key: Any) -> Any:
        while True:
            try:
                return await find(self, coordinator_type, coordinator_key)
            except KafkaError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, KafkaError) and cause.retriable):
                    raise
                await self.client.force_metadata_update()
                await asyncio.sleep(self._retry_backoff)

    find_again.retries_lost_connections = True  # type: ignore[attr-defined]
    Sender._find_coordinator = find_again


def refuse_registration_after_lapsed_session() -> None:
    """Make every transactional aiokafka producer of this process check, right before
    it registers (InitProducerId), that the worker's group session has not lapsed; if
    it has, raise :class:`ZombieRestart` instead of registering.

    Why (issue 23, docs/delivery.md AC): registering a transactional id bumps its epoch
    and fences whoever holds it. ``TransactionManager.on_rebalance`` checks the session
    before each registration, but a worker paused *inside* one (its request not sent
    yet, a metadata refresh in between) sent it when woken, 70 s later: it fenced the
    producer the partition's new owner had registered meanwhile, and that running
    worker crashed (``ProducerFenced``, then ``Can't send messages while not in
    transaction``). The aggregate API's owner writers register their own producers and
    had no check at all. Checked here, there is no await between check and request."""
    Sender = aiokafka_sender.Sender
    register = Sender._do_init_pid
    if getattr(register, "guards_zombies", False):
        return

    async def guarded(self: Any, node_id: Any) -> Any:
        txn = self._txn_manager
        if txn is not None and txn.transactional_id is not None and commit_guard.session_lapsed():
            raise ZombieRestart(
                f"exactly_once: this worker's group session lapsed before it registered the "
                f"producer {txn.transactional_id!r}; it restarts instead of fencing the "
                "producer of the partition's current owner")
        return await register(self, node_id)

    guarded.guards_zombies = True  # type: ignore[attr-defined]
    Sender._do_init_pid = guarded


def open_table_stores(app: Any) -> list[tuple[str, int, bool, Any]]:
    """(table name, partition, standby?, its RocksDB) of each table partition whose
    RocksDB is open on this worker now (``app.metrics`` reads its sizes at scrape time).

    Faust's RocksDB store keeps them in ``Store._dbs`` and drops a partition from it when
    it is revoked, so a partition this worker lost has no entry after the rebalance.
    ``_db_for_partition`` is not used: it would open (create) a partition's database.
    Callers must not keep the databases: a kept reference holds a revoked partition's
    RocksDB, and its lock, open (see ``LiveContext.release_stores``)."""
    try:
        standbys = app.assignor.assigned_standbys()
    except Exception:  # no assignment yet (starting, stopping)
        standbys = set()
    found = []
    for table in list(app.tables.values()):
        dbs = open_dbs(table)
        if dbs is None:
            continue  # not a RocksDB store
        changelog = table.changelog_topic.get_topic_name()
        for partition, db in list(dbs.items()):
            found.append((table.name, partition, TP(changelog, partition) in standbys, db))
    return found


def open_dbs(table: Any) -> dict[int, Any] | None:
    """The RocksDBs of ``table`` open on this worker now, by partition (Faust's
    ``Store._dbs``; see :func:`open_table_stores`), or None for a store that keeps
    nothing on disk."""
    dbs = getattr(table.data, "_dbs", None)
    return dbs if isinstance(dbs, dict) else None


def release_partition(table: Any, partition: int) -> None:
    """Drop a table partition's RocksDB from its store's open ones, as Faust's
    ``revoke_partitions`` does (closed once unreferenced; reopened on its next use)."""
    dbs = open_dbs(table)
    if dbs is not None:
        dbs.pop(partition, None)


def broker_url(url: str) -> str:
    """The broker URL with every ``kafka://``/``aiokafka://`` part switched to
    :data:`SCHEME`, so Faust builds :class:`Transport` for it."""
    parts = []
    for part in url.split(";"):
        scheme, sep, rest = part.strip().partition("://")
        if sep and scheme in {"kafka", "aiokafka"}:
            part = f"{SCHEME}://{rest}"
        elif not sep and part.strip():
            part = f"{SCHEME}://{part.strip()}"
        parts.append(part)
    return ";".join(parts)


# --- Versions ---------------------------------------------------------------------

#: The versions of the libraries whose internals this module uses that it was written
#: for and tested with, as [lowest, above-highest) (pyproject.toml declares the same).
#: Its subclasses override private methods of Faust and aiokafka and read their private
#: state: another version may rename or change them, and the delivery fixes above would
#: then stop applying without any error. So a worker refuses to start with another
#: version (``check_versions``); an upgrade means reading this module first, then
#: widening the range here and in pyproject.toml.
WRITTEN_FOR: dict[str, tuple[str, str]] = {
    "faust-streaming": ("0.15.3", "0.15.4"),
    "mode-streaming": ("0.7.1", "0.8"),
    "aiokafka": ("0.12", "0.15"),
}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def version_problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per library whose installed version is outside ``WRITTEN_FOR`` (or
    missing); empty when every one is inside."""
    if installed is None:
        installed = {name: _installed_version(name) for name in WRITTEN_FOR}
    problems = []
    for name, (lowest, above) in WRITTEN_FOR.items():
        version = installed.get(name)
        if version is None:
            problems.append(f"{name} is not installed (app/transport.py needs >={lowest},<{above})")
        elif not _version_tuple(lowest) <= _version_tuple(version) < _version_tuple(above):
            problems.append(f"{name} {version} is installed; app/transport.py was written for "
                            f">={lowest},<{above} and overrides its internals")
    return problems


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


async def check_versions() -> None:
    """A start check (``App.start_checks``): refuse to start with a faust-streaming,
    mode-streaming or aiokafka version this module was not written for."""
    problems = version_problems()
    if problems:
        for line in problems:
            log.error("%s", line)
        raise RuntimeError("unsupported library versions (see WRITTEN_FOR in app/transport.py): "
                           + "; ".join(problems))
    log.info("library versions: %s", ", ".join(f"{n} {_installed_version(n)}" for n in WRITTEN_FOR))


# --- Internals the rest of the project reads ----------------------------------------
# Each behind a named function, so that no other module touches a private attribute of
# faust, mode or aiokafka (tests/unit/test_private_attributes.py).


def read_offset(consumer: Any, tp: Any) -> int | None:
    """The offset of the last record of ``tp`` Faust's consumer handed to the batch
    agents in this assignment (``Consumer._read_offset``), or None before the first.

    Why not ``_read_offset`` alone: after an assignment Faust's recovery seeks it to the
    committed offset, the *next* record to read, and only a delivered batch makes it the
    last one read (``FastConsumer._last_timestamp`` then has the partition, as
    ``partition_progress`` reads it). Taken as read, one unread record counted as read
    to the end: a window closed, or a pattern timer fired, ahead of it."""
    delivered = getattr(consumer, "_last_timestamp", None)
    if delivered is None or tp not in delivered:
        return None
    return consumer._read_offset.get(tp)


def fetched_to(consumer: Any, tp: Any, end: int | None) -> bool:
    """True when the consumer fetched ``tp`` up to ``end`` and holds none of its records
    back (all were handed to the agents). False when ``end`` is not known.

    Why: the consumer reads read_committed (``WORKER_ISOLATION_LEVEL``), and every
    transaction leaves a commit or abort marker (and aborted records) in the log that
    is never delivered. So the last offset delivered stays below the end offset for
    good, and a partition compared by offsets never looked idle: idle close never
    closed a window under exactly_once (or, under at_least_once, on an input written in
    transactions). The fetch position does move past markers and aborted records."""
    if end is None:
        return False
    first_held = getattr(consumer, "first_held", None)
    if first_held is not None and first_held(tp) is not None:
        return False  # taken from aiokafka, not delivered yet (``FastConsumer.position``)
    try:
        aio = consumer._thread._ensure_consumer()
        state = aio._subscription.subscription.assignment.state_value(tp)
        return bool(state.has_valid_position and state.position >= end
                    and tp not in aio._fetcher._records)
    except Exception:  # not assigned, no position, or a different client
        return False


def set_current_event(event: Any) -> None:
    """Make ``event`` Faust's current event (what table writes are partitioned by)."""
    faust_current_event_var.set(weakref.ref(event))


@contextlib.contextmanager
def as_current_event(event: Any) -> Generator[None, None, None]:
    """Make ``event`` Faust's current event (its partition picks store and changelog)
    for the duration of the ``with`` block."""
    token = faust_current_event_var.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_current_event_var.reset(token)


def partition_db(table: Any, partition: int) -> Any:
    """The RocksDB (rocksdict) of one partition of a Faust table (its store's
    ``_db_for_partition``), or None for another kind of store (memory)."""
    get_db = getattr(table.data, "_db_for_partition", None)
    return None if get_db is None else get_db(partition)


def delete_in_partition(table: Any, db: Any, key: bytes) -> bool:
    """Delete ``key`` from one partition of a Faust table with a RocksDB store: from that
    partition's database ``db`` (``partition_db``), with a tombstone in the changelog
    through the table (so in the partition of the current event, and under exactly_once
    in its transaction). Returns False when the key is not there.

    Why not ``del table[key]``: Faust's RocksDB store deletes a key from the partition its
    key index last saw it in, or, for a key that index does not know (values this
    project writes as record batches, ``tables.store.StoreWrites``, never enter it),
    from every partition it holds. A dedupe id kept by two partitions (a keyless topic)
    that expired in one was deleted in the other too, locally and without a tombstone
    there, and admitted again within its horizon (tests/integration/test_dedupe_expiry.py).
    """
    if db.get(key) is None:
        return False
    table.on_key_del(key)  # the changelog tombstone (``ManagedUserDict.__delitem__``'s first half)
    db.delete(key)
    return True


async def refresh_metadata(consumer: Any) -> None:
    """Ask the broker for fresh metadata of every topic an aiokafka consumer knows of
    (the client's ``force_metadata_update``; the consumer has no public call for it)."""
    await consumer._client.force_metadata_update()


async def refresh_topic_metadata(client: Any, topic: str) -> None:
    """Ask the broker for the metadata of ``topic``, which an aiokafka client asks for
    only once it knows the topic (its ``force_metadata_update`` does not add it)."""
    await client._metadata_update(client.cluster, [topic])


def record_appender(batch: Any) -> Callable[..., Any]:
    """The record builder's ``append(offset, timestamp, key, value, headers)`` of an
    aiokafka ``BatchBuilder``; None from it means the batch is full. See
    ``append_record``; a caller appending many records keeps this bound method."""
    return batch._builder.append


def append_record(batch: Any, offset: int, key: bytes | None, value: bytes | None, headers: list,
                  timestamp_ms: int | None = None) -> bool:
    """Append one record at relative ``offset`` to an aiokafka ``BatchBuilder`` we alone
    fill; False when the batch is full.

    Why not ``BatchBuilder.append``: it wraps this same call on its record builder with
    serializer and closed-batch checks that a batch of already encoded records, filled
    by one caller, does not need: 0.92 µs a record against 0.37 (measured), and the
    sink and changelog paths append one or two records per event. ``finished`` sets
    the record count the wrapper would have kept."""
    return batch._builder.append(offset, timestamp_ms, key, value, headers) is not None


def finished(batch: Any, count: int) -> Any:
    """``batch`` with its record count (what ``BatchBuilder.append`` keeps), closed."""
    batch._relative_offset = count
    batch.close()
    return batch


def reset_producer_id(producer: Any) -> bool:
    """Make an idempotent, not transactional, aiokafka producer register a new producer
    id before it drains its next batch (its sender waits for one at each round), with
    every partition's sequence number back at 0; True if it did.

    Why (docs/delivery.md, W): aiokafka numbers a partition's batches when it first
    drains them and never takes a number back. A batch given up after that (no known
    leader past its request timeout, during a broker restart) leaves a gap, and the
    broker answers every later batch of that producer and partition with
    ``OutOfOrderSequenceNumber``, for good. Kafka's Java producer resets its producer
    id or bumps its epoch then (KIP-360); aiokafka does not."""
    from aiokafka.producer.transaction_manager import NO_PRODUCER_EPOCH, NO_PRODUCER_ID, PidAndEpoch

    txn = getattr(producer, "_txn_manager", None)
    if txn is None or txn.transactional_id is not None or not txn.has_pid():
        return False
    txn._pid_and_epoch = PidAndEpoch(NO_PRODUCER_ID, NO_PRODUCER_EPOCH)
    txn._pid_waiter = asyncio.get_running_loop().create_future()
    txn._sequence_numbers.clear()
    return True


def batch_records(batch: Any) -> list[tuple[bytes | None, bytes | None, list, int]]:
    """(key, value, headers, timestamp in epoch ms) of each record of an aiokafka
    ``BatchBuilder`` handed to the producer, to send them again in a new batch.

    Why read them back: the builder cannot be sent twice (aiokafka builds its buffer
    once, and sets the producer id and sequence on the builder it then drops), and the
    batch paths hold no copy of the records (``kafka_io.RecordBatches``)."""
    from aiokafka.record.default_records import DefaultRecordBatch

    return [(r.key, r.value, list(r.headers), r.timestamp)
            for r in DefaultRecordBatch(bytearray(batch._build()))]


def consumer_state(app: Any, topic: str) -> dict[str, Any]:
    """Why a consumer might not be fetching ``topic``: flow, paused partitions, unacked
    messages, the fetcher service, and ``topic``'s partitions by state (a debug view,
    GET /api/v1/passthrough)."""
    consumer = app.consumer

    def mine(tps: Any) -> list[int]:
        return sorted(tp.partition for tp in tps if tp.topic == topic)

    fetcher = app._fetcher
    return {
        "flow_active": consumer.flow_active,
        "app_flow_active": app.flow_control.is_active(),
        "paused": sorted(f"{tp.topic}:{tp.partition}" for tp in consumer._paused_partitions),
        "unacked": len(consumer._unacked_messages),
        "rebalancing": app.rebalancing,
        "fetcher": {"started": fetcher._started.is_set(), "crashed": fetcher._crashed.is_set(),
                    "stopped": fetcher._stopped.is_set(), "state": str(fetcher.state)},
        "assigned": mine(consumer.assignment()),
        "active": mine(consumer._active_partitions or ()),
        "buffered": mine(consumer._buffered_partitions),
        "read_offset": {f"{tp.partition}": off for tp, off in consumer._read_offset.items()
                        if tp.topic == topic},
    }


__all__ = ["SCHEME", "CommitGuard", "FastConsumer", "Observers", "commit_guard", "observers", "RawPartitionRecords",
           "Recovery", "ReplyConsumer", "ResumeDelivery", "App", "ASSIGNMENT_HOOKS", "stopped_clean", "TableManager", "WEB_SCHEME", "Web", "reply_topic_name",
           "PartitionAssignor", "TransactionManager", "unique_topic_groups",
           "TransactionalSendError", "Transport", "broker_url", "install", "open_table_stores", "start_inline",
           "WRITTEN_FOR", "append_record", "as_current_event", "batch_records", "check_versions",
           "reset_producer_id", "consumer_state", "HELD_PARTITIONS", "PartitionHolds",
           "delete_in_partition", "fetched_to", "finished", "partition_db", "read_offset", "record_appender", "refresh_metadata",
           "refresh_topic_metadata", "set_current_event", "version_problems"]
