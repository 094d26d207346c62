"""Direct Kafka I/O the app owns besides Faust's own consumer: topic creation and the
batch producer behind ``POST /api/v1/produce``.

The HTTP produce path builds one record batch per partition and sends them all before
awaiting any acknowledgement (pipelined), instead of one ``send()`` call and one
future per message. Partitions for keyed messages come from Kafka's murmur2 partitioner
so keys land where a Java client (and every co-partitioned table) expects them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from aiokafka.partitioner import murmur2
from mode import Service

from app import app, settings
from app.kafka_security import client_options
from app.topics import DECLARED, TopicSpec
from app.transport import (
    append_record,
    batch_records,
    finished,
    record_appender,
    refresh_topic_metadata,
    reset_producer_id,
)

log = logging.getLogger(__name__)

#: Largest record batch we build; below the broker's default message.max.bytes (1 MiB).
MAX_BATCH_BYTES = 900 * 1024

#: How long record batches that failed with a retriable error are sent again before
#: their failure is final (Kafka's producer default ``delivery.timeout.ms``: 120 s).
#: aiokafka gives a batch up once it waited its ``request_timeout_ms`` (40 s) without a
#: known leader, which a broker restart can outlast (docs/delivery.md, W).
SEND_RETRY_SECONDS = 120.0
#: The first wait before sending again, doubled up to ``SEND_RETRY_MAX_BACKOFF``.
SEND_RETRY_BACKOFF = 0.1
SEND_RETRY_MAX_BACKOFF = 5.0


class OutgoingMessage(NamedTuple):
    """One message ready for Kafka: bytes in, bytes out.

    A NamedTuple: agents build one per output record, and a frozen dataclass costs
    ~1 µs to build where a tuple costs ~0.3 µs."""

    key: bytes | None
    value: bytes | None  # None is a tombstone (deletes the key of a compacted topic)
    headers: Sequence[tuple[str, bytes]] = ()
    #: An explicit partition; None = by key (murmur2), or sticky when keyless.
    partition: int | None = None
    #: The record's timestamp (epoch ms); None: the producer's clock.
    timestamp_ms: int | None = None


class Delivered(NamedTuple):
    """Where the broker stored one message."""

    partition: int
    offset: int


def partition_for(key: bytes | None, num_partitions: int, fallback: int) -> int:
    """Kafka's default partitioner: murmur2 of the key, or ``fallback`` without a key."""
    if key is None:
        return fallback % num_partitions
    return (_murmur2(key) & 0x7FFFFFFF) % num_partitions


#: murmur2 is pure Python here (~3.6 µs a key); stream keys (users, devices) repeat.
_murmur2 = functools.lru_cache(maxsize=65_536)(murmur2)


class KeyPartitioner:
    """``partition_for`` of keyed messages for one partition count, remembered per key.

    Why: an agent's sink partitions every output by key; a dict lookup costs ~40 ns
    where the lru-cached murmur2 call costs ~200 ns. Bounded: cleared when it grows
    past ``max_keys`` (a key space that large just recomputes)."""

    def __init__(self, num_partitions: int, max_keys: int = 200_000) -> None:
        self.num_partitions, self.max_keys = num_partitions, max_keys
        self._known: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        partition = self._known.get(key)
        if partition is None:
            if len(self._known) >= self.max_keys:
                self._known.clear()
            partition = self._known[key] = (murmur2(key) & 0x7FFFFFFF) % self.num_partitions
        return partition


async def ensure_topics(admin: AIOKafkaAdminClient, specs: Iterable[TopicSpec]) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    new = [
        NewTopic(
            s.name,
            s.partitions,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact"} if s.compacted else {},
        )
        for s in specs
    ]
    if not new:
        return
    existing = set(await admin.list_topics())
    missing = [t for t in new if t.name not in existing]
    if not missing:
        return
    try:
        resp = await admin.create_topics(missing)
    except TopicAlreadyExistsError:
        return
    for name, code, *_ in getattr(resp, "topic_errors", []) or []:
        # 36 = TOPIC_ALREADY_EXISTS: another worker won the race.
        if code not in (0, 36):
            raise RuntimeError(f"could not create topic {name}: error code {code}")


class KafkaIO(Service):
    """Owns an admin client and a batch producer (acks=all) for the web API."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.producer: AIOKafkaProducer | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self._known_topics: dict[str, int] = {}
        self._round_robin = itertools.count()
        self.ready = asyncio.Event()

    async def on_start(self) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                                         **client_options(settings))
        await self.admin.start()
        await ensure_topics(self.admin, DECLARED.values())
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            # Every hot-path send hands over whole record batches (send_batch /
            # send_partitioned), which linger would only delay: measured 2 ms of the
            # ~5 ms each sink and changelog send of a pipeline batch took.
            linger_ms=0,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=4 * 1024 * 1024,
            **client_options(settings),
        )
        await self.producer.start()
        self.ready.set()

    async def on_stop(self) -> None:
        self.ready.clear()
        if self.producer is not None:
            await self.producer.stop()
        if self.admin is not None:
            await self.admin.close()

    async def partition_count(self, topic: str) -> int | None:
        """Partitions of ``topic``, or None when the broker does not know it."""
        count = self._known_topics.get(topic)
        if count:
            return count
        assert self.producer is not None
        client = self.producer.client
        await client.force_metadata_update()
        parts = client.cluster.partitions_for_topic(topic)
        if not parts:
            # Our client only asks for topics it already knows; ask for this one.
            await refresh_topic_metadata(client, topic)
            parts = client.cluster.partitions_for_topic(topic)
        if parts:
            self._known_topics[topic] = len(parts)
            return len(parts)
        return None

    async def create_topic(self, topic: str) -> int:
        """Create ``topic`` with the configured partition count (auto-creation)."""
        assert self.admin is not None
        spec = TopicSpec(topic, settings.topic_partitions)
        await ensure_topics(self.admin, [spec])
        for _ in range(50):
            count = await self.partition_count(topic)
            if count:
                return count
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} was created but its metadata never arrived")

    async def send_topics(self, by_topic: dict[str, list[OutgoingMessage]], *, in_order: bool = False) -> None:
        """``send_batch`` to several topics at once (each with its own partition count);
        returns when the broker acknowledged every message."""
        sends = []
        for name, messages in by_topic.items():
            partitions = await self.partition_count(name) or settings.topic_partitions
            sends.append(self.send_batch(name, messages, partitions, in_order=in_order))
        await asyncio.gather(*sends)

    async def send_partitioned(
        self, topic: str, groups: dict[int, list[tuple[bytes | None, bytes | None]]]
    ) -> dict[int, int]:
        """Send (key, value) pairs already grouped by partition, pipelined, without
        headers; return the offset of the last record stored in each partition.

        The hot path of agents' sinks and changelogs: no per-message objects (building
        an ``OutgoingMessage`` and a ``Delivered`` per record cost more than the send).
        Returns only after the broker acknowledged all of them (acks=all)."""
        return await (await self.start_partitioned(topic, groups))

    async def start_partitioned(
        self, topic: str, groups: dict[int, list[tuple[bytes | None, bytes | None]]]
    ) -> asyncio.Future[dict[int, int]]:
        """``send_partitioned`` in two halves: returns once the records are handed to the
        producer (in order, behind earlier sends), with a future of what
        ``send_partitioned`` returns, done when the broker acknowledged all of them.

        Why: a batch agent can then handle its next batch while the broker acks this
        one's outputs (``Batch.finish_later``)."""
        batches = self.record_batches()
        for partition, records in groups.items():
            batches.add_all(partition, records)
        return await batches.start(topic)

    def record_batches(self) -> RecordBatches:
        """Record batches to fill as records are made, then ``start``."""
        assert self.producer is not None
        return RecordBatches(self.producer)

    async def send_batch(
        self, topic: str, messages: Sequence[OutgoingMessage], num_partitions: int, *, in_order: bool = False
    ) -> list[Delivered]:
        """Send every message, pipelined, and return where each one was stored.

        Returns only after the broker acknowledged all of them (acks=all); raises if any
        batch failed, so the caller never reports a message as stored that is not.

        ``in_order``: each partition's messages are stored in the order given, resends
        included: its next record batch is handed over only once the one before is
        acknowledged. Without it, a batch that failed is sent again after a later one
        of its partition may have been stored (``delivered``: a key's newest value
        still ends last). Readers that skip a record whose source offset is not past
        the last one they applied (the re-key topics of windows and joins) lose the
        earlier batch's copy then (docs/delivery.md, AQ).
        """
        # Keyless messages go to one partition per request (like Kafka's sticky
        # partitioner) so a request makes few, full batches.
        sticky = next(self._round_robin)
        indexes: dict[int, list[int]] = {}
        for index, message in enumerate(messages):
            p = message.partition
            if p is None:
                p = partition_for(message.key, num_partitions, sticky)
            indexes.setdefault(p, []).append(index)
        groups = {p: [messages[i] for i in positions] for p, positions in indexes.items()}
        if in_order:
            sent = iter(await self._delivered_in_order(topic, groups))
        else:
            sent = iter(await delivered(producer_of(self), topic, await self._append_record_batches(topic, groups)))

        results: list[Delivered | None] = [None] * len(messages)
        for positions in indexes.values():  # record batches come partition by partition
            done = 0
            while done < len(positions):
                meta, count = next(sent)
                for relative in range(count):
                    results[positions[done + relative]] = Delivered(meta.partition, meta.offset + relative)
                done += count
        return results  # type: ignore[return-value]

    async def _delivered_in_order(
        self, topic: str, groups: dict[int, Sequence[OutgoingMessage]]
    ) -> list[tuple[Any, int]]:
        """``delivered`` for ``send_batch(in_order=True)``: one record batch of each
        partition in flight at a time; (metadata, count) partition by partition."""
        producer = producer_of(self)
        done: dict[int, list[tuple[Any, int]]] = {p: [] for p in groups}
        sent_so_far = dict.fromkeys(groups, 0)
        left = groups
        while left:
            handed = await self._append_record_batches(topic, left, first_only=True)
            for one, result in zip(handed, await delivered(producer, topic, handed), strict=True):
                done[one.partition].append(result)
                sent_so_far[one.partition] += one.count
            left = {p: groups[p][n:] for p, n in sent_so_far.items() if n < len(groups[p])}
        return [result for results in done.values() for result in results]

    async def _append_record_batches(
        self, topic: str, groups: dict[int, Sequence[OutgoingMessage]], *, first_only: bool = False
    ) -> list[SentBatch]:
        """Append each partition's messages, with their headers, to record batches and
        hand them to the producer, partition by partition in the order given; return
        them as ``SentBatch``es. ``first_only``: one record batch per partition, as
        many of its messages as it takes. (Records without headers, made one by one,
        take ``RecordBatches``.)"""
        assert self.producer is not None
        producer = self.producer
        pending: list[SentBatch] = []
        try:
            return await self._hand_over_groups(producer, topic, groups, pending, first_only)
        except BaseException:
            abandon(pending)
            raise

    @staticmethod
    async def _hand_over_groups(producer: Any, topic: str, groups: dict[int, Sequence[OutgoingMessage]],
                                pending: list[SentBatch], first_only: bool) -> list[SentBatch]:
        for partition, records in groups.items():
            batch, count = producer.create_batch(), 0
            for record in records:
                # aiokafka's (C) builder wants a list; most records have no headers.
                headers = list(record.headers) if record.headers else NO_HEADERS
                if not append_record(batch, count, record.key, record.value, headers, record.timestamp_ms):
                    # Full: send it and start the next, which always takes its first
                    # record (as in ``RecordBatches.add``).
                    pending.append(await hand_over(producer, topic, partition, finished(batch, count), count))
                    if first_only:
                        count = 0
                        break
                    batch, count = producer.create_batch(), 0
                    append_record(batch, count, record.key, record.value, headers, record.timestamp_ms)
                count += 1
            if count:
                pending.append(await hand_over(producer, topic, partition, finished(batch, count), count))
        return pending


#: The headers of a record without any (aiokafka's builder reads, never keeps, the list).
NO_HEADERS: list = []


class RecordBatches:
    """Records for one topic appended to per-partition record batches as they are made,
    then handed to the producer together (``start``); nothing is held per record.

    Why: the sinks and changelogs used to collect (key, value) pairs per partition and
    append them in a second loop, which held every encoded value until then (a bytes
    object, a tuple, a list slot): 3.9 against 2.6 µs a record (encode and append,
    measured), and a long-held orjson output needs a copy (``app.codec.dumps_held``)
    or takes a fresh page. Appended at once, the encoded value is freed right away.
    """

    __slots__ = ("producer", "_open", "_full", "_sent", "count")

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        #: partition -> [open batch, its record count, its record builder's append]
        self._open: dict[int, list[Any]] = {}
        #: (partition, closed batch, record count), in the order they filled up.
        self._full: list[tuple[int, Any, int]] = []
        #: Full batches handed over already (``send_full``).
        self._sent: list[SentBatch] = []
        self.count = 0

    def add(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """Append one record to ``partition``'s open batch (a new one when it is full)."""
        slot = self._open.get(partition)
        if slot is None:
            batch = self.producer.create_batch()
            slot = self._open[partition] = [batch, 0, record_appender(batch)]
        if slot[2](slot[1], None, key, value, NO_HEADERS) is None:  # append_record, inlined
            # Full: queue it and start the next, which always takes its first record
            # (aiokafka's builder; the broker judges a record too large for a batch).
            self._full.append((partition, finished(slot[0], slot[1]), slot[1]))
            slot[0], slot[1] = self.producer.create_batch(), 0
            slot[2] = record_appender(slot[0])
            append_record(slot[0], 0, key, value, NO_HEADERS)
        slot[1] += 1
        self.count += 1

    def add_all(self, partition: int, records: Iterable[tuple[bytes | None, bytes | None]]) -> None:
        """``add`` each (key, value) of ``records`` to ``partition``, in order: one call
        for a partition's records made together (a window end makes thousands at once),
        with the open batch held in locals instead of looked up per record."""
        slot = self._open.get(partition)
        if slot is None:
            batch = self.producer.create_batch()
            slot = self._open[partition] = [batch, 0, record_appender(batch)]
        batch, n, append = slot
        before = n  # records of the open batch before this call
        for key, value in records:
            if append(n, None, key, value, NO_HEADERS) is None:
                # Full: as in ``add``.
                self._full.append((partition, finished(batch, n), n))
                before -= n
                batch, n = self.producer.create_batch(), 0
                append = record_appender(batch)
                append_record(batch, 0, key, value, NO_HEADERS)
            n += 1
        slot[0], slot[1], slot[2] = batch, n, append
        self.count += n - before

    def filled(self) -> bool:
        """Whether a batch filled up since the last ``send_full``/``start``."""
        return bool(self._full)

    async def send_full(self, topic: str) -> None:
        """Hand the batches that filled up so far to the producer now; ``start`` hands
        over the rest and awaits them all.

        Why: a commit's snapshot fills ~10 batches (9 MB of pattern states), and handed
        over together the producer's sender built and sent them in one step of the
        event loop (~12 ms, every commit; issue 22). Handed over as they fill, between
        the snapshot's parts, each is built on its own."""
        full, self._full = self._full, []
        for p, batch, n in full:
            self._sent.append(await hand_over(self.producer, topic, p, batch, n))

    async def start(self, topic: str) -> asyncio.Future[dict[int, int]]:
        """Hand every batch to the producer, each partition's in order; returns a future
        of the last offset stored in each partition, done once the broker acknowledged
        them all, including those of ``send_full`` (what ``KafkaIO.start_partitioned``
        returns)."""
        batches = self._full + [(p, finished(batch, n), n) for p, (batch, n, _) in self._open.items() if n]
        pending = self._sent
        self._open, self._full, self._sent, self.count = {}, [], [], 0
        try:
            for p, batch, n in batches:
                pending.append(await hand_over(self.producer, topic, p, batch, n))
        except BaseException:
            abandon(pending)
            raise
        acked = asyncio.ensure_future(last_offsets(self.producer, topic, pending))
        # Cancelled before it ran (a failed send cancels its acks): ``delivered`` never
        # ran to abandon them.
        acked.add_done_callback(lambda done: abandon(pending) if done.cancelled() else None)
        return acked

    def abandon(self) -> None:
        """Dropped unstarted (a commit's snapshot given back): the batches handed over
        by ``send_full`` are abandoned, the rest never sent."""
        abandon(self._sent)
        self._open, self._full, self._sent, self.count = {}, [], [], 0


class SentBatch:
    """A record batch handed to the producer, kept in its partition's ``Lane`` until it
    and every batch handed over there before it are acknowledged, so that it can be sent
    again (``delivered``). ``batch`` and ``future`` are those of its latest hand-over: a
    resend replaces them."""

    __slots__ = ("partition", "batch", "count", "future", "lane", "settled", "abandoned", "owed")

    def __init__(self, partition: int, batch: Any, count: int, future: asyncio.Future, lane: Lane) -> None:
        self.partition, self.batch, self.count, self.future, self.lane = partition, batch, count, future, lane
        #: Out of its lane: no resend can send it again any more.
        self.settled = False
        #: Its caller is gone (raised or cancelled): no later batch waits for it.
        self.abandoned = False
        #: Set (to the error that began it) when a resend stopped before sending this
        #: batch again: copies of earlier batches went out after it, so the next resend
        #: must send it again, whatever became of its latest hand-over.
        self.owed: BaseException | None = None

    def must_go_again(self) -> bool:
        """Its latest hand-over failed with a retriable error, or a stopped resend owes
        it a copy."""
        return self.owed is not None or failed_retriably(self.future)

    def error(self) -> BaseException | None:
        """Why it must go again (``must_go_again``), if it must."""
        if self.owed is not None:
            return self.owed
        return self.future.exception() if failed_retriably(self.future) else None


class Lane:
    """The record batches one producer has in flight to one topic partition, in the
    order they were handed over (the order the producer keeps).

    Why per partition and not per send: sends overlap. A pipeline's batch awaits its
    outputs' acks while the next batch's are handed over (``Batch.finish_later``), and
    so do the emitter's sends and concurrent produce requests. A batch sent again is
    stored after everything handed over before its resend, so every later batch of its
    partition, whichever send it belongs to, is sent again after it; else a key's last
    value would be the older one (a compacted topic, an upserting sink)."""

    __slots__ = ("sent", "lock", "resending")

    def __init__(self) -> None:
        self.sent: collections.deque[SentBatch] = collections.deque()
        #: Held while a batch is handed over and while batches are sent again, so that
        #: the lane's order is the producer's and nothing comes between the copies.
        self.lock = asyncio.Lock()
        #: Done when the resend under way ends (None: none is): until then a batch
        #: acknowledged before may be sent again.
        self.resending: asyncio.Future | None = None

    def trim(self) -> None:
        """Let the front batches go that no resend needs: acknowledged, failed for good
        (their caller raises it) or abandoned. One that failed with a retriable error
        stays (unless abandoned: nothing of it was stored), and so does everything after
        it; one a stopped resend owes a copy stays; nothing goes during a resend."""
        if self.resending is not None:
            return
        sent = self.sent
        while sent:
            head = sent[0]
            if head.owed is not None:
                return
            if not head.abandoned and (not head.future.done() or failed_retriably(head.future)):
                return
            sent.popleft().settled = True

    async def resend(self, producer: Any, topic: str) -> None:
        """Send again, in order, the first batch that must go again (``must_go_again``)
        and every later one still awaited. Nothing when there is no such batch: another
        caller sent them again already."""
        async with self.lock:
            again = list(itertools.dropwhile(lambda one: not one.must_go_again(), self.sent))
            if not again:
                return
            error = again[0].error()
            self.resending = ended = asyncio.get_running_loop().create_future()
            # A batch given up may have had its sequence numbers: without a new
            # producer id every later batch of its partition fails (``reset_producer_id``).
            reset_producer_id(producer)
            done = 0
            try:
                for one in again:
                    if not one.future.done():
                        # Still in the producer's queue: rebuilding it now would take its
                        # records from under aiokafka's sender, which then dies when it
                        # drains it. It ends either way (stored, or failed).
                        await asyncio.wait({one.future})
                    # Those whose caller is gone too (stored, their records must stay
                    # before the copies of later ones); not those that raise their error.
                    if not failed_for_good(one.future):
                        one.batch = rebuilt(producer, one.batch)
                        one.future = await send_once(producer, topic, one.partition, one.batch)
                    one.owed = None
                    done += 1
            except BaseException:
                # Stopped half way (cancelled, or a non-retriable error): the batches
                # not sent again yet are owed a copy, for the next resend to take on
                # (their hand-over may still be in the producer's queue: not rebuilt
                # before it ends, as above).
                for one in again[done:]:
                    if not failed_for_good(one.future):
                        one.owed = error
                raise
            finally:
                self.resending = None
                ended.set_result(None)


#: producer -> (topic, partition) -> its ``Lane``.
_LANES: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], Lane]] = weakref.WeakKeyDictionary()


def lane_of(producer: Any, topic: str, partition: int) -> Lane:
    lanes = _LANES.get(producer)
    if lanes is None:
        lanes = _LANES[producer] = {}
    lane = lanes.get((topic, partition))
    if lane is None:
        lane = lanes[(topic, partition)] = Lane()
    return lane


def in_flight(producer: Any, topic: str, partition: int) -> list[SentBatch]:
    """The batches ``producer`` keeps for ``topic``/``partition``."""
    lane = _LANES.get(producer, {}).get((topic, partition))
    return list(lane.sent) if lane is not None else []


def failed_future(exc: BaseException) -> asyncio.Future:
    """A future already failed with ``exc``, marked as read: a copy nobody awaits any
    more (its caller gone) is not reported as an exception never retrieved."""
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    future.exception()
    return future


def abandon(sent: Iterable[SentBatch]) -> None:
    """Their caller is gone (raised, cancelled, or dropped them): no later batch of
    their partitions waits for them any more, and they leave their lanes once nothing
    before them is in flight."""
    lanes = set()
    for one in sent:
        one.abandoned = True
        lanes.add(one.lane)
    for lane in lanes:
        lane.trim()


def outcome(future: asyncio.Future) -> Any:
    """A done future's result, or its exception (``CancelledError`` if cancelled)."""
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception() or future.result()


def failed_retriably(future: asyncio.Future) -> bool:
    if not future.done() or future.cancelled():
        return False
    exc = future.exception()
    return exc is not None and retriable(exc)


def failed_for_good(future: asyncio.Future) -> bool:
    """Failed with a non-retriable error, or cancelled (its caller was)."""
    if not future.done():
        return False
    if future.cancelled():
        return True
    exc = future.exception()
    return exc is not None and not retriable(exc)


def producer_of(io: KafkaIO) -> Any:
    assert io.producer is not None
    return io.producer


def retriable(exc: BaseException) -> bool:
    """A send error that sending again may cure: aiokafka's retriable errors (leader
    moved or unknown, request timed out, not enough replicas, connection lost), a batch
    that timed out waiting for metadata or room in the producer's buffer, and the
    sequence errors a batch given up before leaves (sent again under a new producer id,
    ``delivered``)."""
    return (isinstance(exc, (KafkaTimeoutError, OutOfOrderSequenceNumber, UnknownProducerId))
            or (isinstance(exc, KafkaError) and exc.retriable))


async def hand_over(producer: Any, topic: str, partition: int, batch: Any, count: int) -> SentBatch:
    """``producer.send_batch``, the batch kept in its partition's ``Lane`` until
    ``delivered`` lets it go; never while that partition's batches are sent again (it
    goes after the copies)."""
    lane = lane_of(producer, topic, partition)
    async with lane.lock:
        one = SentBatch(partition, batch, count, await send_once(producer, topic, partition, batch), lane)
        lane.sent.append(one)
    return one


async def send_once(producer: Any, topic: str, partition: int, batch: Any) -> asyncio.Future:
    """``producer.send_batch``; a retriable failure to hand the batch over (no metadata
    while the broker is away) becomes its failed delivery, which ``delivered`` sends
    again in order with the rest."""
    try:
        return await producer.send_batch(batch, topic, partition=partition)
    except Exception as exc:
        if not retriable(exc):
            raise
        return failed_future(exc)


async def delivered(producer: Any, topic: str, sent: list[SentBatch]) -> list[tuple[Any, int]]:
    """(record metadata, record count) of each batch of ``sent`` once the broker
    acknowledged them all, and every batch handed over before them to their partitions.

    A batch that failed with a retriable error is sent again, as a new batch of the same
    records, together with every later batch of its partition in flight, of this send
    or another (acknowledged or not), in their order (``Lane``): a partition's records
    then end in the order they were made (a key's last value is its newest), with the
    later ones written twice at most. Whichever caller sees the failure first sends them
    again, once; the others await the copies. With backoff, for up to
    ``SEND_RETRY_SECONDS``; a non-retriable error, or one that outlasts that bound, is
    raised, and the caller's commit fails (the worker restarts and replays).

    Why wait for the earlier batches: one of them may still fail, and its resend sends
    ours again after it; the producer acknowledges a partition's batches in order, so
    this costs nothing unless one failed."""
    deadline: float | None = None
    backoff = SEND_RETRY_BACKOFF
    last = {one.lane: one for one in sent}  # each lane's last batch of ``sent``
    try:
        while True:
            futures = [one.future for one in sent]
            # Not gather: a caller cancelled must leave the futures be (gather cancels
            # them), so that a resend still sees which of its batches were stored.
            waiting = [future for future in futures if not future.done()]
            if waiting:
                await asyncio.wait(waiting)
            results = [outcome(future) for future in futures]
            if any(one.future is not future for one, future in zip(sent, futures, strict=True)):
                continue  # sent again by another caller meanwhile: await the copies
            failed: dict[Lane, int] = {}  # lane -> its partition
            error: BaseException | None = None
            for one, result in zip(sent, results, strict=True):
                if isinstance(result, BaseException) and not retriable(result):
                    raise result
                if one.must_go_again():  # failed retriably, or owed a copy (``Lane.resend``)
                    error = error or one.error()
                    failed[one.lane] = one.partition
            if error is None:
                earlier = []  # earlier batches of our partitions still in flight
                for lane, one in last.items():
                    if not one.settled:
                        lane.trim()
                    if one.settled:
                        continue
                    if lane.resending is not None:  # ours may be sent again too
                        earlier.append(lane.resending)
                        continue
                    head = lane.sent[0]
                    if head.owed is None and not head.future.done():
                        earlier.append(head.future)
                    else:  # it must go again (``Lane.trim``)
                        error = error or head.error()
                        failed[lane] = head.partition
                if error is None:
                    if not earlier:
                        return [(meta, one.count) for meta, one in zip(results, sent, strict=True)]
                    await asyncio.wait(earlier)
                    continue
            now = time.monotonic()
            deadline = deadline or now + SEND_RETRY_SECONDS
            if now >= deadline:
                raise error
            log.warning("%s: record batch(es) of partition(s) %s failed (%r); sending them and the later ones "
                        "again in %.1f s", topic, sorted(failed.values()), error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, SEND_RETRY_MAX_BACKOFF)
            for lane in failed:
                await lane.resend(producer, topic)
    except BaseException:
        abandon(sent)
        raise


def rebuilt(producer: Any, batch: Any) -> Any:
    """A new record batch with the records of ``batch`` (timestamps kept)."""
    new, count = producer.create_batch(), 0
    for key, value, headers, timestamp_ms in batch_records(batch):
        # They fitted one batch of this size before, so they do again.
        if not append_record(new, count, key, value, headers or NO_HEADERS, timestamp_ms) and count:
            raise RuntimeError("records of one record batch did not fit a new one")
        count += 1
    return finished(new, count)


async def last_offsets(producer: Any, topic: str, pending: list[SentBatch]) -> dict[int, int]:
    """The last offset stored in each partition, once every batch is acknowledged."""
    last: dict[int, int] = {}
    for meta, count in await delivered(producer, topic, pending):
        end = meta.offset + count - 1
        if end > last.get(meta.partition, -1):
            last[meta.partition] = end
    return last


kafka_io = KafkaIO()
app.service(kafka_io)
