"""Database sinks at work: one service per sink replicates its topic into its table.

Not a Faust agent: a sink's exactly-once effect comes from the database, not from
Kafka. Its own aiokafka consumer (group ``<app id>-sink-<name>``, read_committed) starts
each assigned partition at the offset stored in the database, and each batch commits
rows and offsets in one database transaction (app/db_sinks.py). So it holds under
either processing guarantee, and a kill at any point repeats nothing and skips nothing.

While the database is unreachable the sink retries with backoff (1 s doubling to 10 s)
and consumes nothing further: nothing is lost, the worker stays healthy, and the sink's
state shows in ``/health`` (``sinks``) and ``GET /api/v1/sinks``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from app import app, settings
from app.db_sinks import Batch, OffsetConflict, SinkSpec, UnknownColumns, target_for
from app.dead_letter import dead_letter_headers
from app.kafka_io import kafka_io
from app.kafka_security import client_options
from app.topics import dead_letters
from operators.cdc import Change, ChangeError, parse_change, plain_change

log = logging.getLogger(__name__)

MAX_RECORDS = 5000
BACKOFF_MAX = 10.0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, sink: DbSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self.sink.expected.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.sink.seek_to_stored(assigned)


class DbSink(Service):
    """Replicates ``spec.source`` into ``spec.table``."""

    def __init__(self, spec: SinkSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if spec.type == "table":
            # Every worker keeps the whole table, with its offsets, in a file of its own.
            spec = dataclasses.replace(spec, path=str(Path(settings.data_dir) / settings.app_id / "materialized"
                                                      / f"{spec.name}.sqlite"))
        self.spec = spec
        self.topic = settings.topic(spec.source)
        self.target = target_for(spec)
        self.sink_state = "starting"
        self.error: str | None = None
        self.counters: Counter[str] = Counter()
        #: partition -> the next offset the database holds (None: no row yet)
        self.expected: dict[int, int | None] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.last_applied_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "source": self.topic, "type": self.spec.type, "table": self.spec.table,
                "mode": self.spec.mode, "format": self.spec.format, "state": self.sink_state, "error": self.error,
                "counters": dict(self.counters), "last_applied_at": self.last_applied_at,
                "partitions": {p: n for p, n in sorted(self.expected.items())}}

    async def on_start(self) -> None:
        self.add_future(self._run())

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.target.close()

    async def _run(self) -> None:
        await kafka_io.ready.wait()
        backoff = 1.0
        while not self.should_stop:
            try:
                await self.target.open()
                if self.consumer is not None and self.materialized and not self.consumer.assignment():
                    await self.consumer.stop()  # its topic was missing: look again
                    self.consumer = None
                if self.consumer is None:
                    await self._start_consumer()
                else:
                    await self.seek_to_stored(self.consumer.assignment())
                self.sink_state, self.error, backoff = "running", None, 1.0
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away or refused: retry, lose nothing
                self.sink_state, self.error = "retrying", f"{type(exc).__name__}: {exc}"
                self.counters["retries"] += 1
                log.warning("sink %s: %s; retrying in %.0f s", self.spec.name, self.error, backoff)
                await self.target.close()
                await self.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    @property
    def materialized(self) -> bool:
        return self.spec.type == "table"

    async def _start_consumer(self) -> None:
        """A consumer of the sink's group, or for a materialized table one that reads
        every partition (each worker keeps the whole table)."""
        group = None if self.materialized else f"{settings.app_id}-sink-{self.spec.name}"
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed", max_poll_records=MAX_RECORDS,
            fetch_max_wait_ms=settings.fetch_max_wait_ms, **client_options(settings))
        await self.consumer.start()
        if not self.materialized:
            self.consumer.subscribe([self.topic], listener=_Rebalance(self))
            return
        count = await kafka_io.partition_count(self.topic)
        if not count:
            raise RuntimeError(f"topic {self.topic} does not exist")
        tps = [TopicPartition(self.topic, p) for p in range(count)]
        self.consumer.assign(tps)
        await self.seek_to_stored(tps)

    async def seek_to_stored(self, partitions: Any) -> None:
        """Start each partition where the database says this sink stopped."""
        parts = sorted(tp.partition for tp in partitions if tp.topic == self.topic)
        if not parts or self.consumer is None:
            return
        stored = await self.target.read_offsets(self.topic, parts)
        for p in parts:
            tp = TopicPartition(self.topic, p)
            if p in stored:
                self.consumer.seek(tp, stored[p])
            else:
                await self.consumer.seek_to_beginning(tp)
            self.expected[p] = stored.get(p)

    def _change(self, record: Any) -> Change:
        if self.spec.format == "debezium":
            return parse_change(record.key, record.value, self.spec.key)
        return plain_change(record.value, self.spec.key if self.spec.mode == "upsert" else ())

    async def _consume(self) -> None:
        assert self.consumer is not None
        while not self.should_stop:
            fetched = await self.consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
            if not fetched:
                continue
            batches, refused, sources = [], [], {}
            for tp, records in fetched.items():
                if tp.partition not in self.expected:
                    continue  # assigned but not yet positioned from the database
                changes = []
                for record in records:
                    try:
                        change = self._change(record)
                    except ChangeError as exc:
                        refused.append((record, exc.reason, str(exc)))
                        continue
                    changes.append(change)
                    sources[id(change)] = record
                batches.append(Batch(tp.topic, tp.partition, records[0].offset, records[-1].offset,
                                     self.expected[tp.partition], changes))
            if not batches:
                continue
            try:
                await self._apply(batches, refused, sources)
            except OffsetConflict as exc:
                self.counters["offset_conflicts"] += 1
                log.warning("sink %s: %s; resuming from the stored offsets", self.spec.name, exc)
                await self.seek_to_stored(self.consumer.assignment())
                continue
            for batch in batches:
                self.expected[batch.partition] = batch.last_offset + 1
            self.counters["applied"] += sum(len(b.changes) for b in batches)
            self.counters["batches"] += 1
            self.last_applied_at = time.time()
            await self._dead_letters(refused)
            if not self.materialized:  # for lag monitoring only: the database's offsets are the truth
                await self.consumer.commit({TopicPartition(b.topic, b.partition): b.last_offset + 1 for b in batches})

    async def _apply(self, batches: list[Batch], refused: list, sources: dict) -> None:
        try:
            await self.target.apply(batches)
        except UnknownColumns as exc:
            unknown = set(exc.columns)
            for batch in batches:
                kept = []
                for change in batch.changes:
                    if change.row is not None and unknown & change.row.keys():
                        refused.append((sources[id(change)], "unknown_column", str(exc)))
                    else:
                        kept.append(change)
                batch.changes = kept
            await self.target.apply(batches)

    async def _dead_letters(self, refused: list) -> None:
        for record, reason, message in refused:
            headers = dead_letter_headers(reason=reason, message=message, source_topic=record.topic,
                                          pipeline=f"sink:{self.spec.name}", partition=record.partition,
                                          offset=record.offset)
            await kafka_io.producer.send_and_wait(dead_letters.get_topic_name(), record.value or b"",
                                                  key=record.key, headers=headers)
            self.counters["dead_lettered"] += 1


SINKS: dict[str, DbSink] = {}


def add_sink(spec: SinkSpec) -> None:
    """Run one configured database sink on this worker (registered by app/startup.py)."""
    SINKS[spec.name] = DbSink(spec)
    app.service(SINKS[spec.name])


def materialized(name: str) -> DbSink | None:
    """The materialized table (a ``type: table`` sink) of that name, if any."""
    sink = SINKS.get(name)
    return sink if sink is not None and sink.materialized else None


def sinks_health() -> dict[str, Any]:
    """Each sink's state for /health (a sink that retries does not make a worker unhealthy)."""
    return {name: {"state": s.sink_state, "error": s.error} for name, s in SINKS.items()}


__all__ = ["SINKS", "DbSink", "add_sink", "materialized", "sinks_health"]
