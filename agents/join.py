"""The live interval join of two topics: a pipeline whose first step is ``join``
(app/pipelines.py; semantics in docs/joins.md, "Live").

Per join pipeline ``P`` (left side: its ``source``; right side: the step's ``with``):

- ``pipeline.P.left`` and ``pipeline.P.right``: batch agents (app/batches.py) on the
  two topics, both handing their fetches to one ``JoinRunner``.
- State: the table ``pipeline-P-join`` (RocksDB + changelog), through the one state
  store (``tables.store``): per partition, each join key's buffered records
  (``{"l": [...], "r": [...]}``, operators.joins) and one bookkeeping value (stream
  time of each side, arrival sequence, the last offset applied per side, idle sides,
  and for re-keyed sides the last source offset applied per source partition). A ``WriteBackCache``
  registered with the commit protocol (``app.commit``) holds the changes until the
  commit (or, under exactly_once, the end of the batch), after the outputs.
- The index of buffered records by the time their interval closes is rebuilt from
  the store the first time a partition is used after an assignment, so retention
  (interval plus grace, driven by stream time) survives restarts and rebalances.
- Outputs through ``commit_protocol.emitter``: each joined record (after the steps
  that follow the join) to the pipeline's sink keyed by the join key; records past the
  grace to ``pipeline.P.late``; records without key or time to the dead-letter topic.

Co-partitioning: the two topics must have the same partition count (checked before
the first batch: a clear error stops the worker) and carry a key's records in the same
partition number on both sides (producers key both by the join key). Faust's assignor
gives topics of one partition count, read by the same workers, to one worker per
partition number, so partition ``p`` of both sides and of the state meet there.

Replays: the bookkeeping value remembers the last offset applied per side, written in
the same flush as the buffers (after them), so records replayed after a crash between
a flush and its offset commit (at_least_once) are not buffered twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import orjson

from agents.pipeline import COUNTERS, PIPELINES, PipelineCounters
from agents.window_aggregate import SRC_OFFSET, SRC_PARTITION, TICK_HEADER, caught_up, rekey_handler
from app import app, settings
from app.batches import Batch, batch_agent
from app.codec import RecordError, dumps_held, loads_object
from app.commit import CommitProtocol, Emitter, commit_protocol
from app.metrics import observe_flush
from app.pipelines import PipelineConfigError, PipelineSpec
from app.topics import declare
from operators.joins import LEFT, RIGHT, IntervalJoin, Joined, JoinSpec, merged, record_of
from operators.steps import Outcome, StepTally, pass_record, runnable
from operators.transform import RecordFailure
from tables.reference import reference_store
from tables.store import AtPartition, PartitionStore, WriteBackCache
from tables.windows import META_PREFIX, RAW_SCHEMA, meta_key

log = logging.getLogger(__name__)

SIDE_NAMES = {LEFT: "left", RIGHT: "right"}
#: Keys Faust itself writes into a table's RocksDB partitions.
FAUST_KEY_PREFIX = b"__faust"


class JoinConfigError(PipelineConfigError):
    """The two sides of a join cannot be joined as they are (e.g. partition counts)."""


def check_copartitioned(name: str, left: str, left_count: int | None, right: str, right_count: int | None) -> None:
    """Both sides of a join exist with the same partition count, or JoinConfigError."""
    if left_count is None or right_count is None:
        missing = left if left_count is None else right
        raise JoinConfigError(f"pipeline {name!r}: join: topic {missing!r} does not exist")
    if left_count != right_count:
        raise JoinConfigError(
            f"pipeline {name!r}: join: {left!r} has {left_count} partitions and {right!r} {right_count}; "
            "a join needs both sides co-partitioned: the same partition count, keyed by the join key")


async def check_topics_copartitioned(name: str, left: str, right: str) -> None:
    """``check_copartitioned`` with the two topics' partition counts from the broker."""
    from app.kafka_io import kafka_io

    await kafka_io.ready.wait()
    check_copartitioned(name, left, await kafka_io.partition_count(left), right, await kafka_io.partition_count(right))


class PartitionBuffers(MutableMapping):
    """One partition's buffers (join key -> ``{"l": […], "r": […]}``) as the mapping
    ``IntervalJoin`` works on, over the runner's write-back cache (cache key: the
    partition and the join key; stored key: the join key's text)."""

    def __init__(self, cache: WriteBackCache, store: Any, partition: int) -> None:
        self.cache, self.store, self.partition = cache, store, partition
        self._at = AtPartition(partition)

    def _load(self, key: str) -> Any:
        return self.store.read(self._at, key.encode())

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cache.get((self.partition, key), lambda: self._load(key))
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.cache.put((self.partition, key), value, self.partition)

    def __delitem__(self, key: str) -> None:
        # None is written as a delete (a changelog tombstone) by the flush.
        self.cache.put((self.partition, key), None, self.partition)

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        """Every buffered key of the partition: the cached values first (they may be
        newer than the store), then the stored ones."""
        p = self.partition
        seen: set[str] = set()
        for (cp, key), value in list(self.cache.cached.items()):
            if cp == p:
                seen.add(key)
                if value is not None:
                    yield key, value
        for raw_key, raw in self.store.scan_partition(p):
            # Not a join key: the partition's bookkeeping, or what Faust keeps in each
            # RocksDB partition (its changelog offset, under ``__faust\0offset__``).
            if raw_key.startswith(META_PREFIX) or raw_key.startswith(FAUST_KEY_PREFIX):
                continue
            key = raw_key.decode()
            if key not in seen:
                value = orjson.loads(raw)
                if value.__class__ is dict:
                    yield key, value

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def stored_key(cache_key: Hashable) -> bytes:
    return cache_key[1].encode()  # type: ignore[index]


class AfterJoin:
    """The StepContext of the stateless steps after a join, stream-stream or
    stream-table (enrich looks up reference data; nothing is remembered)."""

    def memory(self, step_index: int) -> Any:
        raise RuntimeError("no state after a join")

    def lookup(self, source: str, key: str) -> Any:
        return reference_store.lookup(source, key)

    def now(self) -> float:
        return time.time()

    def next_seq(self) -> int:
        return 0


class TwoInputRunner:
    """The life cycle both join runners share (``JoinRunner`` here, the stream-table
    ``agents.table_join.TableJoinRunner``): the state cache over the store, registered
    with the commit protocol; the co-partitioning check of the two topics before the
    first batch; each partition's state built from the store the first time it is used
    after partitions moved (``mark_stale``; ``state(p)`` calls the runner's ``load``
    with the partition's bookkeeping value and buffers); and a batch's end: outputs,
    dead letters, then the state handed to the commit protocol.

    ``names``: the two topics by side, the state's partitions following the first."""

    #: Flush inside a batch once this many keys are dirty (bounds memory).
    MAX_DIRTY = 50_000

    def __init__(self, spec: PipelineSpec, table: Any, names: dict[str, str], *, store: Any = None,
                 commit: CommitProtocol | None = None, counters: PipelineCounters | None = None) -> None:
        """``store``: the state store (default: ``table``'s; tests give a
        ``tables.store.MemoryStore``); ``commit``: the commit protocol the state cache
        registers with (default: the worker's), whose emitter sends the outputs."""
        self.pipeline = spec
        self.names = names
        self.store = store if store is not None else PartitionStore(table, next(iter(names.values())))
        self.commit = commit or commit_protocol
        self.emitter: Emitter = self.commit.emitter
        self.cache = self.commit.register(WriteBackCache(self.store, str_keys=True, key_bytes=stored_key,
                                                         max_dirty=self.MAX_DIRTY))
        self.counters = counters or PipelineCounters(steps=StepTally(spec.steps[1:]))
        self.steps = runnable(spec.steps[1:])
        self.tally = self.counters.steps
        self.ctx = AfterJoin()
        self.stats: Counter[str] = Counter()
        self.checked = False
        self.stale = True
        #: partition -> its state (``load``), built when first used after a move.
        self.states: dict[int, Any] = {}
        self._reset()

    def _reset(self) -> None:
        # Partitions moved (the commit protocol flushed and emptied the cache).
        self.cache.clear()
        self.states = {}
        self.forget()
        self.stale = False

    def forget(self) -> None:
        """Partitions moved: drop the runner's own per-partition bookkeeping."""

    def load(self, p: int, meta: dict[str, Any], buffers: PartitionBuffers) -> Any:
        """Partition ``p``'s state from its stored bookkeeping value and buffers."""
        raise NotImplementedError

    def mark_stale(self) -> None:
        """Called on rebalance: rebuild the partitions' state from the store before the
        next batch."""
        self.stale = True

    async def check_partitions(self) -> None:
        first, second = self.names.values()
        await check_topics_copartitioned(self.pipeline.name, first, second)
        self.checked = True

    async def begin_batch(self) -> None:
        if not self.checked:
            await self.check_partitions()
        if self.stale:
            self._reset()

    def state(self, p: int) -> Any:
        state = self.states.get(p)
        if state is None:
            meta = self.store.read(AtPartition(p), meta_key(p)) or {}
            state = self.states[p] = self.load(p, meta, PartitionBuffers(self.cache, self.store, p))
        return state

    async def end_batch(self, out: list, sources: list[tuple[int, int]], dead: list[tuple[Any, ...]],
                        source_topic: str | None = None) -> None:
        """Outputs (delivered before this batch is acked and before any state is flushed:
        the commit protocol waits for the emitter first; under exactly_once in the
        transaction of the input partition each output comes from, ``sources``), then
        the dead letters ((partition, key, value, reason, message, step, offset, source
        topic or None: ``source_topic``)), then the state to the commit protocol."""
        self.counters.dead_lettered += len(dead)
        await self.emitter.send_later(out, sources)
        for p, key, value, reason, message, step, offset, source in dead:
            await self.emitter.dead_letter(key, value, reason=reason, message=message,
                                           source_topic=source or source_topic, pipeline=self.pipeline.name,
                                           step=step, partition=p, offset=offset)
        await self.commit.end_batch(self.cache)


class JoinRunner(TwoInputRunner):
    """The state and processing of one join pipeline on this worker."""

    def __init__(self, spec: PipelineSpec, table: Any, sink: Any, late: Any, *, left_name: str, right_name: str,
                 store: Any = None, commit: CommitProtocol | None = None,
                 counters: PipelineCounters | None = None, topics: dict[str, Any] | None = None) -> None:
        """As ``TwoInputRunner``; ``topics``: the two sides' topics by side (where idle
        ticks go)."""
        assert spec.join is not None
        super().__init__(spec, table, {LEFT: left_name, RIGHT: right_name}, store=store, commit=commit,
                         counters=counters)
        self.spec: JoinSpec = spec.join
        self.cache.on_flush = self._flushed
        self.sink, self.late = sink, late
        self.topics = topics or {}
        #: Re-keyed: the source topics too (records waiting there are not idleness).
        self.source_names: set[str] = set()
        #: Idle sides (``idle_close``): the monotonic time of the last input per (side,
        #: partition); the last tick sent; the ones marked idle with no input since.
        self.clock = time.monotonic
        self.last_activity: dict[tuple[str, int], float] = {}
        self.last_tick: dict[tuple[str, int], float] = {}
        self.idle_marked: set[tuple[str, int]] = set()
        #: Outputs are written as they are (no steps read them, nested): a record
        #: buffered with its bytes is written as it arrived (operators.joins.Held).
        self.encoded_outputs = not self.steps and self.spec.prefixes is None
        #: pairs, unmatched, late, limited, left, right, replayed_skipped (``stats``).
        #: State flushes: how many, their seconds in all and the longest (a flush holds
        #: the next batch back: the join's latency).
        self.flushes = {"count": 0, "seconds": 0.0, "max_s": 0.0}
        #: Wall times of the first batch's start and the last batch's end (rates).
        self.first_batch_at: float | None = None
        self.last_batch_at: float | None = None

    def mark_stale(self) -> None:
        super().mark_stale()
        self.last_activity.clear()
        self.last_tick.clear()
        self.idle_marked.clear()

    def forget(self) -> None:
        #: partition -> {"l": last offset applied, "r": …}
        self.applied: dict[int, dict[str, int]] = {}
        #: Re-keyed sides: partition -> side -> source partition (text) -> the last
        #: source offset applied (a record repeated in the keyed topic is skipped).
        self.applied_src: dict[int, dict[str, dict[str, int]]] = {}

    def load(self, p: int, meta: dict[str, Any], buffers: PartitionBuffers) -> IntervalJoin:
        times = {side: t for side, t in meta.get("t", {}).items() if t is not None}
        self.applied[p] = {LEFT: -1, RIGHT: -1, **meta.get("o", {})}
        self.applied_src[p] = {LEFT: {}, RIGHT: {}, **meta.get("so", {})}
        # The index of closing intervals is rebuilt from the stored buffers here.
        return IntervalJoin(self.spec, buffers, times, meta.get("seq", 0), meta.get("i", ()),
                            encoded_outputs=self.encoded_outputs)

    def _flushed(self, seconds: float) -> None:
        flushes = self.flushes
        flushes["count"] += 1
        flushes["seconds"] += seconds
        flushes["max_s"] = max(flushes["max_s"], seconds)
        observe_flush(f"join-{self.pipeline.name}", seconds)

    def _meta_changed(self, p: int) -> None:
        join = self.states[p]
        # -inf (a side not seen yet) is not JSON: None.
        times = {side: None if t == -math.inf else t for side, t in join.times.items()}
        meta = {"t": times, "seq": join.seq, "o": dict(self.applied[p])}
        if self.spec.repartition:
            meta["so"] = self.applied_src[p]
        if join.idle:
            meta["i"] = sorted(join.idle)
        self.cache.put_side(meta_key(p), meta, p)

    def output_key(self, record: dict[str, Any]) -> bytes:
        """The output key: the join key (a text value as it is, anything else as JSON)."""
        on = self.spec.on
        value = record.get(on[0]) if len(on) == 1 else [record.get(f) for f in on]
        if value.__class__ is str:
            return value.encode()
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

    def key_of(self, joined: Joined) -> bytes:
        """``output_key`` of a join result, from the join key's text it carries (the
        JSON of the key value(s), ``operators.joins.join_key``): no side decoded."""
        text = joined.key
        if text is None:
            return self.output_key(record_of(joined.left if joined.left is not None else joined.right))
        if text[0] == '"' and len(self.spec.on) == 1:
            return orjson.loads(text).encode()  # a text value as it is
        return text.encode()

    def _outputs(self, results: list[Joined], out: list, dead: list, p: int) -> None:
        spec, steps, tally, counters = self.spec, self.steps, self.tally, self.counters
        encoded = self.encoded_outputs
        # Timestamps are capped at this worker's clock: a broker refuses a record more
        # than message.timestamp.after.max.ms ahead of its own (1 h by default since
        # Kafka 4.0), and the refusal stopped the worker at every restart (a pair of
        # future event times was a poison pill).
        now_ms = int(time.time() * 1000)
        for joined in results:
            record = merged(joined, spec, encoded=encoded)
            key = self.key_of(joined)
            if steps:
                outcome = pass_record(steps, record, self.ctx)
                if outcome.__class__ is Outcome:
                    tally.add(outcome)  # type: ignore[arg-type]
                    if outcome.dropped:  # type: ignore[union-attr]
                        counters.dropped[outcome.dropped] = counters.dropped.get(outcome.dropped, 0) + 1  # type: ignore[union-attr]
                    else:
                        dead.append((p, key, dumps_held(record), "step_failed", outcome.failed or "",  # type: ignore[union-attr]
                                     outcome.step.label, None, None))  # type: ignore[union-attr]
                    continue
                record = outcome
            tally.completed += 1
            # The record's timestamp is the pair's time (the later of the two).
            out.append((self.sink, key, dumps_held(record), (), min(round(joined.time * 1000), now_ms)))

    def _late(self, side: str, p: int, ev: Any, join: IntervalJoin) -> tuple[Any, bytes | None, bytes, list]:
        headers = [
            ("late.reason", b"past_grace"),
            ("late.pipeline", self.pipeline.name.encode()),
            ("late.side", SIDE_NAMES[side].encode()),
            ("late.stream_time", repr(join.stream_time).encode()),
            ("late.grace_s", repr(self.spec.grace).encode()),
            ("late.src_partition", str(p).encode()),
            ("late.src_offset", str(ev.offset).encode()),
        ]
        return self.late, ev.key, ev.value, headers

    async def process(self, side: str, parts: Iterable[tuple[int, Sequence[Any]]]) -> None:
        """One fetch of one side: join each record, emit pairs, closed unmatched
        records and late ones (outputs before state: the emitter's sends are acknowledged
        before any flush), then hand the state to the commit protocol.

        ``parts``: (partition, its aiokafka records in offset order)."""
        await self.begin_batch()
        self.first_batch_at = self.first_batch_at or time.time()
        counters, stats = self.counters, self.stats
        out: list[tuple[Any, ...]] = []
        #: (partition, key, value, reason, message, step, offset, source topic)
        dead: list[tuple[Any, ...]] = []
        sources: list[tuple[int, int]] = []
        topic = self.names[side]
        clock_now = self.clock()
        for p, records in parts:
            if not records:
                continue
            join = self.state(p)
            applied = self.applied[p]
            last = applied[side]
            sources.append((p, len(out)))
            counts = join.counts
            before = (counts.pairs, counts.unmatched, counts.late, counts.limited)
            ticks = 0
            active = False
            src_applied = self.applied_src[p][side] if self.spec.repartition else None
            for ev in records:
                offset = ev.offset
                if offset <= last:
                    stats["replayed_skipped"] += 1
                    continue
                last = offset
                headers = ev.headers
                if headers:
                    headers = dict(headers)
                    if TICK_HEADER in headers:
                        ticks += 1
                        self._tick(side, p, join, clock_now, out, dead)
                        continue
                    if src_applied is not None and SRC_PARTITION in headers:
                        # Re-keyed: a record the rekey step sent again after a crash (its
                        # source offset was not committed) is here twice; skip the repeat.
                        src_p, src_offset = headers[SRC_PARTITION].decode(), int(headers[SRC_OFFSET])
                        if src_offset <= src_applied.get(src_p, -1):
                            ticks += 1  # not input either
                            stats["replayed_skipped"] += 1
                            continue
                        src_applied[src_p] = src_offset
                if not active:
                    active = True
                    self.last_activity[(side, p)] = clock_now
                    self.idle_marked.discard((side, p))
                counters.into += 1
                try:
                    record = loads_object(ev.value)
                    results = join.add(side, record, ev.value)
                except RecordError as exc:
                    dead.append((p, ev.key, ev.value, exc.reason, str(exc), "parse", offset, topic))
                    continue
                except RecordFailure as exc:
                    dead.append((p, ev.key, ev.value, "step_failed", str(exc), "0:join", offset, topic))
                    continue
                if results is None:
                    out.append(self._late(side, p, ev, join))
                elif results:
                    self._outputs(results, out, dead, p)
            applied[side] = last
            self._meta_changed(p)
            stats[SIDE_NAMES[side]] += len(records) - ticks
            for name, was, now in zip(("pairs", "unmatched", "late", "limited"), before,
                                      (counts.pairs, counts.unmatched, counts.late, counts.limited), strict=True):
                stats[name] += now - was
        counters.out += sum(1 for item in out if item[0] is self.sink)
        await self.end_batch(out, sources, dead, self.names[LEFT])
        self.last_batch_at = time.time()

    # --- idle sides (``idle_close``) ------------------------------------------------

    def _tick(self, side: str, p: int, join: IntervalJoin, now: float, out: list, dead: list) -> None:
        """A tick read from ``side``'s partition ``p``: unless input arrived since it was
        sent, the side is idle (``IntervalJoin.mark_idle``); the unmatched records that
        closes are emitted as the closes of ``add`` are."""
        if now - self.last_activity.setdefault((side, p), now) < self.spec.idle_close:
            return
        self.idle_marked.add((side, p))
        results = join.mark_idle(side)  # counted in join.counts, as closes by add are
        self.stats["idle_marked"] += 1
        if results:
            self._outputs(results, out, dead, p)

    def due_ticks(self, now: float, assigned: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (side, partition)s to send a tick to now: without input for
        ``idle_close`` seconds, not marked idle since their last input, and no tick sent
        to them within ``idle_close``."""
        idle_close = self.spec.idle_close
        due = []
        for at in assigned:
            last = self.last_activity.setdefault(at, now)
            if now - last < idle_close or at in self.idle_marked:
                continue
            if now - self.last_tick.get(at, -math.inf) < idle_close:
                continue
            self.last_tick[at] = now
            due.append(at)
        return due

    async def tick(self) -> None:
        """Timer (``idle_close``): a tick into each side's partition that is idle, once
        this worker has read both topics to their end (waiting records are not
        idleness). Like a window's tick, it is read as input, so what it closes is
        emitted, and committed, inside normal processing."""
        if not app.tables.recovery.completed.is_set() or app.rebalancing:
            return
        names = self.names
        if not caught_up(set(names.values()) | self.source_names):
            return
        assigned = [(side, tp.partition) for tp in app.consumer.assignment()
                    for side in (LEFT, RIGHT) if tp.topic == names[side]]
        for side, p in self.due_ticks(self.clock(), assigned):
            await self.emitter.tick(self.topics[side], p, [(TICK_HEADER, b"1")])

    def describe(self) -> dict[str, Any]:
        """The join's counters on this worker (GET /api/v1/pipelines)."""
        return {"with": self.pipeline.join_with, "late_topic": settings.topic(self.pipeline.late_topic),
                **{k: self.stats.get(k, 0) for k in ("left", "right", "pairs", "unmatched", "late", "limited")},
                "replayed_skipped": self.stats.get("replayed_skipped", 0),
                "idle_marked": self.stats.get("idle_marked", 0),
                "flushes": {k: round(v, 3) for k, v in self.flushes.items()},
                "first_batch_at": self.first_batch_at, "last_batch_at": self.last_batch_at}


#: pipeline name -> its join runner, for the web views and tests.
JOINS: dict[str, JoinRunner] = {}


def build(spec: PipelineSpec) -> JoinRunner:
    """Declare the topics, table and agents of one join pipeline."""
    assert spec.join is not None and spec.join_with is not None
    source_left, source_right = declare(spec.source), declare(spec.join_with)
    if spec.join.repartition:
        # Each side re-keyed by the join key into an internal topic, through the rekey
        # step of windows; both internal topics have the app's partition count and one
        # partitioner, so a key's records of both sides meet in one partition number.
        left, right = declare(spec.keyed_topic("left")), declare(spec.keyed_topic("right"))
    else:
        left, right = source_left, source_right
    sink, late = declare(spec.output_topic), declare(spec.late_topic)
    table = state_table(spec, "join", f"join buffers of pipeline {spec.name}")
    runner = JoinRunner(spec, table, sink, late, left_name=left.get_topic_name(),
                        right_name=right.get_topic_name(), counters=pipeline_counters(spec),
                        topics={LEFT: left, RIGHT: right})
    JOINS[spec.name] = registered(runner)

    async def run_left(records: Batch) -> None:
        await ready_for(spec)
        await runner.process(LEFT, [(tp.partition, part) for tp, part in records.parts])

    async def run_right(records: Batch) -> None:
        await ready_for(spec)
        await runner.process(RIGHT, [(tp.partition, part) for tp, part in records.parts])

    batch_agent(left, name=f"pipeline.{spec.name}.left")(run_left)
    batch_agent(right, name=f"pipeline.{spec.name}.right")(run_right)
    if spec.join.repartition:
        runner.source_names = {source_left.get_topic_name(), source_right.get_topic_name()}

        def forward(r: Any) -> tuple[bytes, bytes]:
            # A record without the key field is forwarded keyed by null; the join
            # dead-letters it as it does an unkeyed record of a co-partitioned side.
            return runner.output_key(loads_object(r.value)), r.value

        for side, source, keyed in ((LEFT, source_left, left), (RIGHT, source_right, right)):
            batch_agent(source, name=f"pipeline.{spec.name}.{SIDE_NAMES[side]}-rekey")(
                rekey_handler(keyed, forward, pipeline=spec.name, step="0:join"))
    if spec.join.idle_close > 0:
        async def idle_tick() -> None:
            await runner.tick()

        app.timer(max(0.2, spec.join.idle_close / 4), name=f"pipeline.{spec.name}.idle")(idle_tick)
    return runner


def state_table(spec: PipelineSpec, kind: str, help: str) -> Any:
    """The changelog-backed table of a join pipeline's state (``pipeline-<name>-<kind>``)."""
    return app.Table(f"pipeline-{spec.name}-{kind}", partitions=settings.topic_partitions,
                     key_type=bytes, value_type=bytes, schema=RAW_SCHEMA, help=help)


def pipeline_counters(spec: PipelineSpec) -> PipelineCounters:
    """The counters of a join pipeline (GET /api/v1/pipelines), the pipeline registered."""
    counters = COUNTERS.setdefault(spec.name, PipelineCounters())
    counters.steps = StepTally(spec.steps[1:])
    PIPELINES[spec.name] = spec
    return counters


#: Every join runner of this worker (both kinds), marked stale when partitions move.
RUNNERS: list[TwoInputRunner] = []


def registered(runner: Any) -> Any:
    """``runner`` (a ``TwoInputRunner``) counted in its pipeline's counters
    (``counters.join``) and rebuilt from the store after partitions moved."""
    runner.counters.join = runner.describe
    RUNNERS.append(runner)
    return runner


async def ready_for(spec: PipelineSpec) -> None:
    """Wait until the reference data an ``enrich`` after the join reads is loaded."""
    if any(s.op == "enrich" and s.params.source for s in spec.steps):
        await reference_store.caught_up.wait()


async def _on_moved(*args: Any, **kwargs: Any) -> None:
    # The commit protocol writes what is unwritten and empties the caches on revoke
    # and assign (app.commit); each runner rebuilds from the store before its next batch.
    for runner in RUNNERS:
        runner.mark_stale()


app.on_partitions_revoked.connect(_on_moved)
app.on_partitions_assigned.connect(_on_moved)

__all__ = ["JOINS", "RUNNERS", "JoinConfigError", "JoinRunner", "PartitionBuffers", "TwoInputRunner", "build",
           "check_copartitioned", "pipeline_counters", "ready_for", "registered", "state_table"]
