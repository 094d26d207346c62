"""The live temporal stream-table join: a pipeline whose first step is ``join`` with
``with_table`` (semantics: operators/table_join.py and docs/joins.md, "Stream-table
joins").

Per pipeline ``P`` (the stream: its ``source``; the table: a topic of rows keyed by the
key, or the topic a materialized table is read from, resolved by app.pipelines):

- ``pipeline.P.stream`` and ``pipeline.P.table``: batch agents (app/batches.py) on the
  two topics, both handing their fetches to one ``TableJoinRunner``.
- State: the table ``pipeline-P-table`` (RocksDB + changelog) through the one state
  store (``tables.store``): per partition, each key's versions (``{"v": [[t, row],
  …]}``, the row null for a tombstone; one version under ``as_of: latest``) and one
  bookkeeping value (the table time and the last table offset applied). A
  ``WriteBackCache`` registered with the commit protocol (``app.commit``) holds the
  changes until the commit (under exactly_once, the end of the batch), after the
  outputs. The pruning index (which keys have versions older than the history) is
  rebuilt from the store the first time a partition is used after an assignment.
- Outputs through ``commit_protocol.emitter``: each joined stream record (after the
  steps that follow the join) to the pipeline's sink keyed as the stream record was;
  records that are not JSON or lack the key (stream or table) to the dead-letter topic.

Co-partitioning, as the interval join (agents/join.py): the two topics must have the
same partition count (checked before the first batch) and carry a key's records in the
same partition number, so partition ``p`` of the stream, of the table topic and of the
state meet on one worker.

After each assignment a stream partition is held (not fetched, not delivered:
``app.transport.PartitionHolds``) until its table partition is read to the end offset
it had then, so the stream's records meet every table record written before the
worker took the partition over (at a start with a backlog on both topics, after a
restart or a move), as a GlobalKTable is read whole before processing starts. The
table's own batches are not held; they are what the stream waits for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from faust.types import TP

from agents.join import (
    PartitionBuffers,
    TwoInputRunner,
    pipeline_counters,
    ready_for,
    registered,
    state_table,
)
from agents.pipeline import PipelineCounters
from app import app
from app.batches import Batch, batch_agent
from app.codec import RecordError, dumps_held, loads_object
from app.commit import CommitProtocol
from app.pipelines import PipelineSpec
from app.topics import declare
from app.transport import HELD_PARTITIONS
from operators.cdc import ChangeError
from operators.steps import Outcome, pass_record
from operators.table_join import TableJoinSpec, VersionedTable, output, table_record
from operators.transform import RecordFailure
from tables.windows import meta_key

log = logging.getLogger(__name__)

STREAM, TABLE = "stream", "table"

#: Seconds between two looks at whether a held stream partition's table is read.
CATCH_UP_CHECK = 0.05
#: A stream partition held this long is logged (its table partition is not readable).
HELD_WARNING_SECONDS = 30.0


class TableJoinRunner(TwoInputRunner):
    """The state and processing of one stream-table join pipeline on this worker."""

    def __init__(self, spec: PipelineSpec, table: Any, sink: Any, *, stream_name: str, table_name: str,
                 store: Any = None, commit: CommitProtocol | None = None,
                 counters: PipelineCounters | None = None) -> None:
        """As ``TwoInputRunner``."""
        assert isinstance(spec.join, TableJoinSpec)
        super().__init__(spec, table, {STREAM: stream_name, TABLE: table_name}, store=store, commit=commit,
                         counters=counters)
        self.spec: TableJoinSpec = spec.join
        self.sink = sink
        #: stream, table, pairs, unmatched, beyond_history, table_late, replayed_skipped
        #: (``stats``); partition -> its VersionedTable (``states``).
        #: Held stream partition -> the end offset its table partition must be read to
        #: (None until asked), since the last assignment.
        self.catching_up: dict[int, int | None] = {}
        self._release_task: asyncio.Future | None = None

    def forget(self) -> None:
        #: partition -> the last table offset applied
        self.applied: dict[int, int] = {}

    def load(self, p: int, meta: dict[str, Any], buffers: PartitionBuffers) -> VersionedTable:
        tt = meta.get("tt")
        self.applied[p] = meta.get("o", -1)
        # The pruning index is rebuilt from the stored versions here.
        return VersionedTable(self.spec, buffers, -math.inf if tt is None else tt)

    def _meta_changed(self, p: int) -> None:
        tt = self.states[p].table_time
        self.cache.put_side(meta_key(p), {"tt": None if not math.isfinite(tt) else tt, "o": self.applied[p]}, p)

    async def process(self, side: str, parts: Iterable[tuple[int, Sequence[Any]]]) -> None:
        """One fetch of one side: table records change the versions; stream records
        are joined and emitted (outputs before state: the emitter's sends are
        acknowledged before any flush); then the state goes to the commit protocol.

        ``parts``: (partition, its aiokafka records in offset order)."""
        await self.begin_batch()
        out: list[tuple[Any, ...]] = []
        #: (partition, key, value, reason, message, step, offset, source topic)
        dead: list[tuple[Any, ...]] = []
        sources: list[tuple[int, int]] = []
        for p, records in parts:
            if not records:
                continue
            joined = self.state(p)
            if side == TABLE:
                self._apply_table(p, joined, records, dead)
            else:
                sources.append((p, len(out)))
                self._join_stream(p, joined, records, out, dead)
        self.counters.out += len(out)
        await self.end_batch(out, sources, dead)

    def hold_assigned(self, assigned: Iterable[TP], unheld: Collection[str] = ()) -> None:
        """Hold each assigned stream partition until its table partition is read to the
        end offset it has now (``release_when_read``); not when the stream topic is in
        ``unheld`` (``streams_never_held``)."""
        self.release_all()
        stream = self.names[STREAM]
        if stream in unheld:
            log.warning("pipeline %s: its stream %s is, through other joins, its own table's table; it is "
                        "not held after an assignment", self.pipeline.name, stream)
            return
        held = sorted(tp.partition for tp in assigned if tp.topic == stream)
        if not held:
            return
        self.catching_up = dict.fromkeys(held)
        HELD_PARTITIONS.hold(self, (TP(stream, p) for p in held))
        self._release_task = app.add_future(self.release_when_read())

    def release_all(self) -> None:
        """Hold nothing (partitions moved, or the worker stops)."""
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        HELD_PARTITIONS.release(self, (TP(self.names[STREAM], p) for p in self.catching_up))
        self.catching_up = {}

    async def release_when_read(self, consumer: Any = None) -> None:
        """Release each held stream partition once its table partition was read to its
        end offset of the assignment: every record before it delivered
        (``FastConsumer.delivered_to``: the fetch position, which moves past transaction
        markers and aborted records, and starts at the committed offset, whose records
        were applied before their commit)."""
        consumer = consumer or app.consumer
        stream, table = self.names[STREAM], self.names[TABLE]
        started = warned = time.monotonic()
        unknown: set[int] = set()  # partitions whose end could not be asked (logged once)
        while self.catching_up:
            for p, end in list(self.catching_up.items()):
                tp = TP(table, p)
                try:
                    if tp not in consumer.assignment():
                        log.warning("pipeline %s: table partition %s[%d] is not assigned with its stream "
                                    "partition; the stream is not held", self.pipeline.name, table, p)
                        end = 0
                    elif end is None:
                        end = self.catching_up[p] = (await consumer.highwaters(tp))[tp]
                    read = end == 0 or consumer.delivered_to(tp, end)
                except Exception as exc:  # noqa: BLE001 - the broker away, a rebalance: ask again
                    # (a failure here must not crash the worker: mode's add_future would)
                    if p not in unknown:
                        unknown.add(p)
                        log.info("pipeline %s: table partition %d's end not known yet: %r", self.pipeline.name,
                                 p, exc)
                    read = False
                if read and p in self.catching_up:
                    del self.catching_up[p]
                    HELD_PARTITIONS.release(self, [TP(stream, p)])
                    log.info("pipeline %s: stream partition %d released, its table read to offset %d (%.2f s)",
                             self.pipeline.name, p, end, time.monotonic() - started)
            if self.catching_up and time.monotonic() - warned > HELD_WARNING_SECONDS:
                warned = time.monotonic()
                log.warning("pipeline %s: stream partitions %s still wait for their table partitions' ends %s",
                            self.pipeline.name, sorted(self.catching_up), self.catching_up)
            await asyncio.sleep(CATCH_UP_CHECK)

    def _apply_table(self, p: int, joined: VersionedTable, records: Sequence[Any], dead: list) -> None:
        stats, spec, topic = self.stats, self.spec, self.names[TABLE]
        last = self.applied[p]
        late = joined.counts.table_late
        for ev in records:
            offset = ev.offset
            if offset <= last:
                # Applied before a crash that came before its offset commit
                # (at_least_once): a second apply could undo a later same-time update.
                stats["replayed_skipped"] += 1
                continue
            last = offset
            try:
                change = table_record(spec, ev.key, ev.value, ev.timestamp / 1000.0)
            except ChangeError as exc:
                dead.append((p, ev.key, ev.value, exc.reason, str(exc), "0:join:table", offset, topic))
                continue
            joined.update(change)
            stats[TABLE] += 1
        stats["table_late"] += joined.counts.table_late - late
        self.applied[p] = last
        self._meta_changed(p)

    def _join_stream(self, p: int, joined: VersionedTable, records: Sequence[Any], out: list, dead: list) -> None:
        spec, steps, tally, counters, stats = self.spec, self.steps, self.tally, self.counters, self.stats
        topic, sink = self.names[STREAM], self.sink
        counts = joined.counts
        before = (counts.pairs, counts.unmatched, counts.beyond_history)
        for ev in records:
            counters.into += 1
            try:
                result = joined.join(loads_object(ev.value))
            except RecordError as exc:
                dead.append((p, ev.key, ev.value, exc.reason, str(exc), "parse", ev.offset, topic))
                continue
            except RecordFailure as exc:
                dead.append((p, ev.key, ev.value, "step_failed", str(exc), "0:join", ev.offset, topic))
                continue
            if result is None:
                counters.dropped["no_row"] = counters.dropped.get("no_row", 0) + 1
                continue
            record = output(result, spec)
            if steps:
                outcome = pass_record(steps, record, self.ctx)
                if outcome.__class__ is Outcome:
                    tally.add(outcome)  # type: ignore[arg-type]
                    if outcome.dropped:  # type: ignore[union-attr]
                        counters.dropped[outcome.dropped] = counters.dropped.get(outcome.dropped, 0) + 1  # type: ignore[union-attr]
                    else:
                        dead.append((p, ev.key, dumps_held(record), "step_failed", outcome.failed or "",  # type: ignore[union-attr]
                                     outcome.step.label, None, topic))  # type: ignore[union-attr]
                    continue
                record = outcome
            tally.completed += 1
            # Keyed and timed as the stream record: the output is that record, enriched.
            out.append((sink, ev.key, dumps_held(record), (), ev.timestamp))
        stats[STREAM] += len(records)
        for name, was, now in zip(("pairs", "unmatched", "beyond_history"), before,
                                  (counts.pairs, counts.unmatched, counts.beyond_history), strict=True):
            stats[name] += now - was

    def describe(self) -> dict[str, Any]:
        """The join's counters on this worker (GET /api/v1/pipelines)."""
        return {"with_table": self.pipeline.join_with, "table_topic": self.names[TABLE], "as_of": self.spec.as_of,
                **{k: self.stats.get(k, 0) for k in ("stream", "table", "pairs", "unmatched", "beyond_history",
                                                      "table_late", "replayed_skipped")},
                "held_partitions": sorted(self.catching_up)}


#: pipeline name -> its runner, for the web views and tests.
TABLE_JOINS: dict[str, TableJoinRunner] = {}


def streams_never_held(joins: Iterable[TableJoinRunner]) -> set[str]:
    """The stream topics of joins whose table is, through the joins, fed by their own
    stream: the topics of a cycle of stream -> table edges (A joins X with table Y, B
    joins Y with table X). Held, each would wait for the other for good; a chain only
    waits in turn, each end offset being fixed at the assignment."""
    edges: dict[str, set[str]] = {}
    for runner in joins:
        edges.setdefault(runner.names[STREAM], set()).add(runner.names[TABLE])
    never: set[str] = set()
    for stream in edges:
        seen, todo = set(), list(edges[stream])
        while todo:
            topic = todo.pop()
            if topic == stream:
                never.add(stream)
                break
            if topic not in seen:
                seen.add(topic)
                todo.extend(edges.get(topic, ()))
    return never


def _on_assigned(assigned: set[TP]) -> None:
    unheld = streams_never_held(TABLE_JOINS.values())
    for runner in TABLE_JOINS.values():
        runner.hold_assigned(assigned, unheld)


async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
    for runner in TABLE_JOINS.values():
        runner.release_all()


HELD_PARTITIONS.on_assign.append(_on_assigned)
app.on_partitions_revoked.connect(_on_revoked)


def build(spec: PipelineSpec) -> TableJoinRunner:
    """Declare the topics, table and agents of one stream-table join pipeline."""
    assert isinstance(spec.join, TableJoinSpec) and spec.join_with is not None
    stream, table_topic = declare(spec.source), declare(spec.join_with)
    sink = declare(spec.output_topic)
    table = state_table(spec, "table", f"the joined table's versions of pipeline {spec.name}")
    runner = TableJoinRunner(spec, table, sink, stream_name=stream.get_topic_name(),
                             table_name=table_topic.get_topic_name(), counters=pipeline_counters(spec))
    TABLE_JOINS[spec.name] = registered(runner)

    async def run_stream(records: Batch) -> None:
        await ready_for(spec)
        await runner.process(STREAM, [(tp.partition, part) for tp, part in records.parts])

    async def run_table(records: Batch) -> None:
        await runner.process(TABLE, [(tp.partition, part) for tp, part in records.parts])

    batch_agent(stream, name=f"pipeline.{spec.name}.stream")(run_stream)
    batch_agent(table_topic, name=f"pipeline.{spec.name}.table")(run_table)
    return runner


__all__ = ["TABLE_JOINS", "TableJoinRunner", "build", "streams_never_held"]
