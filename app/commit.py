"""The one place the delivery guarantee is decided: how outputs are sent (``Emitter``)
and how state, outputs and offsets commit together (``CommitProtocol``).

Agents, tables and views never look at ``processing_guarantee``; they

* send outputs through ``emitter`` (``send``, ``send_later``, ``writer``, ``tick``),
  chosen once here: pipelined record batches through ``app.kafka_io`` under
  at_least_once, Faust's transactional producer under exactly_once (each output in the
  transaction of the input partition it comes from, ``app.batches.from_partition``);
* keep their state in write-back caches (``tables.store.WriteBackCache``) registered
  with ``commit_protocol``, and call ``await commit_protocol.end_batch(cache)`` at the
  end of each batch.

One commit, in this order: wait for every output sent so far to be acknowledged, then
flush every registered cache (each: changelog records acknowledged, then one RocksDB
write batch per partition), then the offsets. So a committed offset never covers an
output or a state change that is not durable, and the state that drops a closed window
is never written before the result that reports it. Under exactly_once the caches are
flushed at the end of every batch instead, inside the batch's transaction.

Under at_least_once a commit is a snapshot (``CommitProtocol.begin_commit``, hooked
into app/transport.py's commits): between two processing sections it takes the offsets
acked so far and every cache's unwritten values; then batches run again while it
encodes those values (a part at a time, between batches), waits for the sends made
until then, writes the values and commits those offsets, in that order. A batch never
waits for the commit's round trips (issue 22: alerts waited ~100 ms on them).
Under exactly_once the whole commit stays between two sections: the transaction being
committed is the one a batch would send into, and one producer has one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.types import TP

from app import app, settings
from app.batches import from_partition
from app.codec import dumps_held
from app.dead_letter import send_dead_letter
from app.kafka_io import KeyPartitioner, OutgoingMessage, RecordBatches, kafka_io
from app.kafka_security import client_options
from app.transport import (
    ASSIGNMENT_HOOKS,
    FastConsumer,
    as_current_event,
    commit_guard,
    table_writes_handed_over,
)

log = logging.getLogger(__name__)


def exactly_once(of: Any = settings) -> bool:
    """True when ``of`` (the worker's Settings) asks for exactly_once processing."""
    return of.processing_guarantee == "exactly_once"


#: The guarantee, decided once per process (Settings is read once).
EXACTLY_ONCE = exactly_once(settings)

#: An output: (topic object, key, value), (topic object, key, value, headers) or
#: (topic object, key, value, headers, timestamp in epoch ms).
Output = tuple


class Flushable(Protocol):
    """What the commit protocol needs of a registered state cache."""

    failed: bool

    async def flush(self) -> None: ...

    def moved(self) -> None: ...

    def drop_unflushed(self) -> None: ...

    def pending(self) -> bool: ...

    def over_dirty_limit(self) -> bool: ...


class Emitter:
    """at_least_once: outputs as pipelined record batches (``app.kafka_io``).

    Far cheaper per message than Faust's per-message send. A batch's outputs are
    acknowledged before its offsets can commit: ``send`` waits for them, ``send_later``
    leaves them in flight until ``flush`` (which the commit protocol runs first)."""

    #: Sends in flight (``send_later``) kept while the next batch runs.
    MAX_SENDING = 4
    #: Outputs, state and offsets commit in one Kafka transaction.
    transactional = False

    def __init__(self) -> None:
        #: ``send_later`` sends not flushed yet, oldest first. Each is handed to the
        #: producer after the one before it was, and after every earlier send it shares
        #: a key with is acknowledged: a key's outputs are stored only after its earlier
        #: ones were, and outputs of different keys in the order made unless a send
        #: fails and is sent again.
        self.sending: list[asyncio.Future] = []
        #: The keys of each send in flight (``send_later``).
        self._keys_of: dict[asyncio.Future, _SendKeys] = {}
        #: Done once the newest send's outputs are handed to the producer.
        self._last_handed: asyncio.Future | None = None
        self._partitioners: dict[str, KeyPartitioner] = {}

    # --- the state store's changelog path ----------------------------------------------

    def batches_changelog(self) -> bool:
        """True when the state stores write their changelog as pipelined record batches
        (acknowledged before RocksDB is written); False: through Faust's table API."""
        return kafka_io.ready.is_set()

    async def ready(self) -> None:
        """Wait for the batch producer while it starts (the first fetches of a backlog
        arrive before it is up): Faust's per-message path, the fallback, costs several
        times more. Not while it stops: then the fallback is used."""
        if not kafka_io.ready.is_set() and not kafka_io.should_stop:
            await kafka_io.ready.wait()

    async def table_writes_done(self) -> None:
        """After writes through Faust's table API: nothing to do (Faust flushes its
        producer before an at_least_once commit)."""

    # --- outputs -------------------------------------------------------------------------

    async def partitioner(self, topic_name: str) -> KeyPartitioner:
        """Where a key goes in ``topic_name`` (its partition count, looked up once)."""
        partition_of = self._partitioners.get(topic_name)
        if partition_of is None:
            count = await kafka_io.partition_count(topic_name) or settings.topic_partitions
            partition_of = self._partitioners[topic_name] = KeyPartitioner(count)
        return partition_of

    async def send(self, topic: Any, items: Sequence[tuple[int | None, bytes | None, bytes,
                                                            Sequence[tuple[str, bytes]], int | None]],
                   *, in_order: bool = False) -> None:
        """Send ``(source partition, key, value, headers, partition or None)`` items to
        ``topic``; returns once the broker acknowledged them all (a key's partition when
        none is given). ``in_order``: as ``kafka_io.send_batch``'s."""
        if not items:
            return
        await self.ready()
        if not kafka_io.ready.is_set():  # stopping: Faust's producer, flushed before it commits
            await _send_through_faust(topic, items)
            return
        await kafka_io.send_batch(topic.get_topic_name(),
                                  [OutgoingMessage(key, value, tuple(headers), partition)
                                   for _, key, value, headers, partition in items],
                                  settings.topic_partitions, in_order=in_order)

    def takes_grouped(self) -> bool:
        """Whether ``send_later`` takes outputs already grouped by partition
        (``grouped``): under at_least_once with the batch producer up. Otherwise outputs
        are items of ``out`` (exactly_once: each joins its input partition's
        transaction).

        Why: a window's results are made by the thousand at once (every key's window
        ends at the same time), between the record that closed the windows and the
        results' hand-over; an item per result and a second pass here to group them
        cost ~0.6 of the ~4-5 µs a result takes (in-process; docs/performance.md,
        "window result latency")."""
        return kafka_io.ready.is_set()

    async def send_later(self, out: list[Output], sources: list[tuple[int, int]],
                         grouped: Sequence[tuple[str, dict[int, list[tuple[bytes, bytes]]]]] = ()) -> None:
        """Send ``out`` without waiting for the broker's acknowledgement (at most
        ``MAX_SENDING`` batches' outputs stay in flight); ``flush`` waits for them.

        ``sources``: (input partition, index of its first output in ``out``), what the
        transactional emitter needs. Why not await them here: a batch would wait a
        broker round trip before the next one starts, and nothing needs them
        acknowledged before the offsets that produced them commit, or before the state
        that closed their windows is written: both come after ``flush``.

        ``grouped``: (topic name, partition -> (key, value) pairs) of outputs without
        headers, made before the items of ``out`` (when ``takes_grouped``): an item of
        ``out`` to the same partition goes after them, as made."""
        by_name = {name: groups for name, groups in grouped if groups}
        if not out and not by_name:
            return
        await self.ready()
        if not kafka_io.ready.is_set() and not by_name:
            futures = await _send_outputs_through_faust(out, sources)
            await asyncio.gather(*futures)
            return
        by_topic: dict[str, list[OutgoingMessage]] = {}
        names: dict[int, list[OutgoingMessage]] = {}
        groups_by_topic: dict[int, tuple[str, dict[int, list[tuple[bytes, bytes]]], KeyPartitioner]] = {}
        last: Any = None  # the topic of the previous output without headers
        groups: dict[int, list[tuple[bytes, bytes]]] = {}
        partition_of: Any = None
        for item in out:
            topic = item[0]
            if len(item) == 3:
                # No headers: (key, value) pairs by the key's partition, as send_batch
                # would place them, without a message object each.
                if topic is not last:
                    slot = groups_by_topic.get(id(topic))
                    if slot is None:
                        name = topic.get_topic_name()
                        slot = groups_by_topic[id(topic)] = (name, by_name.pop(name, {}),
                                                             await self.partitioner(name))
                    last, groups, partition_of = topic, slot[1], slot[2]
                key = item[1]
                p = partition_of(key)
                group = groups.get(p)
                if group is None:
                    group = groups[p] = []
                group.append((key, item[2]))
                continue
            msgs = names.get(id(topic))
            if msgs is None:
                msgs = names[id(topic)] = by_topic.setdefault(topic.get_topic_name(), [])
            msgs.append(OutgoingMessage(item[1], item[2], tuple(item[3]), None, item[4] if len(item) > 4 else None))
        partitioned = [(name, groups) for name, groups, _ in groups_by_topic.values()] + list(by_name.items())
        keys = _SendKeys(partitioned, by_topic)
        keys_of = self._keys_of
        # A send in flight with no keys known (done already, or made elsewhere) counts
        # as sharing one: awaiting it costs nothing once it is done, and raises if it
        # failed, so that nothing of a key is stored after an earlier output that was not.
        earlier = [task for task in self.sending if keys.shared_with(keys_of.get(task))]
        prev_handed = self._last_handed
        handed = self._last_handed = asyncio.get_running_loop().create_future()

        def release(_: Any = None) -> None:
            """This send's hand-over is over (done, failed or cancelled): the next one's
            may start, never before the previous one's."""
            if prev_handed is not None and not prev_handed.done():
                prev_handed.add_done_callback(release)
            elif not handed.done():
                handed.set_result(None)

        async def send() -> None:
            # Handed to the producer in the order made (which the producer keeps per
            # partition), and a key's outputs only once its earlier ones are
            # acknowledged. Why not each send after the previous one's acknowledgement,
            # as before: a window end's partitions close one after another, each with
            # its own keys, and each close's results waited for the one before,
            # 1-5 ms at every window end (docs/performance.md, "Issue 22, session 23").
            # Outputs of different keys reach the broker in another order than made
            # only when a send fails and is sent again (``kafka_io.delivered``).
            acks: list[asyncio.Future] = []
            try:
                # Shielded: this send cancelled (the worker stops) leaves earlier ones be.
                if prev_handed is not None:
                    await asyncio.shield(prev_handed)
                for task in earlier:
                    await asyncio.shield(task)
                for name, groups in partitioned:
                    acks.append(await kafka_io.start_partitioned(name, groups))
                if by_topic:  # outputs with headers: handed over and acknowledged here
                    await kafka_io.send_topics(by_topic)
            except BaseException:
                for ack in acks:  # handed over, but this send failed: no resends for it
                    ack.cancel()
                raise
            finally:
                release()
            await asyncio.gather(*acks)

        task = asyncio.ensure_future(send())
        task.add_done_callback(release)  # cancelled before it ran: ``finally`` never ran
        keys_of[task] = keys
        task.add_done_callback(lambda done: keys_of.pop(done, None))
        self.sending.append(task)
        await self.flush(keep=self.MAX_SENDING)

    def sent_so_far(self) -> Coroutine[Any, Any, None] | None:
        """What completes when every ``send_later`` so far is acknowledged (raises as
        ``flush`` would); sends made after this call are not waited for. None: none."""
        return self._wait_sent(list(self.sending)) if self.sending else None

    async def _wait_sent(self, taken: list[asyncio.Future]) -> None:
        sending = self.sending
        for task in taken:
            await task
            if sending and sending[0] is task:
                sending.pop(0)

    async def flush(self, keep: int = 0) -> None:
        """Wait until every ``send_later`` but the newest ``keep`` is acknowledged.

        A failed send raises here and stays in the list: every later flush (and so
        every later commit) fails too, until the worker restarts and replays."""
        sending = self.sending
        while len(sending) > keep:
            task = sending[0]
            await task
            if sending and sending[0] is task:
                sending.pop(0)

    def writer(self, sink: Any) -> OutputWriter:
        """A per-batch writer of one sink topic (see ``OutputWriter``)."""
        return OutputWriter(sink)

    async def dead_letter(self, key: bytes | None, value: bytes | None, **why: Any) -> None:
        """One refused record to the dead-letter topic (``app.dead_letter``: through
        Faust's producer, so under exactly_once in the transaction of ``partition``)."""
        await send_dead_letter(key, value, **why)

    async def tick(self, topic: Any, partition: int, headers: list[tuple[str, bytes]]) -> None:
        """A wake-up record (``value`` empty) into ``partition`` of ``topic``: input, not an
        output of processed records."""
        await topic.send(key=None, value=b"", partition=partition, headers=headers)


class _SendKeys:
    """The keys of one send's outputs by topic name (None: keyless ones), collected
    only when a later send made while it is in flight asks (most sends find none in
    flight)."""

    __slots__ = ("_partitioned", "_by_topic", "_keys")

    def __init__(self, partitioned: list[tuple[str, dict[int, list[tuple[bytes, bytes]]]]],
                 by_topic: dict[str, list[OutgoingMessage]]) -> None:
        self._partitioned, self._by_topic = partitioned, by_topic
        self._keys: dict[str, set[bytes | None]] | None = None

    def keys(self) -> dict[str, set[bytes | None]]:
        if self._keys is None:
            keys: dict[str, set[bytes | None]] = {}
            for name, groups in self._partitioned:
                into = keys.setdefault(name, set())
                for pairs in groups.values():
                    into.update([key for key, _ in pairs])
            for name, messages in self._by_topic.items():
                keys.setdefault(name, set()).update([m.key for m in messages])
            self._keys, self._partitioned, self._by_topic = keys, [], {}
        return self._keys

    def shared_with(self, earlier: _SendKeys | None) -> bool:
        """Whether a send in flight (its keys; None: not known) shares a key with this one."""
        if earlier is None:
            return True
        those_by_name = earlier.keys()
        for name, these in self.keys().items():
            those = those_by_name.get(name)
            if those is not None and not these.isdisjoint(those):
                return True
        return False


class TransactionalEmitter(Emitter):
    """exactly_once: outputs through Faust's transactional producer, each in the
    transaction of the input partition it comes from (the one committing that input's
    offsets), even when its key puts it in a partition of another number:
    app/transport.py, TransactionManager."""

    transactional = True

    def batches_changelog(self) -> bool:
        return False

    async def ready(self) -> None:
        pass

    async def table_writes_done(self) -> None:
        # Faust's table writes only enter its producer buffer (send_soon), and its
        # transactional commit does not flush that buffer (its at_least_once commit
        # does): a commit right after this batch could commit its offsets while these
        # writes went into the *next* transaction, which a kill -9 aborts (found by the
        # windows' exactly_once kill test; docs/windows.md). Handed over here, inside
        # the batch, they join this batch's transaction.
        await table_writes_handed_over(app)

    async def send(self, topic: Any, items: Sequence[tuple[int | None, bytes | None, bytes,
                                                            Sequence[tuple[str, bytes]], int | None]],
                   *, in_order: bool = False) -> None:
        # In order anyway: a transaction's records are stored, or aborted, together.
        await _send_through_faust(topic, items)

    def takes_grouped(self) -> bool:
        return False  # every output goes into its input partition's transaction, via Faust

    async def send_later(self, out: list[Output], sources: list[tuple[int, int]],
                         grouped: Sequence[tuple[str, dict[int, list[tuple[bytes, bytes]]]]] = ()) -> None:
        futures = await _send_outputs_through_faust(out, sources)
        if futures:
            await asyncio.gather(*futures)

    def writer(self, sink: Any) -> OutputWriter:
        return TransactionalWriter(sink)

    async def tick(self, topic: Any, partition: int, headers: list[tuple[str, bytes]]) -> None:
        # Not through the topic: the TransactionManager would put it into the transaction
        # of ``partition``, which nothing commits while the partition is idle
        # (read_committed never saw the tick, and the open transaction timed out and
        # fenced the producer). A plain send, visible at once.
        await app.producer.send(topic.get_topic_name(), None, b"", partition, None, headers)


async def _send_through_faust(topic: Any, items: Iterable[tuple[Any, ...]]) -> None:
    for source_partition, key, value, headers, partition in items:
        with from_partition(source_partition):
            await topic.send(key=key, value=value, partition=partition, headers=list(headers) or None)


async def _send_outputs_through_faust(out: list[Output], sources: list[tuple[int, int]] | None) -> list[Any]:
    """Each output inside ``from_partition`` of the input partition it comes from
    (``sources``: (partition, index of its first output)); returns the send futures."""
    futures = []
    bounds = [*(sources or [(None, 0)]), (None, len(out))]
    for (p, start), (_, end) in zip(bounds, bounds[1:], strict=False):
        with from_partition(p):
            for topic, key, value, *rest in out[start:end]:
                headers = rest[0] if rest else None
                if len(rest) > 1 and rest[1] is not None:
                    futures.append(await topic.send(key=key, value=value, headers=headers or None,
                                                    timestamp=rest[1] / 1000.0))
                else:
                    futures.append(await topic.send(key=key, value=value, headers=headers))
    return futures


class OutputWriter:
    """One sink's outputs, one batch at a time, each to its key's partition (keyless
    ones share one partition per batch, like Kafka's sticky partitioner).

    at_least_once: each output is encoded straight into its partition's record batch
    (``kafka_io.record_batches``), and a batch's outputs go out together: Faust's
    per-message send path costs more than the whole transformation."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.name = sink, sink.get_topic_name()
        self.partition_of: KeyPartitioner | None = None
        self.batches: RecordBatches | None = None
        self.count = 0
        self._keyless = 0

    async def begin_batch(self) -> None:
        count = await kafka_io.partition_count(self.name) or settings.topic_partitions
        if self.partition_of is None or self.partition_of.num_partitions != count:
            self.partition_of = KeyPartitioner(count)
        self._keyless = (self._keyless + 1) % count
        self.count = 0
        self._begin()

    def _begin(self) -> None:
        self.batches = kafka_io.record_batches()  # a failed batch's records are dropped

    def enter_partition(self, event: Any) -> None:
        """The next outputs come from records of ``event``'s partition."""

    def add(self, event: Any, key: bytes | None, record: dict[str, Any]) -> None:
        """Encode ``record`` to the sink, in ``key``'s partition."""
        self.count += 1
        partition = self._keyless if key is None else self.partition_of(key)  # type: ignore[misc]
        self.batches.add(partition, key, orjson.dumps(record))  # type: ignore[union-attr]

    async def send(self) -> Awaitable[Any] | None:
        """Send the batch's outputs; returns what completes when the broker acknowledged
        them (None: nothing to wait for). ``count`` keeps this batch's outputs until
        ``begin_batch``."""
        batches, self.batches = self.batches, None
        if batches is None or not batches.count:
            return None
        return await batches.start(self.name)


class TransactionalWriter(OutputWriter):
    """exactly_once: every output through Faust into the transaction of the input
    partition it came from (``from_partition``)."""

    def __init__(self, sink: Any) -> None:
        super().__init__(sink)
        #: (input partition, output partition, key, value) per output.
        self.transactional: list[tuple[int, int, bytes | None, bytes]] = []

    def _begin(self) -> None:
        self.transactional = []

    def enter_partition(self, event: Any) -> None:
        # Faust's current event picks the changelog partition and transaction of table
        # writes made through its API.
        from tables.store import set_current_event

        set_current_event(event)

    def add(self, event: Any, key: bytes | None, record: dict[str, Any]) -> None:
        self.count += 1
        partition = self._keyless if key is None else self.partition_of(key)  # type: ignore[misc]
        # Held until sent: dumps_held.
        self.transactional.append((event.message.partition, partition, key, dumps_held(record)))

    async def send(self) -> Awaitable[Any] | None:
        outputs, self.transactional = self.transactional, []
        for source_partition, partition, key, value in outputs:
            with from_partition(source_partition):
                await self.sink.send(key=key, value=value, partition=partition)
        return None  # the transaction commits them


class MemoryEmitter(Emitter):
    """The in-memory twin of the emitter, for tests and the processor harness: every
    output is kept in ``sent`` as (topic, key, value, headers, source partition), dead
    letters in ``dead`` as (key, value, why), ticks in ``ticks``; nothing is in flight.
    ``transactional``: behave as under exactly_once (state written per batch)."""

    def __init__(self, transactional: bool = False) -> None:
        super().__init__()
        self.transactional = transactional
        self.sent: list[tuple[Any, bytes | None, bytes, tuple, int | None]] = []
        self.dead: list[tuple[bytes | None, bytes | None, dict[str, Any]]] = []
        self.ticks: list[tuple[Any, int]] = []

    def batches_changelog(self) -> bool:
        return False

    async def ready(self) -> None:
        pass

    async def send(self, topic: Any, items: Sequence[tuple[Any, ...]], *, in_order: bool = False) -> None:
        for source_partition, key, value, headers, _partition in items:
            self.sent.append((topic, key, value, tuple(headers), source_partition))

    def takes_grouped(self) -> bool:
        return False  # outputs are kept as items (``sent``)

    async def send_later(self, out: list[Output], sources: list[tuple[int, int]],
                         grouped: Sequence[tuple[str, dict[int, list[tuple[bytes, bytes]]]]] = ()) -> None:
        bounds = [*(sources or [(None, 0)]), (None, len(out))]
        for (p, start), (_, end) in zip(bounds, bounds[1:], strict=False):
            for item in out[start:end]:
                self.sent.append((item[0], item[1], item[2], tuple(item[3]) if len(item) > 3 else (), p))

    def writer(self, sink: Any) -> OutputWriter:
        return MemoryWriter(sink, self)

    async def dead_letter(self, key: bytes | None, value: bytes | None, **why: Any) -> None:
        self.dead.append((key, value, why))

    async def tick(self, topic: Any, partition: int, headers: list[tuple[str, bytes]]) -> None:
        self.ticks.append((topic, partition))


class MemoryWriter(OutputWriter):
    """``OutputWriter`` into a ``MemoryEmitter`` (the value as its decoded record)."""

    def __init__(self, sink: Any, into: MemoryEmitter) -> None:
        self.sink, self.name, self.into, self.count = sink, getattr(sink, "name", str(sink)), into, 0

    async def begin_batch(self) -> None:
        self.count = 0

    def add(self, event: Any, key: bytes | None, record: dict[str, Any]) -> None:
        self.count += 1
        self.into.sent.append((self.sink, key, orjson.dumps(record), (), event.message.partition))

    async def send(self) -> Awaitable[Any] | None:
        return None


#: The one output path of this worker.
emitter: Emitter = TransactionalEmitter() if EXACTLY_ONCE else Emitter()


class CommitProtocol:
    """The registered state caches and the one ordered sequence that makes them durable
    before offsets commit (module docstring).

    ``emitter``: the output path whose sends a commit waits for. ``defer``: whether
    state may wait for the commit (None: decided from the emitter and the consumer,
    ``defers``). ``guard``: where ``before_commit`` is hooked (app/transport.py's
    ``commit_guard``; None for a protocol of its own, as tests and the harness use)."""

    def __init__(self, emitter: Emitter, defer: bool | None = None, guard: Any = None) -> None:
        self.emitter = emitter
        self.caches: list[Flushable] = []
        self._defer = defer
        self._guard = guard

    def register(self, cache: Any) -> Any:
        """Make ``cache`` part of every commit; returns it."""
        if cache not in self.caches:
            self.caches.append(cache)
        return cache

    def defers(self) -> bool:
        """True when dirty state may stay in memory across batches until the next commit:
        under at_least_once with this project's consumer, whose commits run
        ``before_commit`` first. Under exactly_once state is written inside each batch's
        transaction."""
        if self._defer is not None:
            return self._defer
        return not self.emitter.transactional and isinstance(app.consumer, FastConsumer)

    def arm(self) -> None:
        """Hook ``begin_commit`` into the consumer's commits (once). Called with the
        first state left unwritten (before that batch is acked, so before any commit
        could cover it), not at start: with a hook, every commit of the worker waits for
        the batch in hand, which a worker with nothing stateful should not pay."""
        guard = self._guard
        if guard is not None and self.begin_commit not in guard.before_commit:
            guard.before_commit.append(self.begin_commit)

    async def end_batch(self, *caches: Any) -> None:
        """A batch's state changes are in ``caches``: write them now unless they may wait
        for the commit (``defers``), or when one holds too many unwritten values."""
        if not self.defers():
            await self.emitter.flush()
            for cache in caches:
                await cache.flush()
            return
        self.arm()
        for cache in caches:
            if cache.over_dirty_limit():
                await self.emitter.flush()  # outputs before the state that follows them
                await cache.flush()

    async def before_commit(self) -> None:
        """Outputs acknowledged, then every cache flushed (changelog, then RocksDB); the
        caller commits the offsets (or the transaction) after this returns. A step that
        raises stops the commit: its offsets stay uncommitted."""
        rest = await self.begin_commit()
        if rest is not None:
            await rest

    #: Values encoded per section of a commit's snapshot (``begin_commit``): about a
    #: millisecond that batches wait (~11 µs a pattern state), instead of the encoding
    #: of every changed key at once...
    ENCODE_PART = 100
    #: ...but in at most this many sections: one runs between two batches, so a commit
    #: lasts as many batches as it has sections, and an overloaded worker's batches
    #: grow long (measured at load 7: 250 ms each; 90 sections would be 22 s).
    ENCODE_PARTS_MAX = 32

    def _part_size(self, snapshot: Any) -> int:
        return max(self.ENCODE_PART, -(-len(snapshot.taken) // self.ENCODE_PARTS_MAX))

    async def begin_commit(self) -> Awaitable[None] | None:
        """The part of a commit no batch may run during, run between two processing
        sections with the offsets to commit taken at the same point: every cache's
        unwritten values taken (``WriteBackCache.snapshot``; a cache without
        ``snapshot`` is flushed here, after the outputs), and encoded if they are one
        part. Returns the rest, which lets batches run between its steps: the parts
        encoded, each between two batches (``_part_size`` values; a value changed
        meanwhile is encoded as it is then, and not again by the next commit); the
        sends made until the last part acknowledged (so a window's result is before the
        state that dropped it); the values written, each cache in turn. The caller
        commits the offsets after it returned, and not if it raised. None: nothing left.

        So the state written covers at least the batches the offsets end with, maybe a
        few more: a replay after a crash meets state that already holds some of its
        records, which windows and patterns skip (each key's state keeps the last offset
        applied per source partition), as after a crash between a flush and its offset
        commit; a join may buffer such a record twice (docs/delivery.md AV). The
        bookkeeping values (``put_side``) are written as they were at that point."""
        snapshots: list[Any] = []
        try:
            for cache in self.caches:
                snapshot = getattr(cache, "snapshot", None)
                if snapshot is None:
                    await self.emitter.flush()  # outputs before the state that follows them
                    await cache.flush()
                    continue
                taken = await snapshot()
                if taken is not None:
                    snapshots.append(taken)
            if not snapshots:
                return self.emitter.sent_so_far()
            # A snapshot of one part is encoded here; a larger one only between batches:
            # with its first part in this section, the section held the loop 11-14 ms
            # at each commit of the pattern benchmark (issue 22).
            first = snapshots[0]
            done = len(first.taken) <= self._part_size(first) and first.encode_some(self._part_size(first))
        except BaseException:
            for taken in snapshots:
                taken.abandon()
            raise
        sent = self.emitter.sent_so_far() if done and len(snapshots) == 1 else None
        return self._write_snapshot(snapshots, done, sent)

    async def _write_snapshot(self, snapshots: list[Any], done: bool, sent: Any) -> None:
        written = 0
        try:
            last = len(snapshots) - 1
            for i, taken in enumerate(snapshots):
                part, took = self._part_size(taken), 0.0
                while not done:
                    await self._batches_first(took)
                    async with self._between_batches():
                        t0 = time.perf_counter()
                        done = taken.encode_some(part)
                        if done and i == last:
                            # The sends made before the last part was encoded.
                            sent = self.emitter.sent_so_far()
                        took = time.perf_counter() - t0
                    if taken.filled():
                        # The changelog batches this part filled go out now, each built
                        # on its own (``RecordBatches.send_full``), after the outputs
                        # sent so far: never a state that dropped a window before the
                        # result that reports it.
                        outputs = self.emitter.sent_so_far()
                        if outputs is not None:
                            await outputs
                        await taken.send_full()
                done = False
            if sent is not None:
                sent, waiting = None, sent
                await waiting
            for taken in snapshots:
                written += 1
                # Its RocksDB write batches (~4 ms each for 1,000 pattern states) with
                # the same gaps as the parts: one loop turn between them let no batch in.
                await taken.write(self._batches_first)
        except BaseException:
            if sent is not None:
                sent.close()
            for taken in snapshots[written:]:
                taken.abandon()
            raise

    #: The least time the event loop gets between two parts of a commit (seconds).
    PART_GAP = 0.001

    async def _batches_first(self, took: float) -> None:
        """Before the next part of a commit: the event loop for as long as the previous
        part took (at least ``PART_GAP``), then the batches that wait for a section.

        Why: a batch asks for its section only after its fetch went through several
        loop turns (the response, ``freshen``'s short fetches). A commit that found no
        batch waiting and went on at once encoded every part in one go, and the loop
        (fetches, batches, the web server) stalled that long: ~100 ms at each commit of
        the pattern benchmark (issue 22; docs/delivery.md, AE). One turn between parts
        was not enough either: each of the fetch's turns let another part run first.
        So while it encodes, a commit takes at most about half of the loop's time, and
        a batch that gets ready meanwhile waits for one part at most."""
        await asyncio.sleep(max(took, self.PART_GAP))
        if self._guard is not None:
            await self._guard.let_waiting_in()  # a batch waiting goes first

    def _between_batches(self) -> Any:
        """A section no batch runs during (the guard's commit section)."""
        return self._guard.committing() if self._guard is not None else contextlib.nullcontext()

    async def partitions_moved(self, *args: Any, **kwargs: Any) -> None:
        """On revoke and assign: whatever is unwritten reaches the changelog before
        another worker restores these partitions from it; then every cache forgets
        (partitions moved: another worker may change that state). A cache that failed
        has nothing left to write (its batch replays after a restart).

        Not after this worker's group session lapsed (a paused worker, woken): other
        workers have written these partitions since, and what it holds unwritten belongs
        to offsets it never committed, so it is dropped, not written over their state
        (docs/delivery.md, P)."""
        if self._guard is not None and self._guard.session_lapsed():
            for cache in self.caches:
                cache.drop_unflushed()
                cache.moved()
            return
        if any(not cache.failed and cache.pending() for cache in self.caches):
            await self.emitter.flush()
        for cache in self.caches:
            if not cache.failed:
                await cache.flush()
            cache.moved()


class PartitionLost(Exception):
    """This worker can no longer write the partition's state (fenced by its new owner,
    or the transaction failed): nothing of the write was applied."""


class OwnerStateWriter:
    """How state applied outside the consumer's batches (``POST /api/v1/aggregate``,
    applied on the partition's owner when its request arrives) becomes durable, under
    at_least_once: the changelog records acknowledged, then RocksDB (``write_partitions``).
    No transaction to wait for, no producer per partition."""

    #: Whether ``acquire``/``release`` must follow the assignment (``on_assignment``).
    needs_assignments = False

    def __init__(self, store: Any) -> None:
        self.store = store

    async def write(self, partition: int, items: list[tuple[bytes, Any]]) -> None:
        await self.store.write_partitions([(partition, key, value) for key, value in items])

    def partitions(self) -> set[int]:
        return set()

    async def acquire(self, partitions: set[int]) -> None:
        """Partitions now owned here (only the transactional writer holds anything)."""

    async def release(self, partition: int) -> None:
        """A partition no longer owned here."""

    async def stop(self) -> None:
        """The worker stops."""


class TransactionalOwnerStateWriter(OwnerStateWriter):
    """exactly_once: one transactional producer per owned partition
    (``{app id}-{table}-{partition}``), registered when the partition is assigned, so
    the previous owner is fenced before this one writes; a write is applied only once
    its transaction committed, then written to RocksDB as Faust's restore would
    (docs/delivery.md, R)."""

    needs_assignments = True

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.producers: dict[int, Any] = {}

    @property
    def changelog(self) -> str:
        return self.store.table.changelog_topic.get_topic_name()

    async def write(self, partition: int, items: list[tuple[bytes, Any]]) -> None:
        producer = self.producers.get(partition)
        if producer is None:
            raise PartitionLost(partition)
        raws = [(key, orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)) for key, value in items]
        try:
            async with producer.transaction():
                sent = [await producer.send(self.changelog, value=raw, key=key, partition=partition)
                        for key, raw in raws]
                offset = max([(await s).offset for s in sent])
        except KafkaError as exc:  # fenced by a new owner, or the broker failed it
            log.warning("the changelog transaction of %s partition %d failed (%r); not applied",
                        self.changelog, partition, exc)
            raise PartitionLost(partition) from exc
        # Committed: now the local store, as Faust's own restore would write it.
        table = self.store.table
        with as_current_event(self.store.at(partition)):
            for key, raw in raws:
                table.data[key] = raw
        table.data.set_persisted_offset(TP(self.changelog, partition), offset)

    def partitions(self) -> set[int]:
        return set(self.producers)

    async def acquire(self, partitions: set[int]) -> None:
        for partition in sorted(partitions - set(self.producers)):
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap_servers,
                transactional_id=f"{settings.app_id}-{self.store.table.name}-{partition}",
                acks="all", enable_idempotence=True, linger_ms=0, **client_options(settings),
            )
            await producer.start()
            # begin_transaction waits for the producer id (InitProducerId): the fence.
            await producer.begin_transaction()
            await producer.abort_transaction()
            self.producers[partition] = producer

    async def release(self, partition: int) -> None:
        producer = self.producers.pop(partition, None)
        if producer is not None:
            await producer.stop()

    async def stop(self) -> None:
        for partition in list(self.producers):
            await self.release(partition)


def owner_state_writer(store: Any) -> OwnerStateWriter:
    """The state writer of an owner-applied table, chosen from the guarantee."""
    return TransactionalOwnerStateWriter(store) if EXACTLY_ONCE else OwnerStateWriter(store)


def on_assignment(hook: Any) -> None:
    """Run ``hook(assigned)`` at each assignment, before table recovery starts (the
    transport's ``ASSIGNMENT_HOOKS``)."""
    ASSIGNMENT_HOOKS.append(hook)


#: The one commit protocol of this worker process.
commit_protocol = CommitProtocol(emitter, guard=commit_guard)
app.on_partitions_revoked.connect(commit_protocol.partitions_moved)
app.on_partitions_assigned.connect(commit_protocol.partitions_moved)

__all__ = ["EXACTLY_ONCE", "exactly_once", "CommitProtocol", "OwnerStateWriter", "PartitionLost",
           "TransactionalOwnerStateWriter", "on_assignment", "owner_state_writer", "Emitter", "MemoryEmitter", "MemoryWriter", "OutputWriter", "TransactionalEmitter",
           "TransactionalWriter", "commit_protocol", "emitter"]
