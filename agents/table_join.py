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
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from agents.join import AfterJoin, PartitionBuffers, check_topics_copartitioned, stored_key
from agents.pipeline import COUNTERS, PIPELINES, PipelineCounters
from app import app, settings
from app.batches import Batch, batch_agent
from app.codec import RecordError, dumps_held, loads_object
from app.commit import CommitProtocol, Emitter, commit_protocol
from app.pipelines import PipelineSpec
from app.topics import declare
from operators.cdc import ChangeError
from operators.steps import Outcome, StepTally, pass_record, runnable
from operators.table_join import TableJoinSpec, VersionedTable, output, table_record
from operators.transform import RecordFailure
from tables.reference import reference_store
from tables.store import AtPartition, PartitionStore, WriteBackCache
from tables.windows import RAW_SCHEMA, meta_key

log = logging.getLogger(__name__)

STREAM, TABLE = "stream", "table"


class TableJoinRunner:
    """The state and processing of one stream-table join pipeline on this worker."""

    #: Flush inside a batch once this many keys are dirty (bounds memory).
    MAX_DIRTY = 50_000

    def __init__(self, spec: PipelineSpec, table: Any, sink: Any, *, stream_name: str, table_name: str,
                 store: Any = None, commit: CommitProtocol | None = None,
                 counters: PipelineCounters | None = None) -> None:
        """``store``: the state store (default: ``table``'s; tests give a
        ``tables.store.MemoryStore``); ``commit``: the commit protocol the state cache
        registers with (default: the worker's), whose emitter sends the outputs."""
        assert isinstance(spec.join, TableJoinSpec)
        self.pipeline = spec
        self.spec: TableJoinSpec = spec.join
        self.store = store if store is not None else PartitionStore(table, stream_name)
        self.commit = commit or commit_protocol
        self.emitter: Emitter = self.commit.emitter
        self.cache = self.commit.register(WriteBackCache(self.store, str_keys=True, key_bytes=stored_key,
                                                         max_dirty=self.MAX_DIRTY))
        self.sink = sink
        self.names = {STREAM: stream_name, TABLE: table_name}
        self.counters = counters or PipelineCounters(steps=StepTally(spec.steps[1:]))
        self.steps = runnable(spec.steps[1:])
        self.tally = self.counters.steps
        self.ctx = AfterJoin()
        #: stream, table, pairs, unmatched, beyond_history, table_late, replayed_skipped
        self.stats: Counter[str] = Counter()
        self.checked = False
        self.stale = True
        self._reset()

    def _reset(self) -> None:
        # Partitions moved (the commit protocol flushed and emptied the cache).
        self.cache.clear()
        self.tables: dict[int, VersionedTable] = {}
        #: partition -> the last table offset applied
        self.applied: dict[int, int] = {}
        self.stale = False

    def mark_stale(self) -> None:
        """Called on rebalance: rebuild the tables from the store before the next batch."""
        self.stale = True

    async def check_partitions(self) -> None:
        await check_topics_copartitioned(self.pipeline.name, self.names[STREAM], self.names[TABLE])
        self.checked = True

    def _table(self, p: int) -> VersionedTable:
        joined = self.tables.get(p)
        if joined is None:
            meta = self.store.read(AtPartition(p), meta_key(p)) or {}
            tt = meta.get("tt")
            # The pruning index is rebuilt from the stored versions here.
            joined = self.tables[p] = VersionedTable(self.spec, PartitionBuffers(self.cache, self.store, p),
                                                     -math.inf if tt is None else tt)
            self.applied[p] = meta.get("o", -1)
        return joined

    def _meta_changed(self, p: int) -> None:
        tt = self.tables[p].table_time
        self.cache.put_side(meta_key(p), {"tt": None if not math.isfinite(tt) else tt, "o": self.applied[p]}, p)

    async def process(self, side: str, parts: Iterable[tuple[int, Sequence[Any]]]) -> None:
        """One fetch of one side: table records change the versions; stream records
        are joined and emitted (outputs before state: the emitter's sends are
        acknowledged before any flush); then the state goes to the commit protocol.

        ``parts``: (partition, its aiokafka records in offset order)."""
        if not self.checked:
            await self.check_partitions()
        if self.stale:
            self._reset()
        out: list[tuple[Any, ...]] = []
        #: (partition, key, value, reason, message, step, offset, source topic)
        dead: list[tuple[Any, ...]] = []
        sources: list[tuple[int, int]] = []
        for p, records in parts:
            if not records:
                continue
            joined = self._table(p)
            if side == TABLE:
                self._apply_table(p, joined, records, dead)
            else:
                sources.append((p, len(out)))
                self._join_stream(p, joined, records, out, dead)
        counters = self.counters
        counters.dead_lettered += len(dead)
        counters.out += len(out)
        # Delivered before this batch is acked and before any state is flushed (the
        # commit protocol waits for the emitter first); under exactly_once in the
        # transaction of the input partition each output comes from (``sources``).
        await self.emitter.send_later(out, sources)
        for p, key, value, reason, message, step, offset, source in dead:
            await self.emitter.dead_letter(key, value, reason=reason, message=message, source_topic=source,
                                           pipeline=self.pipeline.name, step=step, partition=p, offset=offset)
        await self.commit.end_batch(self.cache)

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
                                                      "table_late", "replayed_skipped")}}


#: pipeline name -> its runner, for the web views and tests.
TABLE_JOINS: dict[str, TableJoinRunner] = {}


def build(spec: PipelineSpec) -> TableJoinRunner:
    """Declare the topics, table and agents of one stream-table join pipeline."""
    assert isinstance(spec.join, TableJoinSpec) and spec.join_with is not None
    stream, table_topic = declare(spec.source), declare(spec.join_with)
    sink = declare(spec.output_topic)
    table = app.Table(f"pipeline-{spec.name}-table", partitions=settings.topic_partitions,
                      key_type=bytes, value_type=bytes, schema=RAW_SCHEMA,
                      help=f"the joined table's versions of pipeline {spec.name}")
    counters = COUNTERS.setdefault(spec.name, PipelineCounters())
    counters.steps = StepTally(spec.steps[1:])
    PIPELINES[spec.name] = spec
    runner = TableJoinRunner(spec, table, sink, stream_name=stream.get_topic_name(),
                             table_name=table_topic.get_topic_name(), counters=counters)
    counters.join = runner.describe  # type: ignore[attr-defined]
    TABLE_JOINS[spec.name] = runner

    async def run_stream(records: Batch) -> None:
        await _ready(spec)
        await runner.process(STREAM, [(tp.partition, part) for tp, part in records.parts])

    async def run_table(records: Batch) -> None:
        await runner.process(TABLE, [(tp.partition, part) for tp, part in records.parts])

    batch_agent(stream, name=f"pipeline.{spec.name}.stream")(run_stream)
    batch_agent(table_topic, name=f"pipeline.{spec.name}.table")(run_table)
    return runner


async def _ready(spec: PipelineSpec) -> None:
    if any(s.op == "enrich" and s.params.source for s in spec.steps):
        await reference_store.caught_up.wait()


async def _on_moved(*args: Any, **kwargs: Any) -> None:
    # The commit protocol writes what is unwritten and empties the caches on revoke and
    # assign (app.commit); the tables are rebuilt from the store before the next batch.
    for runner in TABLE_JOINS.values():
        runner.mark_stale()


app.on_partitions_revoked.connect(_on_moved)
app.on_partitions_assigned.connect(_on_moved)

__all__ = ["TABLE_JOINS", "TableJoinRunner", "build"]
