"""One agent per configured pipeline: source topic → steps → sink topic.

A record that is not a JSON object, or fails a step, goes to the dead-letter topic
with the pipeline, step and reason in its headers; the pipeline keeps running.
Each pipeline is a batch agent (app/batches.py): it gets every record of a fetch at
once, and each batch's outputs are written together (``app.commit.OutputWriter``).

Deduplication state lives in a changelog-backed table per pipeline (RocksDB by
default). Faust writes a table change to the changelog partition of the event being
processed; the agent makes each event of a batch current before touching the table, and
deduplication is per source partition: producers must key duplicates alike (e.g.
``key_field`` = ``event_id`` or ``user_id`` in ``/api/v1/produce``) so they meet in
one partition. That state comes back from the changelog after a crash or rebalance,
so a restarted worker never re-admits a duplicate it had already seen.

Expiry: keys older than the horizon are deleted (tombstoned in the changelog, with the
batch's writes) while events of the same partition flow, a few per record
(``tables.store.Expiry``), in the order of an index on local disk (``ExpiryIndex``; in
memory for a memory store). A partition's index is kept across moves and clean stops,
and rebuilt from the stored entries when it may lack some (a crash, a restore into
the partition), so keys admitted before a restart or a rebalance expire too.
Outputs go through the one output path (``app.commit.emitter``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from app import app, settings
from app.batches import Batch, BatchRecord, batch_agent
from app.codec import RecordError, loads_object
from app.commit import Emitter, commit_protocol, emitter
from app.kafka_io import kafka_io
from app.pipelines import PipelineSpec
from app.topics import declare
from app.transport import stopped_clean
from operators.steps import Outcome, Step, StepTally, pass_record, run_change, runnable
from operators.transform import is_duplicate
from tables.local_state import write_file_durably
from tables.reference import reference_store
from tables.store import DedupeCache, Expiry, PartitionStore
from tables.windows import RAW_SCHEMA

log = logging.getLogger(__name__)

#: Expired keys deleted per record handled at most, so expiry never stalls the stream.
EXPIRE_PER_RECORD = 8
#: Other steps' entries passed over per batch and lane at most (an index kept from
#: before each dedupe step had one: ``DedupeExpiry``).
PASS_OVER_PER_BATCH = 10_000


@dataclass
class PipelineCounters:
    """Live counters of one pipeline on this worker."""

    into: int = 0
    out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    steps: StepTally = field(default_factory=lambda: StepTally([]))
    #: A join pipeline's join counters (agents/join.py: ``JoinRunner.describe``).
    join: Callable[[], dict[str, Any]] | None = None
    #: A deduplicating pipeline's expiry (``tables.store.Expiry.describe``).
    expiry: Callable[[], dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "in": self.into, "out": self.out, "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped), "dead_lettered": self.dead_lettered,
            "steps": [c.as_dict() for c in self.steps.counts()],
        }
        if self.join is not None:
            out["join"] = self.join()
        if self.expiry is not None:
            out["expiry"] = self.expiry()
        return out


class TableMemory:
    """Deduplication memory of one step over a Faust table (keys prefixed by step).

    Writes of a batch collect in the context's overlay and reach the table (RocksDB and
    changelog, one record batch per partition) only after the batch's outputs were
    acknowledged by the sink: a crash in between re-emits, it never loses a record.
    """

    def __init__(self, ctx: LiveContext, step: Step) -> None:
        self.ctx, self.prefix = ctx, step_prefix(step.index)
        lane = ctx.expiry.lane_of.get(self.prefix)
        #: With ``time_field``: the step's event-time clock by partition (``Horizon``).
        self.clock = None if lane is None else lane.horizon.clock

    def get(self, key: str) -> Sequence[Any] | None:
        """The stored ``[at, seq]`` of ``key`` (a Seen by position), or None."""
        return self.ctx.read(self.prefix + key.encode())

    def put(self, key: str, at: float, seq: int) -> None:
        # A tuple of atoms, not a list: CPython stops tracking such a tuple at the first
        # collection it survives (it lives until the batch is stored). Its expiry entry
        # is made when it is stored (``store_after``).
        ctx = self.ctx
        ctx.write(self.prefix + key.encode(), (at, seq))
        clock = self.clock
        if clock is not None and at > clock.get(ctx.partition, at - 1.0):
            clock[ctx.partition] = at


def step_prefix(step_index: int) -> bytes:
    """The prefix of a dedupe step's keys in the pipeline's table."""
    return f"{step_index}|".encode()


def _prefix_of(key: bytes) -> bytes:
    return key[:key.find(b"|") + 1]


@dataclass(frozen=True)
class Horizon:
    """How long one dedupe step's entries are kept: its ``horizon_seconds`` and
    ``horizon_count`` (the rule of ``operators.transform.is_duplicate``), and with
    ``time_field`` the clock its times are compared with: by partition, the latest event
    time the step admitted (None: the wall clock)."""

    seconds: float | None
    count: int | None
    clock: dict[int, float] | None

    @classmethod
    def of(cls, step: Step) -> Horizon:
        params = step.params
        return cls(params["horizon_seconds"], params["horizon_count"], {} if params.get("time_field") else None)


@dataclass(frozen=True)
class ExpiryLane:
    """The entries of one dedupe step (its key ``prefix``), in an ``Expiry`` of their
    own, deleted by the step's ``horizon``. ``owns(key)``: whether a stored key is one
    of them (the first step's lane also takes keys of prefixes no step has now: the
    pipeline's steps changed)."""

    prefix: bytes
    horizon: Horizon
    expiry: Expiry
    owns: Callable[[bytes], bool]


def _owner(prefix: bytes, takes_others: bool, known: frozenset[bytes]) -> Callable[[bytes], bool]:
    def owns(key: bytes) -> bool:
        if key.startswith(prefix):
            return True
        return takes_others and _prefix_of(key) not in known
    return owns


class DedupeExpiry:
    """A pipeline's dedupe entries' expiry: one lane per dedupe step, so that each
    entry expires by its own step's horizon (one index in time order for all of them
    held every entry behind the oldest one of the longest horizon, or of a step whose
    event-time clock stopped: docs/delivery.md, AJ). What ``DedupeCache`` and the
    worker's hooks call on it reaches every lane.

    On disk, the first step's lane lives where a pipeline's one index lived
    (``folder()/<partition>``), the others under ``folder()/step-<index>``. The file
    ``folder()/lanes`` names the dedupe steps the indexes there were kept for: when the
    pipeline's steps changed, an index kept for another lane lacks entries its lane
    owns now (a removed step's, or a step that became the first), so all of them are
    deleted and built again (``ensure``). No such file and no ``step-`` folder: the one
    index of before the lanes, kept for the first lane, which passes over the other
    steps' entries."""

    LAYOUT_FILE = "lanes"

    def __init__(self, steps: Sequence[Step], folder: Callable[[], Path | None] | None) -> None:
        dedupes = [s for s in steps if s.op == "deduplicate"]
        self._folder = folder
        self._layout = ",".join(str(s.index) for s in dedupes)
        self._layout_checked = False
        known = frozenset(step_prefix(s.index) for s in dedupes)
        self.lanes: list[ExpiryLane] = []
        for n, step in enumerate(dedupes):
            prefix = step_prefix(step.index)
            owns = _owner(prefix, takes_others=n == 0, known=known)
            lane_folder = folder if n == 0 or folder is None else _subfolder(folder, f"step-{step.index}")
            self.lanes.append(ExpiryLane(prefix, Horizon.of(step), Expiry(_seen_at, lane_folder, owns), owns))
        self.lane_of = {lane.prefix: lane for lane in self.lanes}

    def ensure(self, lane: ExpiryLane, partition: int, store: Any) -> Any:
        """``lane``'s queue of ``partition`` (``Expiry.ensure``), once the indexes on
        disk are known to be kept for these lanes."""
        if not self._layout_checked:
            self._layout_checked = self._check_layout()
        return lane.expiry.ensure(partition, store)

    def _check_layout(self) -> bool:
        """Delete the indexes kept for other lanes; False: no folder (yet)."""
        base = None if self._folder is None else self._folder()
        if base is None:
            return False
        marker = base / self.LAYOUT_FILE
        children = [child for child in base.iterdir() if child != marker] if base.is_dir() else []
        if marker.is_file():
            stale = marker.read_text() != self._layout
        else:  # the one index of before the lanes, or lanes of an unknown set of steps
            stale = any(child.name.startswith("step-") for child in children)
        if stale:
            log.info("dedupe steps changed (now %s): expiry indexes in %s built again", self._layout, base)
            for child in children:
                shutil.rmtree(child, ignore_errors=True)
            if any(child.exists() for child in children):
                # Not written: the next start deletes them again; until then none of
                # them is reopened.
                log.error("could not delete the old expiry indexes in %s", base)
                for lane in self.lanes:
                    lane.expiry.reopen_kept = False
                return True
        write_file_durably(marker, self._layout.encode())
        return True

    def stored(self, partition: int, values: dict[bytes, Any]) -> None:
        """``values`` were just stored in ``partition``: each to its step's lane."""
        lanes = self.lanes
        if len(lanes) == 1:
            lanes[0].expiry.stored(partition, values)
            return
        by_prefix: dict[bytes, dict[bytes, Any]] = {lane.prefix: {} for lane in lanes}
        for key, value in values.items():
            into = by_prefix.get(_prefix_of(key))
            if into is not None:
                into[key] = value
        for lane in lanes:
            lane.expiry.stored(partition, by_prefix[lane.prefix])

    async def restored(self, event: Any) -> None:
        for lane in self.lanes:
            await lane.expiry.restored(event)

    def discard_all(self) -> None:
        for lane in self.lanes:
            lane.expiry.discard_all()

    def forget(self) -> None:
        for lane in self.lanes:
            lane.expiry.forget()

    @property
    def built(self) -> int:
        return sum(lane.expiry.built for lane in self.lanes)

    @property
    def reopened(self) -> int:
        return sum(lane.expiry.reopened for lane in self.lanes)

    def describe(self) -> dict[str, Any]:
        out = {"indexes_built": 0, "indexes_reopened": 0, "indexes_building": 0, "entries": 0}
        for lane in self.lanes:
            for name, value in lane.expiry.describe().items():
                out[name] += value
        return out


def _subfolder(folder: Callable[[], Path | None], name: str) -> Callable[[], Path | None]:
    def sub() -> Path | None:
        base = folder()
        return None if base is None else base / name
    return sub


#: One batch's dedupe writes, detached from the cache (``LiveContext.detach_writes``):
#: partition -> key -> value, and by partition the event that stands for its records
#: where a store needs "the current event".
Detached = tuple[dict[int, dict[bytes, Any]], dict[int, Any]]


class LiveContext:
    """The StepContext of one event in a live pipeline.

    Its dedupe entries not stored yet live in a ``tables.store.DedupeCache`` (``cache``),
    registered with the commit protocol by ``build``: each batch's writes are detached
    at its end (``detach_writes``) and stored once its outputs are acknowledged
    (``store_after``), before the batch is acked, so nothing waits for a commit; until
    then the next batch reads them from the cache. Everything else is read from the
    partition's RocksDB directly."""

    def __init__(self, spec: PipelineSpec, table: Any,
                 expiry_folder: Callable[[], Path | None] | None = None) -> None:
        self.spec, self.table = spec, table
        self.store = PartitionStore(table) if table is not None else None
        self.event: Any = None
        #: partition → the event standing for this batch's records of it.
        self.events: dict[int, Any] = {}
        #: The current partition's dict of this batch's writes in ``cache`` (written
        #: directly: one dict set per admitted id).
        self._overlay: dict[bytes, Any] = {}
        #: The current partition's writes of earlier batches being stored, newest first.
        self._storing_here: list[dict[bytes, Any]] = []
        self.partition = -1
        self.offset = 0
        self._now = 0.0
        self._memories: dict[int, TableMemory] = {}
        #: The RocksDB of each partition seen in this batch (None: another store kind).
        #: Cached per batch only: a rebalance may close a partition's database, and no
        #: rebalance completes while a batch is in flight (app/batches.py).
        self._dbs: dict[int, Any] = {}
        self._db: Any = None
        #: The dedupe entries' expiry, one lane per dedupe step, by partition (closed
        #: when partitions move: ``DedupeCache.moved``, run by the commit protocol;
        #: reopened or rebuilt from the store at the next use: ``Expiry.ensure``), on
        #: disk under ``expiry_folder()`` when given.
        self.expiry = DedupeExpiry(spec.steps, expiry_folder)
        self.cache = DedupeCache(self.expiry)

    @property
    def storing(self) -> list[dict[int, dict[bytes, Any]]]:
        """The writes of earlier batches being stored (oldest first)."""
        return self.cache.layers

    def begin_batch(self) -> None:
        self.release_stores()
        self.partition = -1
        self.events = {}

    def release_stores(self) -> None:
        """Let go of the partitions' databases once a batch's records are processed.

        Faust closes a revoked partition's RocksDB by dropping its reference and
        collecting garbage; a reference kept here held the database, and its lock, open:
        when the partition came back in a later rebalance, opening it failed ("lock hold
        by current process") and the worker crashed (the chaos verifier, issue 23)."""
        self._dbs = {}
        self._db = None

    def enter_partition(self, event: Any) -> None:
        """The next records are of ``event``'s partition; ``event`` stands for each of
        them where a store needs "the current event" (its partition and topic)."""
        self.event = event
        self.events[event.message.partition] = event
        self._enter_partition(event.message.partition)

    def at_offset(self, offset: int) -> None:
        """The next record is at ``offset`` of the current partition."""
        self.offset, self._now = offset, time.time()

    def _enter_partition(self, partition: int) -> None:
        self.partition = partition
        self._overlay = self.cache.values_of(partition)
        self._storing_here = self.cache.layers_of(partition)
        if partition not in self._dbs:
            self._dbs[partition] = None if self.store is None else self.store.partition_db(partition)
        self._db = self._dbs[partition]

    def memory(self, step_index: int) -> TableMemory:
        memory = self._memories.get(step_index)
        if memory is None:
            memory = self._memories[step_index] = TableMemory(self, self.spec.steps[step_index])
        return memory

    def read(self, key: bytes) -> Any:
        """The stored value of ``key`` in the current event's partition (overlay first)."""
        pending = self._overlay.get(key)
        if pending is not None:
            return pending
        for values in self._storing_here:
            pending = values.get(key)
            if pending is not None:
                return pending
        if self._db is not None:
            raw = self._db.get(key)
            return None if raw is None else orjson.loads(raw)
        assert self.store is not None
        return self.store.read(self.event, key)

    def write(self, key: bytes, value: Any) -> None:
        """``value`` (not None) for ``key`` in the current partition, stored with the batch."""
        self._overlay[key] = value

    def detach_writes(self) -> Detached:
        """End the batch's writes: they stay readable (``storing``) until ``store_after``
        has stored them, while the next batch writes anew."""
        layer = self.cache.detach()
        events, self.events = self.events, {}
        self._overlay, self._storing_here, self.partition = {}, [], -1
        return layer, events

    async def store_after(self, outputs_acked: Awaitable[Any] | None, detached: Detached) -> None:
        """Store one batch's writes (RocksDB and changelog), only once its outputs are
        acknowledged by the sink: a crash in between re-emits, it never loses a record."""
        layer, events = detached
        try:
            if outputs_acked is not None:
                await outputs_acked
            if not layer:
                return
            items = [(events[p], key, value) for p, values in layer.items() for key, value in values.items()]
            assert self.store is not None
            await self.store.write_many(items)
            # Stored: reads find it in RocksDB now, and it expires from now on (the
            # deletes' ``None`` values are left out by ``stored``).
            self.cache.release(layer)
            for partition, values in layer.items():
                self.expiry.stored(partition, values)
        except BaseException:
            # Failed or cancelled: its expired entries left the indexes (``expire``) but
            # stay in the store, or its entries never reached them.
            try:
                self.expiry.discard_all()
            except Exception:  # the store's error is the one to raise
                log.exception("pipeline %s: dropping the expiry indexes failed", self.spec.name)
            raise

    def lookup(self, source: str, key: str):
        return reference_store.lookup(source, key)

    def now(self) -> float:
        return self._now

    def next_seq(self) -> int:
        # The offset is the record's position in its partition: a count horizon of N
        # means "within the last N records of this partition", with no extra state.
        return self.offset

    def expire(self, at_most: int) -> None:
        """Delete up to ``at_most`` keys of this partition whose horizon has passed (by
        the time and offset of the last record); called once per partition per batch,
        since a check per record cost as much as a step."""
        for lane in self.expiry.lanes:
            # Every lane's queue opened, even with nothing left to spend: an index not
            # opened by the batch's store is discarded (``Expiry.stored``).
            queue = lane.expiry.queues.get(self.partition)
            if queue is None and self.store is not None:
                queue = self.expiry.ensure(lane, self.partition, self.store)
            if queue is not None and queue.building_from is not None:
                # Nothing of it expires until it is built; admission does not wait for
                # expiry (``is_duplicate`` judges a stored entry by its own time).
                if not lane.expiry.build_some(self.partition, self.store, at_most):
                    continue
            if queue and at_most > 0:
                at_most -= self._expire_lane(lane, queue, at_most)

    def _expire_lane(self, lane: ExpiryLane, queue: Any, at_most: int) -> int:
        """``expire`` for one dedupe step's entries; returns how many it deleted."""
        horizon, prefix, owns = lane.horizon, lane.prefix, lane.owns
        # An entry's time is its record's event time under ``time_field``: then it
        # expires by the step's event time in this partition (a backfill of old events
        # deleted every entry at once by the clock, and admitted duplicates), never
        # ahead of the clock (one record from a clock far ahead would expire every
        # entry of the horizon).
        now = self._now
        if horizon.clock is not None:
            # Nothing admitted here since the start: nothing expires by time yet.
            now = min(now, horizon.clock.get(self.partition, float("-inf")))
        seconds, count, position = horizon.seconds, horizon.count, self.offset
        expired = passed = 0
        entries = queue.oldest()
        try:
            for at, seq, key in entries:
                if expired >= at_most or passed >= PASS_OVER_PER_BATCH:
                    break
                if not key.startswith(prefix) and not owns(key):
                    # Another step's entry in an index made before the lanes (one for
                    # the whole table): that step's own index has it.
                    passed += 1
                    continue
                if is_duplicate((at, seq), now, position, seconds, count):
                    break
                expired += 1
                # Deleted only if the value is still the one that record wrote. An entry
                # joins the index once stored (``store_after``), so a key admitted again
                # since, stored or still being stored, reads with a later position and
                # has an entry of its own.
                current = self.read(key)
                if current is not None and current[1] == seq:
                    # Deleted with this batch's writes (``store_after``): its changelog
                    # tombstone then goes out in order with them, in the same record
                    # batch, and a key admitted again in a later batch is written after
                    # it. Until then reads find the expired value, and ``is_duplicate``
                    # judges it by the record's time (by processing time it is past
                    # its horizon; with ``time_field``, by the record's event time).
                    self._overlay[key] = None
        finally:
            entries.close()
        queue.drop(expired + passed)
        return expired


def _seen_at(raw: bytes) -> tuple[float, int] | None:
    """(time, position) of a stored dedupe entry (``TableMemory.put``: ``[at, seq]``)."""
    value = orjson.loads(raw)
    if value.__class__ is list and len(value) == 2:
        return value[0], value[1]
    return None


def expiry_folder(table: Any) -> Path | None:
    """Where a RocksDB table's expiry indexes live (``<tabledir>/expiry/<table>``, one
    RocksDB per partition, beside the table's own folders; not covered by the
    clean-shutdown marker: ``Expiry`` decides when one is reopened); None for another
    store."""
    if table is None or not str(table.app.conf.store).startswith("rocksdb"):
        return None
    return Path(table.app.conf.tabledir) / "expiry" / table.name


COUNTERS: dict[str, PipelineCounters] = {}
PIPELINES: dict[str, PipelineSpec] = {}


@app.on_before_shutdown.connect
async def keep_expiry_indexes(sender: Any = None, **kwargs: Any) -> None:
    """After the consumer stopped: each pipeline's open expiry indexes (of the dedupe
    caches registered with the commit protocol) are closed, to be reopened at the next
    start when the stop was clean and nothing of them is left unstored
    (``DedupeCache.close_indexes``). A stop that never gets here (a kill) leaves them to
    be built again."""
    clean = stopped_clean(app)
    for cache in commit_protocol.caches:
        if isinstance(cache, DedupeCache):
            cache.close_indexes(keep=clean)


def build(spec: PipelineSpec) -> None:
    """Declare the topics, table and agent of one pipeline."""
    source, sink = declare(spec.source), declare(spec.output_topic)
    table = None
    ctx: LiveContext | None = None

    async def restored(event: Any) -> None:
        if ctx is not None:
            await ctx.expiry.restored(event)

    if spec.has_state:
        table = app.Table(
            f"pipeline-{spec.name}-dedupe", partitions=settings.topic_partitions,
            key_type=bytes, value_type=bytes, schema=RAW_SCHEMA,
            on_changelog_event=restored,  # recovery writes the table: the expiry index follows
        )
    counters = COUNTERS.setdefault(spec.name, PipelineCounters())
    counters.steps = StepTally(spec.steps)
    PIPELINES[spec.name] = spec
    source_name = source.get_topic_name()

    ctx = LiveContext(spec, table, expiry_folder=lambda: expiry_folder(table))
    if table is not None:
        commit_protocol.register(ctx.cache)
        counters.expiry = ctx.expiry.describe
    handler = pipeline_handler(spec, ctx, sink, source_name, counters, emitter)
    batch_agent(source, name=f"pipeline.{spec.name}")(handler)


def pipeline_handler(spec: PipelineSpec, ctx: LiveContext, sink: Any, source_name: str,
                     counters: PipelineCounters, emit: Emitter, *,
                     wait_for_inputs: bool = True) -> Callable[[Batch], Awaitable[None]]:
    """The batch handler of one pipeline: its records through the steps, outputs to
    ``sink`` through ``emit``, dedupe state in ``ctx`` (``build``; ``app.harness``
    runs it over the in-memory store and emitter, with ``wait_for_inputs`` False: no
    batch producer or reference data to wait for)."""
    tally, steps, key_by = counters.steps, runnable(spec.steps), spec.key_by
    writer = emit.writer(sink)
    cdc = spec.is_cdc
    stateful = ctx.store is not None

    async def on_change(raw: Any, partition_event: Any) -> None:
        """One record of a cdc pipeline (operators.steps.run_change): a change event
        or a tombstone (a delete, not an ``empty_value``); the envelope it makes goes
        to the sink keyed by the change's primary key."""
        result = run_change(steps, raw.key, raw.value, ctx)
        if result.output is not None:
            writer.add(partition_event, result.key, result.output)
        outcome = result.outcome
        if outcome is None:
            tally.completed += 1
            return
        tally.add(outcome)
        if result.reason is not None:
            counters.dead_lettered += 1
            assert outcome.step is not None
            await emit.dead_letter(raw.key, raw.value, reason=result.reason, message=outcome.failed or "",
                                      source_topic=source_name, pipeline=spec.name, step=outcome.step.label,
                                      partition=partition_event.message.partition, offset=raw.offset)
        elif result.output is None:  # a duplicate (a dropped row went on as a delete)
            counters.dropped[outcome.dropped] = counters.dropped.get(outcome.dropped, 0) + 1  # type: ignore[index]

    async def run_pipeline(records: Batch) -> None:
        """One fetched batch: outputs to the sink, then dedupe state; the consumer acks
        the batch once both are stored (app/batches.py)."""
        if wait_for_inputs:
            if spec.reads_reference:
                await reference_store.caught_up.wait()
            await kafka_io.ready.wait()
        await writer.begin_batch()
        ctx.begin_batch()
        counters.into += len(records)
        dumps = orjson.dumps
        for tp, raw_records in records.parts:
            # One event stands for the partition's records where Faust needs "the
            # current event" (partition, topic): table writes under exactly_once pick
            # their changelog partition and transaction by it, and so does the sink.
            # Wrapping each record (BatchRecord) cost ~2 µs a record for nothing more.
            partition_event = BatchRecord(tp, raw_records[0])
            writer.enter_partition(partition_event)
            ctx.enter_partition(partition_event)
            partition = tp.partition
            for raw in raw_records:
                ctx.at_offset(raw.offset)
                if cdc:
                    await on_change(raw, partition_event)
                    continue
                try:
                    record = loads_object(raw.value)
                except RecordError as exc:
                    counters.dead_lettered += 1
                    await emit.dead_letter(raw.key, raw.value, reason=exc.reason, message=str(exc),
                                        source_topic=source_name, pipeline=spec.name, step="parse",
                                        partition=partition, offset=raw.offset)
                    continue
                outcome = pass_record(steps, record, ctx)
                if outcome.__class__ is not Outcome:  # the output record
                    tally.completed += 1
                    key = raw.key
                    if key_by is not None:
                        value = outcome.get(key_by)
                        key = None if value is None else (value if value.__class__ is str else dumps(value).decode()).encode()
                    writer.add(partition_event, key, outcome)
                    continue
                tally.add(outcome)
                if outcome.dropped:
                    counters.dropped[outcome.dropped] = counters.dropped.get(outcome.dropped, 0) + 1
                else:
                    counters.dead_lettered += 1
                    assert outcome.step is not None
                    await emit.dead_letter(raw.key, raw.value, reason="step_failed",
                                        message=outcome.failed or "", source_topic=source_name,
                                        pipeline=spec.name, step=outcome.step.label,
                                        partition=partition, offset=raw.offset)
            if stateful:
                ctx.expire(EXPIRE_PER_RECORD * len(raw_records))
        ctx.release_stores()
        counters.out += writer.count
        outputs_acked = await writer.send()
        # The acks of the outputs, then the dedupe state, may complete while the next
        # batch is handled (at_least_once; app/batches.py): that batch reads this
        # one's writes from ``ctx.cache`` meanwhile.
        if stateful:
            records.finish_later(ctx.store_after(outputs_acked, ctx.detach_writes()))
        elif outputs_acked is not None:
            records.finish_later(outputs_acked)

    if not stateful:
        return run_pipeline

    async def run_stateful(records: Batch) -> None:
        try:
            await run_pipeline(records)
        except BaseException:
            # The batch's dedupe entries admitted records whose outputs were never sent:
            # none may be written, by a commit or a revoke (the cache refuses to flush
            # from now on); the worker stops and replays the batch.
            ctx.cache.fail()
            raise

    return run_stateful

