"""The pattern engine's agents: thin loops that feed the pure matchers.

* one agent per source topic: parse (bad records to the dead-letter topic), then for
  each key_by field either match in place (the topic is keyed by that field:
  ``patterns.source_key``) or forward to ``patterns-repartition`` keyed by it;
* the repartition agent: matches forwarded events and timer ticks;
* a timer: scans the due entries of ``pattern-timers`` in the partitions this worker
  owns and sends a tick for each to its partition, so a timer fires in stream context
  (table writes, alerts in the same transaction) without new input.

Delivery: every key's state records the last applied offset per input topic (for a
forwarded event: per source partition, ``"<source>:<partition>"``), so a record
redelivered after a crash is skipped. Under at_least_once an alert sent just
before a crash can be sent again (same ``alert_id``); under exactly_once the alert,
the state and the offset commit are one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from faust.types import TP

from agents.window_aggregate import caught_up, read_to_end
from app import app
from app.batches import Batch, BatchRecord, batch_agent
from app.codec import RecordError, dumps_held, loads_object
from app.commit import commit_protocol, emitter
from app.kafka_io import kafka_io
from app.metrics import observe_flush
from app.models.patterns import alert_object
from app.patterns import Pattern, event_time
from app.transport import commit_guard
from operators.patterns import Match
from tables.patterns import (
    ENGINE,
    alerts_topic,
    catalog,
    clock,
    count_store,
    repartition_topic,
    source_topics,
    state_cache,
    state_store,
    table_key_bytes,
    timer_store,
)
from tables.store import AtPartition

log = logging.getLogger(__name__)

#: This worker's engine counters (GET /api/v1/patterns "engine"): source records seen,
#: batches handled, and the wall time of the first and last handled batch, so a
#: benchmark can time the worker's own processing of a backlog.
stats: dict[str, Any] = {"records": 0, "batches": 0, "alerts": 0,
                         "first_batch_at": None, "last_batch_at": None}


#: Alerts sent by this worker, by pattern name (GET /metrics); counted per batch.
alerts_by_pattern: dict[str, int] = {}


def count_batch(records: int, alerts: int) -> None:
    now = time.time()
    if stats["first_batch_at"] is None:
        stats["first_batch_at"] = now
    stats["last_batch_at"] = now
    stats["records"] += records
    stats["batches"] += 1
    stats["alerts"] += alerts


@dataclass(slots=True)
class Item:
    """One input to match: an event (or a timer tick) for one entity key."""

    #: What it came from, as far as its writes and sends need to know: its partition
    #: (``.message.partition``; the partition owns the key): an ``AtPartition`` for a
    #: source record, the ``BatchRecord`` of a repartitioned one.
    fevent: Any
    table_key: str
    key_by: str
    key: str
    source: str
    #: The input whose last applied offset (in the key's state, ``o``) tells whether the
    #: item was applied: the source topic, ``"<source>:<partition>"`` for a forwarded
    #: event, the repartition topic for a tick.
    topic: str
    offset: int
    event: dict[str, Any] | None = None  # None for a tick
    ts: float = 0.0
    event_id: str | None = None
    #: For a tick: the input topic of the timer it wakes (its entry's ``"i"``), so a
    #: timer the tick leaves pending keeps following that input's clock.
    timer_input: str | None = None


def table_key(key_by: str, key: str) -> str:
    return f"{key_by}={key}"


def key_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def by_key_by(patterns: dict[str, Pattern], source: str) -> dict[str, list[Pattern]]:
    groups: dict[str, list[Pattern]] = defaultdict(list)
    for p in patterns.values():
        if p.source == source:
            groups[p.key_by].append(p)
    return groups


def alert_id(p: Pattern, tkey: str, match: Match) -> str:
    ids = ",".join([str(e.get("event_id")) for e in match.evidence])
    raw = f"{p.name}|{p.fingerprint}|{tkey}|{match.at}|{ids}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


async def dead_letter(fevent: Any, reason: str, message: str) -> None:
    m = fevent.message
    await emitter.dead_letter(m.key, m.value, reason=reason, message=message, source_topic=m.topic,
                           pipeline="patterns", partition=m.partition, offset=m.offset)


async def split_source_batch(source: str, parts: Iterable[tuple[Any, list[Any]]]) -> list[Item]:
    """Parse a batch of source records (``Batch.parts``: per partition its raw records);
    forward the ones to repartition; return the ones matched in place.

    An item's ``fevent`` is one :class:`AtPartition` per partition of the batch, not a
    wrapper per record: everything after parsing needs only the record's partition
    (state reads and writes, the transaction its outputs join). Why: a ``BatchRecord``
    per record, and its ``.message`` on each use, were ~4 % of the pattern worker's
    time; a record that goes to the dead-letter topic still gets one.

    The forwarded records go out through the emitter, awaited before returning (under
    at_least_once one pipelined send, so the consumer acks the inputs only after the
    broker has them; under exactly_once in the transaction of the input partition)."""
    patterns = catalog.patterns()
    groups = by_key_by(patterns, source)
    local: list[Item] = []
    if not groups:
        return local  # no pattern reads this source (yet): nothing to parse
    forward: list[tuple[int, bytes, bytes, tuple, None]] = []
    time_field, source_key = ENGINE.time_field, ENGINE.source_key
    # Nearly always every pattern of a source is keyed by one field: then no list of
    # (field, value) per event (a list comprehension's frame and a list, ~5 % of the
    # handler in pattern_micro).
    only = next(iter(groups)) if len(groups) == 1 else None
    append = local.append
    for tp, records in parts:
        topic, partition = tp.topic, tp.partition
        at = AtPartition(partition, topic)
        # The newest event time of the partition, told to the clock once per batch (a
        # call and two wall-clock reads per event before).
        newest = -math.inf
        for record in records:
            try:
                event = loads_object(record.value)
            except RecordError as exc:
                await dead_letter(BatchRecord(tp, record), exc.reason, str(exc))
                continue
            if only is not None:
                value = event.get(only)
                keyed = ((only, value),) if value is not None else ()
            else:
                keyed = [(kb, event.get(kb)) for kb in groups if event.get(kb) is not None]
            if not keyed:
                continue  # no pattern is keyed by a field this event has: not for us
            ts = event_time(event.get(time_field))
            if ts is None:
                await dead_letter(BatchRecord(tp, record), "invalid_event_time",
                                  f"field {time_field!r} is missing or not a time: {event.get(time_field)!r}")
                continue
            offset = record.offset
            event_id = key_text(event["event_id"]) if event.get("event_id") is not None \
                else f"{topic}:{partition}:{offset}"
            if ts > newest:
                newest = ts
            for kb, value in keyed:
                key = key_text(value)
                tkey = f"{kb}={key}"  # table_key(kb, key), without the call
                if kb == source_key:
                    append(Item(at, tkey, kb, key, source, topic, offset, event, ts, event_id))
                else:
                    # With its source position: a redelivered source record is
                    # forwarded again at a new offset, and only "sp"/"so" tell it
                    # was applied (parse_repartitioned).
                    value = orjson.dumps({"k": kb, "v": key, "src": source, "ts": ts,
                                          "id": event_id, "sp": partition, "so": offset,
                                          "e": event})
                    forward.append((partition, key.encode(), value, (), None))
        if newest > -math.inf:
            clock.observe(topic, partition, newest)
    # In order, resends included: a copy stored after a later batch would be applied
    # after that batch's events (a sequence seen out of order).
    await emitter.send(repartition_topic, forward, in_order=True)
    return local


def parse_repartitioned(fe: Any) -> Item | None:
    m = fe.message
    body = orjson.loads(m.value)
    if body.get("tick"):
        # Not observed: a tick's ``now`` is the clock's own reading, not an event's time.
        return Item(fe, body["t"], body["k"], body["v"], body["src"], m.topic, m.offset,
                    None, body["now"], None, timer_input(body))
    clock.observe(m.topic, m.partition, body["ts"])
    sp = body.get("sp")
    if sp is not None:
        # Applied offsets kept per source partition ("<source>:<partition>"): a source
        # batch redelivered after a crash is forwarded again at new offsets of this
        # topic, in order per source partition, so its records are skipped by their
        # source offsets, not by these.
        topic, offset = f"{body['src']}:{sp}", body["so"]
    else:  # forwarded without its source position (before session 27)
        topic, offset = m.topic, m.offset
    return Item(fe, table_key(body["k"], body["v"]), body["k"], body["v"], body["src"], topic,
                offset, body["e"], body["ts"], body["id"])


def match_items(items: list[Item], in_place: bool = False) -> tuple:
    """The pure part of ``apply_items``: read each key's state once, match the batch's
    items for it in memory; returns what to send and write.

    ``in_place``: change the cached states themselves rather than copies; only for a
    batch no flush may write before its outputs are acknowledged (``InFlight.go``)."""
    patterns = catalog.patterns()
    by_key: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_key[item.table_key].append(item)
    # Per pattern what the inner loop needs, looked up once per batch, not per event:
    # (pattern, fingerprint, name, bound step, bound on_timer). An event is matched by
    # the patterns of its own source (``groups``); one key's state holds the patterns
    # of every source keyed by its field (their names: ``named``), and a tick is for
    # all of them that can set a timer (``ticked``), whichever source's item set it.
    groups: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    named: dict[str, set[str]] = defaultdict(set)
    ticked: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    # Only matchers that can set a timer are asked for a deadline (per changed key).
    timed: dict[str, list[Pattern]] = defaultdict(list)
    for p in patterns.values():
        m = p.matcher
        entry = (p, p.fingerprint, p.name, m.step, m.on_timer)
        groups[(p.key_by, p.source)].append(entry)
        named[p.key_by].add(p.name)
        if p.matcher.has_timers:
            timed[p.key_by].append(p)
            ticked[p.key_by].append(entry)
    counts: dict[tuple[str, int], list] = {}  # (pattern, partition) -> [record, n]
    alerts: list[tuple[Any, bytes, bytes]] = []  # (record, key, value)
    state_writes: list[tuple[Any, str, Any]] = []  # (record, table key, state)
    timer_writes: list[tuple[Any, bytes, Any]] = []
    cache = state_cache.entries
    for tkey, group in by_key.items():
        first = group[0]
        kb = first.key_by  # the same for the whole group: it is part of the table key
        # Cached by the table key itself: its stored form (JSON bytes) is made only
        # for a read or a write (it was ~3 % of the handler per key per batch).
        stored = cache.get((first.fevent.message.partition, tkey))
        if stored is None:
            stored = state_store.read(first.fevent, table_key_bytes(tkey)) or {}
        # Unless ``in_place``, copies: the cached state stays as it was until this
        # batch's outputs are acknowledged (``put_dirty_many``), else a flush by another
        # agent's batch meanwhile would write offsets that mark items applied whose
        # alerts were never sent, and a replay after a crash would skip them
        # (docs/delivery.md AW). The copies cost 17 % of ``bench pattern-detect``.
        if in_place:
            offsets = stored.get("o")
            if offsets is None:
                offsets = stored["o"] = {}
            states = stored.get("s")
            if states is None:
                states = stored["s"] = {}
        else:
            offsets = dict(stored.get("o") or ())
            states = dict(stored.get("s") or ())
        changed = False
        source = active = None
        for item in group:
            topic = item.topic
            if item.offset <= offsets.get(topic, -1):
                continue  # applied before a crash; the offset commit did not make it
            offsets[topic] = item.offset
            changed = True
            event, ts, event_id = item.event, item.ts, item.event_id
            if event is None:
                source, active = None, ticked.get(kb, ())
            elif item.source != source or active is None:
                source, active = item.source, groups.get((kb, item.source), ())
            for p, fingerprint, name, step, on_timer in active:
                entry = states.get(name)
                if entry is None:
                    st = None
                elif entry.get("f") == fingerprint:
                    st = entry["st"]
                else:
                    # Of a definition since replaced: never matched again, and its timer
                    # would stay due for ever (a tick every 5 s).
                    st = None
                    del states[name]
                if event is None:
                    new, matches = on_timer(st, ts)
                else:
                    new, matches = step(st, event, ts, event_id)
                if new is not st:
                    if in_place and entry is not None and st is not None:
                        entry["st"] = new
                    else:
                        states[name] = {"f": fingerprint, "st": new}  # not the cached entry
                if matches:
                    partition = item.fevent.message.partition
                    for match in matches:
                        alerts.append((item.fevent, item.key.encode(), alert_value(p, item, match)))
                    ck = (p.name, partition)
                    slot = counts.get(ck)
                    if slot is None:
                        counts[ck] = [item.fevent, len(matches)]
                    else:
                        slot[1] += len(matches)
        if not changed:
            continue
        names = named.get(kb, ())
        if len(states) > len(names):
            states = {n: s for n, s in states.items() if n in names}  # deleted patterns
        deadline = None
        for p in timed.get(kb, ()):
            entry = states.get(p.name)
            if entry is not None and entry.get("f") == p.fingerprint:
                d = p.matcher.deadline(entry["st"])
                if d is not None and (deadline is None or d < deadline):
                    deadline = d
        last_item = group[-1]
        last = last_item.fevent
        new_state: dict[str, Any] = {"o": offsets, "s": states}
        if deadline is not None:
            new_state["t"] = deadline
        state_writes.append((last, tkey, new_state))
        # The state remembers its timer, so the timers table is touched only on change.
        if deadline != stored.get("t"):
            kbytes = table_key_bytes(tkey)
            if deadline is None:
                timer_writes.append((last, kbytes, {}))
                timer_index.entries.pop(tkey, None)
            else:
                # "i": the input topic the partition number "p" belongs to, whose
                # event time the timer follows (tables.patterns.EventClock): the source
                # topic for a key matched in place, the repartition topic otherwise.
                entry = {"d": deadline, "p": last.message.partition,
                         "i": last_item.timer_input or last.message.topic,
                         "k": first.key_by, "v": first.key, "src": first.source}
                timer_writes.append((last, kbytes, entry))
                timer_index.entries[tkey] = entry
    return alerts, state_writes, timer_writes, counts


async def apply_items(items: list[Item]) -> int:
    """Run one batch's items through the matchers and return the number of alerts.

    Each key's state is read once (the decoded-state cache, else its partition's
    RocksDB directly), all of the batch's items for that key are matched in memory, and
    each changed key is written once (RocksDB + one changelog record).

    Order, so that a crash at any point loses nothing (at_least_once): the alerts,
    timer entries and match counts are acknowledged by the broker *before* the state
    that records the items as applied (the per-topic offsets in ``o``). A crash in
    between replays the items: the alerts come again with the same ``alert_id``.
    The changed states go into the write-back cache (``state_cache``, registered with
    the commit protocol). Under at_least_once they stay there unwritten
    (``defers_state_writes``) until the commit protocol flushes them before the next
    offset commit, so a key changed by several batches between two commits is encoded
    and written once. Under exactly_once each batch's states are written here, through
    Faust, inside the input's transaction.
    """
    batch = InFlight(items)
    await batch.claim()
    try:
        return await _apply_claimed(batch)
    finally:
        batch.release()


class InFlight:
    """A batch being matched and sent for (a source agent and the repartition agent run
    concurrently).

    Alone (the common case: one agent), a batch changes the cached states in place:
    ``go`` makes it the cache's ``changing`` batch, and every flush of the cache by
    anyone else waits until it is done (``StateCache.flush``), so no state is written
    whose alerts are unsent. Otherwise it matches copies and caches them only once its
    outputs are acknowledged; and a batch for a key another batch in flight holds waits
    for it (``claim``), else it would match the state without the first batch's items
    and its write would drop them.

    The keys (partition, table key) are gathered only when another batch is in flight:
    alone, a batch pays no per-item cost for this."""

    __slots__ = ("items", "done", "_keys")

    #: The batches being matched and sent for, in the order they claimed.
    running: list[InFlight] = []

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.done = asyncio.Event()
        self._keys: set[tuple[int, str]] | None = None

    def keys(self) -> set[tuple[int, str]]:
        if self._keys is None:
            self._keys = {(item.fevent.message.partition, item.table_key) for item in self.items}
        return self._keys

    async def claim(self) -> None:
        """Wait until no batch in flight shares a key with this one (it holds nothing
        while it waits: no deadlock), then count as in flight."""
        running = InFlight.running
        while running:
            mine = self.keys()
            busy = next((other for other in running if not other.keys().isdisjoint(mine)), None)
            if busy is None:
                break
            await busy.done.wait()
        running.append(self)

    def go(self) -> bool:
        """Whether this batch may change the cached states in place: it is the only
        batch in flight and no flush is under way (a flush waits for such a batch, so
        one that started earlier would not). If so it is the cache's ``changing`` batch
        until ``release``."""
        if InFlight.running != [self] or state_cache.flushing:
            return False
        state_cache.changing = self
        return True

    def release(self) -> None:
        InFlight.running.remove(self)
        if state_cache.changing is self:
            state_cache.changing = None
        self.done.set()


async def _apply_claimed(batch: InFlight) -> int:
    assignment = current_assignment()
    if assignment != state_cache.assignment:
        # The assignment moved without our signals: write what is unwritten first.
        await flush_states(batch)
        state_cache.check(assignment)
    defer = defers_state_writes()
    try:
        alerts, state_writes, timer_writes, counts = match_items(batch.items, batch.go())
        count_writes = []
        for (name, partition), (record, n) in counts.items():
            key = table_key_bytes(f"{name}|{partition}")
            count_writes.append((record, key, (count_store.read(record, key) or 0) + n))
        # Outputs first (the broker has them when this returns), then the state that
        # marks the items applied.
        await asyncio.gather(send_alerts(alerts), timer_store.write_many(timer_writes),
                             count_store.write_many(count_writes))
        for (name, _partition), (_record, n) in counts.items():
            alerts_by_pattern[name] = alerts_by_pattern.get(name, 0) + n
        if defer:
            # Hooked before this batch is acked, so before any commit could cover it.
            commit_protocol.arm()
        state_cache.put_dirty_many(state_writes)
        if not defer or state_cache.over_dirty_limit():
            await flush_states(batch)
    except BaseException:
        # The cached states may hold changes that were never written, or whose outputs
        # were never sent: none of them may be written or committed now.
        state_cache.fail()
        raise
    return len(alerts)


def current_assignment() -> frozenset:
    return frozenset(app.consumer.assignment())


def defers_state_writes() -> bool:
    """True when changed states stay in the cache, unwritten, until the next commit:
    when the commit protocol defers state (at_least_once with this project's
    consumer) and the cache is on. Why: each batch wrote every key it changed (0.79
    state writes per event in the benchmark: encode, changelog record, RocksDB put,
    ~30 % of the handler); between two commits (1 s) a key changes in several batches
    and is now written once."""
    return state_cache.limit > 0 and commit_protocol.defers()


async def flush_states(by: InFlight | None = None) -> None:
    """Write every unwritten cached state once (changelog records, then RocksDB): what
    the commit protocol does with the cache before each commit, here also in batch
    ``by`` (exactly_once, or too many unwritten). Raises after a failed batch
    (``StateCache.failed``): the commit then fails too, and a restart replays."""
    await state_cache.flush(state_store, by=by)


state_cache.on_flush = lambda seconds: observe_flush("patterns", seconds)


def encode_state(value: dict[str, Any]) -> bytes:
    """The stored JSON of one key's state. Its dict keys are strings (topics, pattern
    and step names, JSON event fields), so plain ``orjson.dumps`` does: about half the
    cost of ``PartitionStore``'s ``OPT_NON_STR_KEYS`` on these nested states (the
    encoding was ~15 % of the handler). The same bytes ``StateCache`` writes
    (``str_keys``)."""
    try:
        return dumps_held(value)
    except TypeError:  # a non-string key after all: encode it as the store would
        return dumps_held(value, orjson.OPT_NON_STR_KEYS)


def alert_value(p: Pattern, item: Item, match: Match) -> bytes:
    """The JSON of one alert: ``app.models.patterns.Alert``'s fields, built as a plain
    dict (``alert_object``): a Faust Record per alert costs more than the whole match."""
    return orjson.dumps(alert_object(
        alert_id=alert_id(p, item.table_key, match), pattern=p.name, kind=p.kind,
        key_by=p.key_by, key=item.key, at=match.at, detected_at=time.time(),
        evidence=match.evidence, detail=match.detail, source=p.source,
    ))


async def send_alerts(alerts: list[tuple[Any, bytes, bytes]]) -> None:
    """Send a batch's alerts, keyed by the entity key; returns once the broker has them
    (under exactly_once: in the matched record's transaction, committed with its
    offsets or not at all)."""
    await emitter.send(alerts_topic, [(record.message.partition, key, value, (), None)
                                      for record, key, value in alerts])


def make_source_agent(source: str, topic: Any) -> None:
    # A batch agent; the source topic may also feed a pipeline's batch agent, and each
    # gets every record (app/batches.py).
    async def patterns_source(records: Batch) -> None:
        # After a restart, runtime patterns must be known before any event is matched.
        await catalog.loaded.wait()
        if not any(p.source == source for p in catalog.patterns().values()):
            # No pattern reads this source (yet): nothing to wrap or parse. Wrapping
            # every record first (``list(records)``) cost a transform worker reading
            # the same topic 3% of its CPU for nothing.
            count_batch(len(records), 0)
            return
        local = await split_source_batch(source, records.parts)
        sent = await apply_items(local) if local else 0
        count_batch(len(records), sent)

    patterns_source.__name__ = patterns_source.__qualname__ = f"patterns_source_{source}"
    batch_agent(topic, name=f"agents.patterns.source.{source}")(patterns_source)


@batch_agent(repartition_topic, name="agents.patterns.repartitioned")
async def patterns_repartitioned(records: Batch) -> None:
    """Match forwarded events and timer ticks of one fetched batch."""
    await catalog.loaded.wait()
    items = []
    for fe in records:
        try:
            item = parse_repartitioned(fe)
        except (ValueError, KeyError, TypeError) as exc:
            await dead_letter(fe, "invalid_internal_record", str(exc))
            continue
        if item is not None:
            items.append(item)
    if items:
        await apply_items(items)


#: When a tick was last sent per key, so a slow partition does not get a tick storm.
_ticked: dict[str, float] = {}


class TimerIndex:
    """The pending timers of this worker's partitions, in memory, so the timer does not
    decode the whole table every tick: rebuilt from ``pattern-timers`` whenever the
    assignment changes (and every ``REBUILD_EVERY`` seconds), kept current by
    ``apply_items``' own writes in between."""

    REBUILD_EVERY = 30.0

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.assignment: frozenset | None = None
        self.built_at = 0.0

    def refresh(self) -> None:
        assignment = frozenset(app.consumer.assignment())
        if assignment != self.assignment or time.monotonic() - self.built_at > self.REBUILD_EVERY:
            self.entries = {orjson.loads(k): v for k, v in timer_store.scan()
                            if isinstance(v, dict) and v.get("d") is not None}
            self.assignment = assignment
            self.built_at = time.monotonic()


timer_index = TimerIndex()


def timer_input(timer: dict[str, Any]) -> str:
    """The input topic a timer entry's (or tick's) partition number ``"p"`` belongs to:
    its ``"i"``. Written before there was an ``"i"``: the engine's routing tells it (a
    key of the source key field is matched in place on its source topic,
    ``split_source_batch``; any other on the repartition topic)."""
    topic = timer.get("i")
    if topic is not None:
        return topic
    source = source_topics.get(timer.get("src"))
    if source is not None and timer.get("k") == ENGINE.source_key:
        return source.get_topic_name()
    return repartition_topic.get_topic_name()


class TimerClock:
    """"Now" for each timer of one scan (``fire_due_timers``): the event time of the
    input partitions that feed the timer's key (``EventClock``), each asked once per
    scan whether it is read to its end."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.assigned = consumer.assignment()
        self.source_names = [t.get_topic_name() for t in source_topics.values()]
        self.repartition_name = repartition_topic.get_topic_name()
        self._at_end: dict[TP, bool] = {}
        self._sources_at_end: bool | None = None

    def inputs(self, timer: dict[str, Any]) -> list[TP]:
        topic, partition = timer_input(timer), timer["p"]
        if topic == self.repartition_name:
            return [TP(topic, partition)]
        # A key matched in place holds the state of every source keyed by the source
        # key: partition p of each of them feeds it, and the slowest decides.
        return [tp for tp in (TP(name, partition) for name in self.source_names) if tp in self.assigned]

    def now(self, timer: dict[str, Any]) -> float | None:
        """The timer's event time now: the least over its inputs; None while any of
        them has none yet."""
        now = None
        for tp in self.inputs(timer):
            at = clock.now(tp.topic, tp.partition, self.read_to_end(tp), self.upstream_read_to_end(tp))
            if at is None:
                return None
            now = at if now is None else min(now, at)
        return now

    def read_to_end(self, tp: TP) -> bool:
        # Per partition: records of another partition still to be read say nothing about
        # this one (its clock stays at its newest event time only while it has records
        # of its own to read).
        at_end = self._at_end.get(tp)
        if at_end is None:
            at_end = self._at_end[tp] = read_to_end(self.consumer, tp)
        return at_end

    def upstream_read_to_end(self, tp: TP) -> bool:
        if tp.topic != self.repartition_name or clock.knows(tp.topic, tp.partition):
            return True
        # A repartition partition with no event yet is fed by the source partitions
        # (this worker's, as far as it can tell): a source backlog still to be forwarded
        # may cancel its timers.
        if self._sources_at_end is None:
            self._sources_at_end = caught_up(set(self.source_names), self.consumer)
        return self._sources_at_end


@app.timer(ENGINE.timer_interval)
async def fire_due_timers() -> None:
    """Send a tick to the partition of every key whose timer is due."""
    if app.rebalancing or not app.tables.recovery.completed.is_set() or kafka_io.producer is None:
        return
    if commit_guard.session_lapsed():
        # Woken after its group session lapsed: its partitions are most likely another
        # worker's by now, its clock ran on across the pause and its end offsets are
        # old; a tick it sent (through the plain, unfenced producer) would carry that
        # ``now`` to the new owner, ahead of the backlog the owner replays.
        return
    timer_index.refresh()
    wall = time.time()
    # Every tick and its ``now`` is decided before the first send is awaited: a
    # rebalance completing during a send changes the assignment and the clock, and
    # what was read to the end under the old assignment says nothing of the new.
    scan = TimerClock(app.consumer)
    due: list[tuple[str, dict[str, Any], float]] = []
    for tkey, timer in list(timer_index.entries.items()):
        if wall - _ticked.get(tkey, 0.0) < 5.0:
            continue
        now = scan.now(timer)
        if now is None or now < timer["d"]:
            continue
        _ticked[tkey] = wall
        due.append((tkey, timer, max(now, timer["d"])))
    for tkey, timer, now in due:
        # A tick is only a wake-up call (firing twice is harmless: the state decides), so
        # it goes through the plain producer: under exactly_once a transactional send
        # from outside a stream would stay invisible until its partition next commits.
        await kafka_io.producer.send(
            repartition_topic.get_topic_name(), key=timer["v"].encode(), partition=timer["p"],
            value=orjson.dumps({"tick": True, "t": tkey, "k": timer["k"], "v": timer["v"],
                                "src": timer["src"], "i": timer_input(timer), "now": now}),
        )
    if len(_ticked) > 100_000:
        _ticked.clear()
