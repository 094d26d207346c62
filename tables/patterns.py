"""State of the pattern engine: changelog-backed tables, its topics, the pattern
catalog every worker shares, and the event-time clock that drives timers.

Tables (RocksDB + changelog, so a kill -9 loses nothing that was committed):

* ``pattern-state``: per entity key (``"user_id=u1"``) the matcher state of every
  pattern keyed by that field, plus the last applied offset per input topic (so a
  redelivered record is not applied twice);
* ``pattern-timers``: entity keys that have a pending timer (absence, trailing
  not-followed-by), with the due event time, the partition that owns them and the input topic that
  partition number belongs to (whose event time the timer follows); a
  cleared timer is stored as ``{}`` (no ``d``), not deleted, so every write of this
  table goes through the same batched, ordered path;
* ``pattern-counts``: matches per (pattern, partition).

The catalog (runtime definitions and global match counts) is a hand-made global
table: every worker reads the compacted ``pattern-definitions`` topic and the counts
changelog from the beginning with a group-less consumer. That keeps GET answers the
same on every worker and survives restarts without relying on standby recovery.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from app import app, settings
from app.commit import commit_protocol
from app.global_topics import GlobalTopicReader
from app.patterns import (
    EngineConfig,
    Pattern,
    PatternError,
    parse_definition,
)
from app.startup import config
from app.topics import declare
from app.transport import commit_guard
from tables.store import PartitionStore, WriteBackCache
from tables.windows import RAW_SCHEMA

log = logging.getLogger(__name__)

#: The engine's settings and the config file's patterns (read at start-up: app/startup.py).
ENGINE: EngineConfig = config().engine
CONFIG_PATTERNS: dict[str, Pattern] = config().patterns

alerts_topic = declare("alerts")
#: Events re-keyed by a pattern's key_by field, and timer ticks for owned keys.
repartition_topic = declare("patterns-repartition")
definitions_topic = declare("pattern-definitions", compacted=True)
source_topics = {name: declare(name) for name in ENGINE.sources}

#: Keys and values are bytes this module encodes itself with orjson (RAW_SCHEMA), read
#: and written through ``PartitionStore`` (the partition's RocksDB directly, changelog
#: records as one pipelined send per batch), not through Faust's per-record table API.
#: The bytes are the JSON Faust's json serializer wrote before (keys are JSON strings,
#: ``"user_id=u1"``), so existing changelogs recover unchanged.
def _table(name: str) -> Any:
    return app.Table(name, default=None, partitions=settings.topic_partitions,
                     key_type=bytes, value_type=bytes, schema=RAW_SCHEMA)


pattern_state = _table("pattern-state")
pattern_timers = _table("pattern-timers")
pattern_counts = _table("pattern-counts")

state_store = PartitionStore(pattern_state)
timer_store = PartitionStore(pattern_timers)
count_store = PartitionStore(pattern_counts)


def table_key_bytes(key: str) -> bytes:
    """The stored form of a table key: its JSON string."""
    return orjson.dumps(key)


class StateCache(WriteBackCache):
    """The decoded ``pattern-state`` values of recently matched keys, by (partition,
    table key) (the key as a string, ``"user_id=u1"``; stored as its JSON): the pattern
    engine's write-back cache in the one state store (``tables.store``), flushed by the
    commit protocol (``app.commit``) before each offset commit, or per batch under
    exactly_once.

    Why: with many keys nearly every event is a distinct key in its batch, and reading a
    state back (RocksDB get + JSON decode, ~10 µs) cost as much as matching it. This
    worker is the only writer of the partitions it owns, so what it last wrote is what
    RocksDB holds, *while it keeps owning them*: the cache is dropped whenever
    partitions are revoked or assigned (the commit protocol, and a per-batch check of
    the assignment in case a signal is missed), and by a handler that fails half-way.
    ``STREAMETL_PATTERN_STATE_CACHE`` keys at most (0 = off); when full it starts over,
    keeping the unwritten ones (``dirty``), which are never dropped unwritten.
    """

    def __init__(self, limit: int, store: Any = None) -> None:
        # State dict keys are strings (topics, pattern and step names, JSON event
        # fields): encoded without OPT_NON_STR_KEYS, about half the cost.
        super().__init__(store, max_entries=limit, str_keys=True,
                         key_bytes=lambda ck: table_key_bytes(ck[1]), max_dirty=max(1, limit // 2))
        self.limit = limit
        self.assignment: frozenset | None = None
        #: The batch changing cached states in place (agents/patterns.py, ``InFlight``;
        #: at most one: only a batch alone in flight does), and flushes under way.
        self.changing: Any = None
        self.flushing = 0

    async def flush(self, store: Any = None, by: Any = None) -> None:
        """``WriteBackCache.flush``, after the batch changing states in place is done
        unless that batch is the caller (``by``): until its outputs are acknowledged
        its states must not be written (docs/delivery.md AW). While this waits and
        writes, no batch starts changing states in place (``flushing``)."""
        self.flushing += 1
        try:
            while self.changing is not None and self.changing is not by:
                await self.changing.done.wait()
            await super().flush(store)
        finally:
            self.flushing -= 1

    @property
    def entries(self) -> dict[tuple[int, str], Any]:
        return self.cached

    @property
    def dirty(self) -> dict[tuple[int, str], int]:
        """(partition, key) -> partition of the cached states not written yet."""
        return self.dirty_keys

    def check(self, assignment: frozenset) -> None:
        if assignment != self.assignment:
            self.clear()
            self.assignment = assignment

    def clear(self) -> None:
        super().clear()
        self.assignment = None

    def fail(self) -> None:
        super().fail()
        self.assignment = None

    def put(self, partition: int, key: str, value: Any) -> None:  # type: ignore[override]
        """Cache a state that is written already."""
        if self.limit <= 0:
            return
        if len(self.cached) >= self.limit:
            self._start_over()
        self.cached[(partition, key)] = value

    def _start_over(self) -> None:
        # Keep what is not written yet (dirty, or being written: ``_writing``).
        dirty, writing = self.dirty_keys, self._writing
        self.cached = {k: v for k, v in self.cached.items() if k in dirty or k in writing}

    def _evict(self) -> None:
        if len(self.cached) > self.max_entries:
            self._start_over()

    def put_dirty(self, partition: int, key: str, value: Any) -> None:
        """Cache a state that is written later (before the next offset commit)."""
        self.put_dirty_many([(_At(partition), key, value)])

    def put_dirty_many(self, writes: list[tuple[Any, str, Any]]) -> None:
        """Cache a batch's changed (record, key, state), to be written with the next
        flush: the room is made once."""
        if len(self.cached) + len(writes) > self.limit:
            self._start_over()
        entries, dirty = self.cached, self.dirty_keys
        for record, key, value in writes:
            p = record.message.partition
            ck = (p, key)
            entries[ck] = value
            dirty[ck] = p
        self.updates += len(writes)


class _At:
    __slots__ = ("partition",)

    def __init__(self, partition: int) -> None:
        self.partition = partition

    @property
    def message(self) -> _At:
        return self


state_cache = commit_protocol.register(
    StateCache(settings.pattern_state_cache, state_store))


class EventClock:
    """Event time per input partition, (topic, partition), for the timers
    (``fire_due_timers``): Kafka Streams' stream time, run on with the wall clock only
    while that partition has nothing left to read.

    Keyed by topic and partition: partition p of a source topic and partition p of
    ``patterns-repartition`` are different inputs, and one's event time says nothing
    about what the other still holds unread.

    Observed from real events only: a tick's ``now`` is the clock's own reading, and
    taking it back as event time would let one early reading push every later timer of
    the partition due ahead of its input (docs/delivery.md AY).

    ``now(topic, partition, read_to_end)``: while records of that partition are still
    to be read, the newest event time seen on it; a timer whose deadline is past that
    is due by the input itself, and an event still queued can still cancel any other.
    Once it is read to its end, the newest event time plus the wall-clock time since
    that event arrived, so a timer fires on time without new input. A partition with
    no event since it was assigned to this worker has no event time: no timer of it is
    due until it has one, or until it and the inputs feeding it (``upstream_read_to_end``)
    are read to their ends; then the wall clock (event times are epoch seconds; with no
    input left there is nothing else to go by). Why the inputs feeding it: a
    repartition partition is read to its end at once after a restart, while the source
    backlog that will be forwarded to it still holds what cancels its stored timers;
    the wall clock then fired them all.

    Across a rebalance a partition this worker keeps keeps its event time: the records
    it reads next come after the ones it saw (what it applied was written at the
    revocation, so a record delivered again is skipped). A partition it loses is
    forgotten; so is every partition when its group session had lapsed, as then
    what it applied was dropped unwritten and is read again (app/commit.py
    ``partitions_moved``).
    """

    def __init__(self) -> None:
        #: (topic, partition) -> (newest event time seen, wall-clock time it arrived).
        self._seen: dict[tuple[str, int], tuple[float, float]] = {}

    def observe(self, topic: str, partition: int, ts: float) -> None:
        """Event time ``ts`` of a real event of the partition (never a tick's).

        Only a newer event time moves the wall-clock anchor: a late event re-anchoring
        it would step the extrapolated clock back, and a partition that keeps getting
        late events would never pass its newest event time."""
        key = (topic, partition)
        known = self._seen.get(key)
        if known is None or ts > known[0]:
            self._seen[key] = (ts, time.time())

    def now(self, topic: str, partition: int, read_to_end: bool,
            upstream_read_to_end: bool = True) -> float | None:
        """The partition's event time now (None: not known yet); ``read_to_end``: this
        worker has read that partition to its end; ``upstream_read_to_end``: and the
        inputs that feed it (asked only of a partition with no event seen)."""
        known = self._seen.get((topic, partition))
        if not read_to_end:
            return None if known is None else known[0]
        if known is None:
            return time.time() if upstream_read_to_end else None
        return known[0] + (time.time() - known[1])

    def knows(self, topic: str, partition: int) -> bool:
        """Whether an event of the partition was seen since it was assigned."""
        return (topic, partition) in self._seen

    def keep_only(self, assigned: Any) -> None:
        """Forget every partition not in ``assigned`` (TPs: (topic, partition))."""
        self._seen = {key: seen for key, seen in self._seen.items() if key in assigned}

    def forget(self) -> None:
        """Every partition learns its event time anew."""
        self._seen.clear()


clock = EventClock()


async def _on_revoked(sender: Any, revoked: Any = None, **kwargs: Any) -> None:
    # aiokafka (eager rebalancing) revokes every partition at each rebalance, the kept
    # ones too: what was lost is known only at the assignment. A worker whose group
    # session lapsed is different: its applied states were dropped unwritten
    # (app/commit.py), so it reads records again that are older than its clock.
    if commit_guard.session_lapsed():
        clock.forget()


async def _on_assigned(sender: Any, assigned: Any = None, **kwargs: Any) -> None:
    clock.keep_only(assigned or ())


app.on_partitions_revoked.connect(_on_revoked)
app.on_partitions_assigned.connect(_on_assigned)


class PatternCatalog(GlobalTopicReader):
    """Runtime pattern definitions and match counts, read from their compacted topics
    by every worker (app/global_topics.py: no consumer group, always from the beginning)."""

    label = "pattern catalog"
    poll_ms = 500
    #: The counts changelog is created by Faust when the worker starts: wait up to two
    #: minutes for it.
    metadata_attempts = 600

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime: dict[str, Pattern] = {}
        self.counts: dict[str, int] = {}
        #: Set once both topics were read to their ends at start.
        self.loaded = self.caught_up
        self.version = 0

    def patterns(self) -> dict[str, Pattern]:
        """Every active pattern: the config file's, then runtime ones."""
        return {**CONFIG_PATTERNS, **self.runtime}

    def match_count(self, name: str) -> int:
        """Matches of one pattern over all partitions."""
        prefix = f"{name}|"
        return sum(v for k, v in self.counts.items() if k.startswith(prefix))

    def put_runtime(self, definition: dict[str, Any] | None, name: str) -> None:
        """Apply one definition record (None = deleted)."""
        if definition is None:
            self.runtime.pop(name, None)
        else:
            try:
                self.runtime[name] = parse_definition(definition, ENGINE, "runtime")
            except PatternError as exc:  # a definition accepted by an older version
                log.error("runtime pattern %s no longer valid, ignored: %s", name, exc)
                self.runtime.pop(name, None)
        self.version += 1

    def topics(self) -> list[str]:
        return [definitions_topic.get_topic_name(), pattern_counts.changelog_topic.get_topic_name()]

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self._apply(topic == pattern_counts.changelog_topic.get_topic_name(), key, value)

    def _apply(self, is_count: bool, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        try:
            if is_count:
                name = orjson.loads(key)
                if value is None:
                    self.counts.pop(name, None)
                else:
                    self.counts[name] = int(orjson.loads(value))
            else:
                self.put_runtime(orjson.loads(value) if value is not None else None, key.decode())
        except (ValueError, TypeError) as exc:
            log.error("unreadable catalog record %r: %s", key, exc)


catalog = PatternCatalog()
app.service(catalog)

__all__ = [
    "CONFIG_PATTERNS", "ENGINE", "EventClock", "PatternCatalog", "alerts_topic", "catalog", "clock",
    "count_store", "definitions_topic", "pattern_counts", "pattern_state", "pattern_timers",
    "repartition_topic", "source_topics", "state_cache", "state_store", "table_key_bytes", "timer_store",
]
