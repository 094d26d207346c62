"""Reference data: a table fed by its own compacted topic, replicated on every worker.

Rows are written (``PUT /api/v1/reference/{name}``) to the compacted ``reference``
topic, keyed ``<name>/<key>``. Every worker tails the whole topic (all partitions, no
consumer group) into an in-memory map: the GlobalKTable pattern. A restart rebuilds
the map from the compacted topic, so nothing is kept locally that Kafka does not hold.
Pipelines wait until the map has caught up with the topic's end before enriching, and
a writer waits until its own worker has read its rows back (read-your-writes).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from app import app, settings
from app.kafka_security import client_options
from app.topics import declare
from app.transport import refresh_metadata

log = logging.getLogger(__name__)

reference_topic = declare("reference", compacted=True)

#: Names of reference data sets (the ``{name}`` in the URL).
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def row_key(name: str, key: str) -> bytes:
    return f"{name}/{key}".encode()


class ReferenceStore(Service):
    """The in-memory replica of the reference topic on this worker."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: dict[str, dict[str, Mapping[str, Any]]] = {}
        self.caught_up = asyncio.Event()
        self._positions: dict[int, int] = {}  # partition -> next offset to read
        self._advanced = asyncio.Condition()
        self._consumer: AIOKafkaConsumer | None = None

    def lookup(self, name: str, key: str) -> Mapping[str, Any] | None:
        """One row, or None."""
        rows = self.rows.get(name)
        return None if rows is None else rows.get(key)

    async def on_start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="earliest", group_id=None, **client_options(settings),
        )
        await self._consumer.start()
        self.add_future(self._tail())

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _tail(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        topic = reference_topic.get_topic_name()
        parts = None
        while not parts:
            await refresh_metadata(consumer)
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await self._end_offsets(consumer, tps)
        target = {tp.partition: off for tp, off in end.items()}
        while not self.should_stop:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, messages in batch.items():
                for m in messages:
                    self._apply(m.key, m.value)
                    self._positions[tp.partition] = m.offset + 1
            if not self.caught_up.is_set():
                positions = {tp.partition: await consumer.position(tp) for tp in tps}
                if all(positions[p] >= target[p] for p in target):
                    self.caught_up.set()
                    log.info("reference data caught up: %d sets", len(self.rows))
            if batch:
                async with self._advanced:
                    self._advanced.notify_all()

    async def _end_offsets(self, consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The partitions' end offsets, asked again until the broker answers.

        Why: a worker started while the broker is unreachable (or paused long enough,
        e.g. a restart during a broker restart) got a timeout here after 40 s, and this
        service's crash stopped the worker (the chaos verifier, issue 23)."""
        while True:
            try:
                return await consumer.end_offsets(tps)
            except KafkaError as exc:
                log.warning("reference data: end offsets not available (%r); asking again", exc)
                await self.sleep(1.0)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name, _, k = key.decode(errors="replace").partition("/")
        if value is None:  # tombstone: the row was deleted
            self.rows.get(name, {}).pop(k, None)
            return
        try:
            row = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("reference row %r is not JSON; ignored", key)
            return
        if isinstance(row, dict):
            self.rows.setdefault(name, {})[k] = row

    async def wait_for(self, positions: Mapping[int, int], timeout: float = 10.0) -> bool:
        """Wait until this replica has read every partition up to the given offsets."""

        def done() -> bool:
            return all(self._positions.get(p, 0) > off for p, off in positions.items())

        async with self._advanced:
            try:
                await asyncio.wait_for(self._advanced.wait_for(done), timeout)
            except TimeoutError:
                return False
        return True


reference_store = ReferenceStore()
app.service(reference_store)
