"""Database sinks at work: one service per sink replicates its topic into its table.

Not a Faust agent: a sink's exactly-once effect comes from the database, not from
Kafka. Its own aiokafka consumer (group ``<app id>-sink-<name>``, read_committed) starts
each assigned partition at the offset stored in the database, and each batch commits
rows and offsets in one database transaction (app/db_sinks.py). So it holds under
either processing guarantee, and a kill at any point repeats no row and skips nothing.

A record the sink cannot write (not a change, a field without a column, a value or key
the database refuses) goes to the dead-letter topic before the offsets move past it: at
least once, so a kill in between sends it again. A batch the database refuses is cut in
halves until the refused records are found; the others are written.

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
from aiokafka.errors import KafkaError
from mode import Service

from app import app, settings
from app.db_sinks import (
    Batch,
    OffsetConflict,
    SinkSpec,
    UnknownColumns,
    refusal_reason,
    refused_by_database,
    target_for,
)
from app.dead_letter import dead_letter_headers
from app.kafka_io import kafka_io
from app.kafka_security import client_options
from app.topics import dead_letters
from operators.cdc import Change, ChangeError, parse_change, plain_change

log = logging.getLogger(__name__)

MAX_RECORDS = 5000
BACKOFF_MAX = 10.0


class _Rebalance(ConsumerRebalanceListener):
    """aiokafka calls these from its own task, also while the sink writes a batch: each
    waits for that write (``DbSink.writing``), so that a partition is revoked after its
    batch and its stored offset is read after the batch committed."""

    def __init__(self, sink: DbSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.sink.writing:
            gone = {tp.partition for tp in revoked}
            for p in gone:
                self.sink.expected.pop(p, None)
            self.sink.dead_lettered = {e for e in self.sink.dead_lettered if e[0] not in gone}

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # aiokafka logs and drops an error raised here (the database away): the
        # partitions stay unpositioned, and _consume positions them when it meets them.
        async with self.sink.writing:
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
        #: Held while the sink uses the database or its positions: one batch's write, or
        #: a rebalance's revoke or offset read.
        self.writing = asyncio.Lock()
        #: (partition, offset) of records whose dead letter is acknowledged but whose
        #: offset the database has not passed yet: not sent again when a retry reads
        #: them again.
        self.dead_lettered: set[tuple[int, int]] = set()

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
                async with self.writing:
                    await self.target.open()
                if self.consumer is not None and self.materialized and not self.consumer.assignment():
                    await self.consumer.stop()  # its topic was missing: look again
                    self.consumer = None
                if self.consumer is None:
                    await self._start_consumer()
                else:
                    async with self.writing:
                        await self.seek_to_stored(self.consumer.assignment())
                self.sink_state, self.error, backoff = "running", None, 1.0
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away or refused: retry, lose nothing
                self.sink_state, self.error = "retrying", f"{type(exc).__name__}: {exc}"
                self.counters["retries"] += 1
                log.warning("sink %s: %s; retrying in %.0f s", self.spec.name, self.error, backoff)
                async with self.writing:
                    try:
                        await self.target.close()
                    except Exception as close_exc:  # the retry opens a new connection anyway
                        log.warning("sink %s: closing after the error: %r", self.spec.name, close_exc)
                await self.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    @property
    def materialized(self) -> bool:
        return self.spec.type == "table"

    async def _start_consumer(self) -> None:
        """A consumer of the sink's group, or for a materialized table one that reads
        every partition (each worker keeps the whole table)."""
        group = None if self.materialized else f"{settings.app_id}-sink-{self.spec.name}"
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed", max_poll_records=MAX_RECORDS,
            fetch_max_wait_ms=settings.fetch_max_wait_ms, **client_options(settings))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()  # the next attempt makes a new one
            raise
        self.consumer = consumer
        if not self.materialized:
            consumer.subscribe([self.topic], listener=_Rebalance(self))
            return
        count = await kafka_io.partition_count(self.topic)
        if not count:
            raise RuntimeError(f"topic {self.topic} does not exist")
        tps = [TopicPartition(self.topic, p) for p in range(count)]
        consumer.assign(tps)
        async with self.writing:
            await self.seek_to_stored(tps)

    async def seek_to_stored(self, partitions: Any) -> None:
        """Start each partition where the database says this sink stopped (the caller
        holds ``writing``)."""
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
            batches = await self._write(fetched)
            if batches and not self.materialized:
                # For lag monitoring only (the database's offsets are the truth): a
                # commit refused because the group rebalances meanwhile changes nothing.
                try:
                    await self.consumer.commit({TopicPartition(b.topic, b.partition): b.last_offset + 1
                                                for b in batches})
                except KafkaError as exc:
                    log.debug("sink %s: lag-monitoring commit skipped (%r)", self.spec.name, exc)

    async def _write(self, fetched: dict[Any, list[Any]]) -> list[Batch]:
        """Write one fetch into the database; returns its batches (none when it wrote
        nothing)."""
        async with self.writing:
            return await self._write_held(fetched)

    async def _write_held(self, fetched: dict[Any, list[Any]]) -> list[Batch]:
        assert self.consumer is not None
        # A partition revoked after the fetch: its new owner writes its records.
        assigned = self.consumer.assignment()
        fetched = {tp: records for tp, records in fetched.items() if tp in assigned}
        unpositioned = [tp for tp in fetched if tp.partition not in self.expected]
        if unpositioned:
            # The rebalance could not read their offsets: their records are fetched
            # again from the stored ones.
            await self.seek_to_stored(unpositioned)
        batches, refused, sources = [], [], {}
        for tp, records in fetched.items():
            if tp in unpositioned:
                continue
            expected = self.expected[tp.partition]
            if expected is not None and records[0].offset < expected:
                log_end = self.consumer.highwater(tp)
                if log_end is not None and log_end < expected:
                    # The stored offset is past the log's end: the topic was deleted and
                    # made again (or truncated). Its records are new: written.
                    self.counters["stored_offset_past_log_end"] += 1
                    log.warning("sink %s: %s stored offset %d is past the log's end %d (topic made "
                                "again?): writing from %d", self.spec.name, tp, expected, log_end,
                                records[0].offset)
                else:
                    # Already in the database: the consumer restarted behind the stored
                    # offset (from the group's lag-monitoring commit after a rebalance).
                    kept = [r for r in records if r.offset >= expected]
                    self.counters["skipped_already_stored"] += len(records) - len(kept)
                    records = kept
                    if not records:
                        continue
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
                                 expected, changes))
        if not batches:
            return []
        dead_before = self.counters["dead_lettered"]
        try:
            await self._dead_letters(refused)
            await self._apply(batches, sources)
        except OffsetConflict as exc:
            self.counters["offset_conflicts"] += 1
            log.warning("sink %s: %s; resuming from the stored offsets", self.spec.name, exc)
            await self.seek_to_stored(self.consumer.assignment())
            return []
        if self.dead_lettered:
            self._passed()
        self.counters["applied"] += (sum(len(b.changes) for b in batches) + len(refused)
                                     - (self.counters["dead_lettered"] - dead_before))
        self.counters["batches"] += 1
        self.last_applied_at = time.time()
        return batches

    async def _apply(self, batches: list[Batch], sources: dict) -> None:
        """Write ``batches``; each partition's expected offset moves past its batch.
        When some records cannot be written, each partition apart, down to them."""
        try:
            await self.target.apply(batches)
        except OffsetConflict:
            raise
        except Exception as exc:
            if not refused_by_database(exc):  # UnknownColumns included
                raise
            # A column changed behind the sink's back is not the records' fault.
            await self.target.reload_columns()
            await self.target.ensure_table(batches)
            for batch in batches:
                await self._apply_finding_refused(batch, batch.changes, batch.first_offset, batch.last_offset,
                                                  sources)
        else:
            for batch in batches:
                self.expected[batch.partition] = batch.last_offset + 1

    async def _apply_finding_refused(self, batch: Batch, changes: list[Change], first: int, last: int,
                                     sources: dict) -> None:
        """Write ``changes`` (offsets ``first``..``last`` of ``batch``'s partition) in
        one transaction. The records with a field that has no column go to the
        dead-letter topic (``unknown_column``); if the database refuses the rest, each
        half apart, down to the single records it refuses, which go there too. Every
        dead letter is acknowledged before the transaction that passes its offset."""
        part = Batch(batch.topic, batch.partition, first, last, self.expected[batch.partition], changes)
        try:
            await self.target.apply([part])
        except OffsetConflict:
            raise
        except UnknownColumns as exc:
            unknown = set(exc.columns)
            kept = [c for c in changes if c.row is None or not unknown & c.row.keys()]
            if len(kept) == len(changes):
                raise  # no record carries them: not the records' fault
            await self._dead_letters([(sources[id(c)], "unknown_column", str(exc))
                                      for c in changes if c.row is not None and unknown & c.row.keys()])
            await self._apply_finding_refused(batch, kept, first, last, sources)
            return
        except Exception as exc:
            if not changes or not refused_by_database(exc):
                raise
            if len(changes) > 1:
                middle = len(changes) // 2
                split = sources[id(changes[middle])].offset
                await self._apply_finding_refused(batch, changes[:middle], first, split - 1, sources)
                await self._apply_finding_refused(batch, changes[middle:], split, last, sources)
                return
            self.counters["refused_by_database"] += 1
            await self._dead_letters([(sources[id(changes[0])], refusal_reason(exc),
                                       f"{type(exc).__name__}: {exc}")])
            part.changes = []
            await self.target.apply([part])  # its offset only
        self.expected[batch.partition] = last + 1

    def _passed(self) -> None:
        """Forget the dead letters of records the database's offsets passed."""
        expected = self.expected
        self.dead_lettered = {(p, offset) for p, offset in self.dead_lettered
                              if expected.get(p) is None or offset >= expected[p]}

    async def _dead_letters(self, refused: list) -> None:
        for record, reason, message in refused:
            if (record.partition, record.offset) in self.dead_lettered:
                continue  # sent before a retry read it again
            headers = dead_letter_headers(reason=reason, message=message, source_topic=record.topic,
                                          pipeline=f"sink:{self.spec.name}", partition=record.partition,
                                          offset=record.offset)
            await kafka_io.producer.send_and_wait(dead_letters.get_topic_name(), record.value or b"",
                                                  key=record.key, headers=headers)
            self.dead_lettered.add((record.partition, record.offset))
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
