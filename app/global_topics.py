"""The one reader of "global" topics: topics every worker reads whole, from the
beginning and without a consumer group, into memory (Kafka Streams' GlobalKTable).

* :class:`GlobalTopicReader` tails compacted topics for as long as the worker runs:
  reference data (``tables/reference.py``) and the pattern catalog's definitions and
  match counts (``tables/patterns.py``). A subclass names its topics and applies each
  record; the reader says when it has caught up with the end offsets the topics had
  when it started (``caught_up``) and waits for given offsets to be read
  (``wait_for_offsets``:
  read-your-writes for a worker that just wrote them).
* :func:`read_recent` reads the last records of a topic once (the alert history of
  ``GET /api/v1/alerts``).

Both use a consumer of their own (``new_consumer``), never the worker's, so they see
every partition whatever the group assigned to this worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from app import settings
from app.kafka_security import client_options
from app.transport import WORKER_ISOLATION_LEVEL, refresh_metadata

log = logging.getLogger(__name__)

#: Seconds between two metadata requests while a topic is not known yet.
METADATA_INTERVAL = 0.2


def new_consumer() -> AIOKafkaConsumer:
    """A group-less consumer that reads from the beginning and commits nothing, only
    committed records as the worker's own consumer (under exactly_once the pattern
    counts' changelog and the alerts are written in transactions: an aborted alert was
    shown in the alert history, an aborted count until overwritten)."""
    return AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                            auto_offset_reset="earliest", group_id=None,
                            isolation_level=WORKER_ISOLATION_LEVEL, **client_options(settings))


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str,
                           attempts: int | None = None) -> list[TopicPartition]:
    """The partitions of ``topic``, asking the broker again until it lists the topic (at
    most ``attempts`` times, None = until it does; then the empty list)."""
    tried = 0
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if attempts is not None and tried >= attempts:
            return []
        if tried:
            await asyncio.sleep(METADATA_INTERVAL)
        tried += 1
        await refresh_metadata(consumer)


class GlobalTopicReader(Service):
    """Reads compacted topics whole on every worker and applies each record in order.

    A subclass names the topics (``topics``, resolved when reading starts: Faust's
    changelog topics are named then) and applies records (``apply``). A failure (broker
    away, a record ``apply`` cannot take) is logged and reading starts over after a
    second, from the offsets already read, so a broker hiccup never leaves the waiters of
    ``caught_up`` waiting for good, nor stops the worker."""

    #: How long one poll waits when there is nothing to read (ms).
    poll_ms = 200
    #: Metadata requests per topic before a topic the broker does not list is skipped
    #: (None: wait until it exists).
    metadata_attempts: int | None = None
    #: A name for the logs.
    label = "global topics"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Set once every partition was read up to its end offset at the first start.
        self.caught_up = asyncio.Event()
        #: The next offset to read, by partition (only partitions read from so far).
        self.positions: dict[TopicPartition, int] = {}
        self._advanced = asyncio.Condition()

    def topics(self) -> list[str]:
        raise NotImplementedError

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Apply one record (``value`` None: a tombstone)."""
        raise NotImplementedError

    @Service.task
    async def _read(self) -> None:
        await self.read_forever()

    async def read_forever(self) -> None:
        """Read until the service stops, starting over after a failure."""
        while not self.should_stop:
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: reader failed; starting it again", self.label)
                await self.sleep(1.0)

    async def _read_once(self) -> None:
        consumer = new_consumer()
        await consumer.start()
        try:
            tps: list[TopicPartition] = []
            for topic in self.topics():
                tps += await topic_partitions(consumer, topic, self.metadata_attempts)
            consumer.assign(tps)
            for tp in tps:
                if tp in self.positions:
                    consumer.seek(tp, self.positions[tp])
                else:
                    await consumer.seek_to_beginning(tp)
            ends = await self._end_offsets(consumer, tps)
            pending = {tp for tp in tps if ends[tp] > self.positions.get(tp, 0)}
            self._check_caught_up(pending)
            while not self.should_stop:
                batch = await consumer.getmany(timeout_ms=self.poll_ms, max_records=5000)
                for tp, messages in batch.items():
                    topic, apply = tp.topic, self.apply
                    for m in messages:
                        apply(topic, m.key, m.value)
                        self.positions[tp] = m.offset + 1
                if not self.caught_up.is_set():
                    for tp in list(pending):
                        if await consumer.position(tp) >= ends[tp]:
                            pending.discard(tp)
                    self._check_caught_up(pending)
                if batch:
                    async with self._advanced:
                        self._advanced.notify_all()
        finally:
            await consumer.stop()

    def _check_caught_up(self, pending: set[TopicPartition]) -> None:
        if not pending and not self.caught_up.is_set():
            self.caught_up.set()
            self.on_caught_up()

    def on_caught_up(self) -> None:
        """Called once, when ``caught_up`` is set."""

    async def _end_offsets(self, consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The partitions' end offsets, asked again until the broker answers.

        Why: a worker started while the broker is unreachable (or paused long enough,
        e.g. a restart during a broker restart) got a timeout here after 40 s, and the
        reader's crash stopped the worker (the chaos verifier, issue 23)."""
        while True:
            try:
                return await consumer.end_offsets(tps)
            except KafkaError as exc:
                log.warning("%s: end offsets not available (%r); asking again", self.label, exc)
                await self.sleep(1.0)

    async def wait_for_offsets(self, topic: str, offsets: Mapping[int, int], timeout: float = 10.0) -> bool:
        """Wait until ``topic``'s partitions were read past the given offsets
        (partition → offset); False after ``timeout`` seconds."""

        def done() -> bool:
            positions = self.positions
            return all(positions.get(TopicPartition(topic, p), 0) > off for p, off in offsets.items())

        async with self._advanced:
            try:
                await asyncio.wait_for(self._advanced.wait_for(done), timeout)
            except TimeoutError:
                return False
        return True


async def read_recent(topic: str, count: int, apply: Callable[[Any], None],
                      partition: Callable[[int], int] | None = None) -> None:
    """Hand ``apply`` each of the last ``count`` records of every partition of ``topic``
    (of one partition only, ``partition(partition count)``, when given), in offset order
    per partition; a one-off read up to the end offsets found when it starts."""
    consumer = new_consumer()
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic, attempts=1)
        if partition is not None and tps:
            tps = [TopicPartition(topic, partition(len(tps)))]
        if not tps:
            return
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        todo = {}
        for tp in tps:
            start = max(begins[tp], ends[tp] - count)
            if start < ends[tp]:
                consumer.seek(tp, start)
                todo[tp] = ends[tp]
        while todo:
            batch = await asyncio.wait_for(consumer.getmany(*todo, timeout_ms=1000), 30)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset < todo.get(tp, 0):
                        apply(m)
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await consumer.stop()


__all__ = ["GlobalTopicReader", "new_consumer", "read_recent", "topic_partitions"]
