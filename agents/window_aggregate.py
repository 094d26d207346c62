"""Window aggregation agents, one set per entry of the ``windows:`` config section.

Per window ``W`` (see app/windows.py):

- ``window-W-rekey`` (when ``repartition``): reads the source topic, decodes each record
  (bad ones → dead-letter topic) and forwards ``[ts, values]`` to ``W.keyed``, keyed by
  ``key_by``, with the source partition/offset in headers; under at_least_once one
  ``kafka_io.send_batch`` per fetch, awaited before the fetch is acked.
- ``window-W``: a batch agent (app/batches.py) on ``W.keyed``: one batch is one fetch
  (at most ``STREAMETL_MAX_POLL_RECORDS`` records; ``window_flush_interval`` is only
  used for rate accounting). It updates each
  key's windows in a write-back buffer, emits results and late records, then writes every
  dirty key once to the window table (RocksDB + changelog).
- ``window-W-idle`` (when ``idle_close``): a timer that sends a tick into a partition of
  ``W.keyed`` that has had no input for ``idle_close`` seconds; the agent closes that
  partition's windows when it reads the tick, inside normal stream processing.

Guarantees (argued in docs/windows.md): the state lives in a write-back cache
registered with the commit protocol (app/commit.py), which before every offset commit
waits for the results sent so far and then writes the cache (changelog, then RocksDB),
so a commit never covers a buffered update or an unacknowledged result. Each key's
state remembers the last source offset it applied per source partition, so records
replayed after a crash are not counted twice.
Results and late records are delivered (awaited) before the state that drops a closed
window is written, so a crash can duplicate an emission but never lose one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from app import app, settings
from app.batches import Batch, batch_agent
from app.codec import RecordError, dumps_held
from app.commit import CommitProtocol, Emitter, commit_protocol
from app.dead_letter import send_dead_letter
from app.kafka_io import OutgoingMessage, kafka_io
from app.metrics import observe_flush
from app.models.output import INT, JSON
from app.models.windows import result_template
from app.topics import declare
from app.transport import fetched_to, read_offset
from app.windows import WindowDef, decode_source, make_decoder
from operators import windows as W
from tables.store import AtPartition, PartitionStore, WriteBackCache
from tables.windows import META_PREFIX, meta_key, window_tables

log = logging.getLogger(__name__)

TICK_HEADER = "streametl.tick"
SRC_PARTITION = "streametl.src.partition"
SRC_OFFSET = "streametl.src.offset"


class WindowRunner:
    """The state and processing of one configured window on this worker."""

    #: Flush inside a batch once this many keys are dirty (bounds memory and the size
    #: of one commit's flush); otherwise state is flushed at each offset commit.
    MAX_DIRTY = 50_000

    #: Final results of tumbling windows are made ahead of their close (``_prerender``)
    #: once a partition's stream time is this close to it (ms; the close time is the
    #: window end + grace: with a grace, a key that already has a record in the next
    #: window holds two windows and is left to the close), ...
    PRERENDER_LEAD_MS = 500
    #: ... after a batch of at most this many records: a live stream, whose keys mostly
    #: stay as they are until the window ends. In a backlog they change again first.
    PRERENDER_MAX_BATCH = 1_000
    #: Keys made ahead per turn of the event loop (~0.5-1 ms of CPU).
    PRERENDER_CHUNK = 256

    def __init__(self, defn: WindowDef, table: Any, input_topic: Any, sink: Any, late: Any, *,
                 store: Any = None, commit: CommitProtocol | None = None) -> None:
        """``store``: the state store (default: the window's table; tests give a
        ``tables.store.MemoryStore``); ``commit``: the commit protocol the state cache
        registers with (default: the worker's), whose emitter sends the outputs."""
        self.defn = defn
        self.spec = defn.spec
        self.aggs = defn.aggs
        self.decode = make_decoder(defn, self.aggs)
        self.input_name = None if input_topic is None else input_topic.get_topic_name()
        if store is None:
            store = PartitionStore(table, self.input_name)
        self.store = store
        self.commit = commit or commit_protocol
        self.emitter: Emitter = self.commit.emitter
        # States of count/sum/min/max sets hold only string keys (window fields,
        # aggregation names, source partitions as text), as does the bookkeeping.
        self.buffer = self.commit.register(WriteBackCache(store, str_keys=self.aggs.result_is_state,
                                                          max_dirty=self.MAX_DIRTY))
        self.buffer.on_flush = self._flushed
        self.input = input_topic
        self.source_name = settings.topic(defn.source)
        self.sink = sink
        self.sink_name: str | None = None
        self.late = late
        self.stats: Counter[str] = Counter()
        self.timing: Counter[str] = Counter()
        self.stale = True
        self.first_batch_at: float | None = None
        self.last_batch_at: float | None = None
        self.last_activity: dict[int, float] = {}
        self.last_tick: dict[int, float] = {}
        #: Partitions whose windows the idle rule closed, with no input since.
        self.idle_closed: set[int] = set()
        #: (final, closed_by, superseded) -> result JSON template (``_result_format``).
        self._formats: dict[tuple[bool, str | None, bool], bytes] = {}
        #: The sink's partition of a result key (Emitter.partitioner), once known.
        self._sink_partition: Callable[[bytes], int] | None = None
        #: key -> (its sink partition, its JSON), for ``_sink_partition`` (``_key_outputs``).
        self._key_out: dict[bytes, tuple[int, bytes]] = {}
        self._key_out_for: Callable[[bytes], int] | None = None
        #: Final results made ahead of a window end (``_prerender``): key -> (its state,
        #: its one window's end, (key, result JSON), its sink partition or -1). An entry
        #: is valid while the key's state is unchanged: a record applied to the key drops
        #: it, as do an idle close and the first batch after a revocation (``_reset``);
        #: a state evicted from the cache meanwhile is another object, which the close
        #: checks. The sink partitions are those of ``_ready_for``, the partitioner then.
        self._ready: dict[bytes, tuple[dict[str, Any], int, tuple[bytes, bytes], int]] = {}
        self._ready_for: Callable[[bytes], int] | None = None
        #: The windows lists that closes of results made ahead took from their states,
        #: released later in chunks (``_release_closed``): freeing a key's window
        #: (list, window, aggregates) and looking up its sink partition were a third
        #: of its close, in the milliseconds between a window end and its results'
        #: hand-over (docs/performance.md, "Issue 22, session 23").
        self._closed: list[list[Any]] = []
        self.releasing: asyncio.Task | None = None
        #: Partition -> the close time made ahead (or queued), and the queue.
        self._prerendered: dict[int, int] = {}
        self._prerender_queue: list[tuple[int, int]] = []
        #: The task making results ahead, while it runs (tests await it).
        self.prerendering: asyncio.Task | None = None
        self._generation = 0
        self._reset()

    def _reset(self) -> None:
        # Partitions moved: cached state and the open-window index may be wrong now.
        # (Dirty state was flushed by the commit of the revoke; clear() checks that.)
        self.buffer.clear()
        self.meta: dict[int, dict[str, Any]] = {}
        self.open: dict[int, dict[bytes, int | None]] = {}
        #: Per partition: close time -> keys to look at then, and a heap of those times.
        self.due: dict[int, dict[int, list[bytes]]] = {}
        self.due_times: dict[int, list[int]] = {}
        self.indexed = False
        self.stale = False
        # Results made ahead belong to states this worker may no longer hold; a task
        # still making them stops at its next chunk (another generation).
        self._ready.clear()
        self._prerendered.clear()
        self._prerender_queue.clear()
        self.prerendering = None
        self._generation += 1

    def mark_stale(self) -> None:
        """Called on rebalance: rebuild caches and index before the next batch, and
        time each partition's idleness from now (a partition that comes back may have
        had input on another worker since this one last saw it)."""
        self.stale = True
        self.last_activity.clear()
        self.last_tick.clear()
        self.idle_closed.clear()

    @property
    def meta_dirty(self) -> set[int]:
        """Partitions whose bookkeeping (stream time, late count) is not written yet."""
        return {p for p, _ in self.buffer.side.values()}

    def _meta_changed(self, p: int) -> None:
        """Partition ``p``'s bookkeeping is written with the next flush of the state
        (the value is read then: later changes to the same dict are included)."""
        self.buffer.put_side(meta_key(p), self.meta[p], p)

    def _flushed(self, seconds: float) -> None:
        self.stats["flushes"] += 1
        self.timing["flush"] += seconds
        observe_flush(f"window-{self.defn.name}", seconds)

    # --- index of open windows -------------------------------------------------------

    def _schedule(self, p: int, key: bytes, state: dict[str, Any]) -> None:
        """Make sure the close index looks at ``key`` no later than its next close.

        The index is lazy: an entry may be early (the window was extended, e.g. a
        session) - ``_close_due`` then finds nothing closed and schedules the next
        close - but never late. So only an earlier close than the scheduled one needs
        a new entry; that happens only when a record opens a window.

        Why buckets (close time -> keys) and a heap of the distinct times rather than a
        heap of (time, key): tumbling and hopping windows are epoch-aligned, so all keys'
        windows close at a few distinct times; adding a key is a list append and the
        heap holds a handful of integers (a heap of 10,000 tuples cost ~1 µs per pop)."""
        nc = W.next_close(self.spec, state)
        if nc is not None:
            self._index_at(key, nc, *self._index_of(p))

    def _index_of(self, p: int) -> tuple[dict[bytes, int | None], dict[int, list[bytes]], list[int]]:
        """Partition ``p``'s close index: key -> scheduled close, close time -> keys, and
        the heap of those close times (created on first use)."""
        open_p = self.open.get(p)
        if open_p is None:
            open_p = self.open[p] = {}
        due_p = self.due.get(p)
        if due_p is None:
            due_p = self.due[p] = {}
        times_p = self.due_times.get(p)
        if times_p is None:
            times_p = self.due_times[p] = []
        return open_p, due_p, times_p

    @staticmethod
    def _index_at(key: bytes, nc: int, open_p: dict[bytes, int | None],
                  due_p: dict[int, list[bytes]], times_p: list[int]) -> None:
        """Schedule ``key`` to be looked at when stream time reaches ``nc``, unless it is
        scheduled no later already (see ``_schedule``). ``process`` inlines this."""
        cur = open_p.get(key)
        if cur is None or nc < cur:
            open_p[key] = nc
            keys = due_p.get(nc)
            if keys is None:
                due_p[nc] = [key]
                heapq.heappush(times_p, nc)
            else:
                keys.append(key)

    def _ensure_index(self) -> None:
        if self.indexed:
            return
        # One scan of the partitions this worker holds, after each rebalance.
        for key, state in self.store.scan():
            if not key.startswith(META_PREFIX) and isinstance(state, dict) and "p" in state:
                if state.get("w"):
                    self._schedule(state["p"], key, state)
        self.indexed = True

    def _meta(self, p: int) -> dict[str, Any]:
        meta = self.meta.get(p)
        if meta is None:
            meta = self.meta[p] = self.store.read(AtPartition(p), meta_key(p)) or {"st": 0, "late": 0}
        return meta

    def _load(self, p: int, key: bytes) -> dict[str, Any]:
        return self.store.read(AtPartition(p), key) or W.new_state()

    # --- processing -------------------------------------------------------------------

    def _result_format(self, final: bool, closed_by: str | None, superseded: bool) -> bytes:
        """The JSON of app.models.windows.WindowResult (made from its fields by
        ``result_template``, orjson's compact form) with ``%``-placeholders for what
        differs per window: key (JSON), start, end, count and aggregates (JSON).

        Why a template rather than a dict for orjson: building the dict and encoding it
        cost ~1.8 µs per result, and orjson's output object keeps an over-allocated
        buffer (about 4 KB with orjson 3.12+) for as long as the result waits for its
        acknowledgement; filling this template costs ~0.6 µs and makes an exact-size
        bytes object. Window bounds and counts are ints (ms, records), so ``%d``."""
        fmt = self._formats.get((final, closed_by, superseded))
        if fmt is None:
            # The placeholders' order is the order ``_result`` and ``_close_due`` fill them.
            fmt = self._formats[(final, closed_by, superseded)] = result_template(
                source=self.defn.source, window=self.defn.name, key=JSON, window_type=self.spec.kind,
                start=INT, end=INT, count=INT, aggregates=JSON, final=final, closed_by=closed_by,
                superseded=superseded)
        return fmt

    def _aggregates_json(self, state: dict[str, Any]) -> bytes:
        aggs = self.aggs
        return orjson.dumps(state if aggs.result_is_state else aggs.result(state))

    def _result(self, key: str, w: dict[str, Any], final: bool, closed_by: str | None = None,
                superseded: bool = False) -> tuple[Any, bytes, bytes]:
        # A Faust Record (WindowResult) cost ~40 µs to construct; see _result_format.
        aggregates = b"null" if superseded else self._aggregates_json(w["a"])
        value = self._result_format(final, closed_by, superseded) % (
            orjson.dumps(key), w["s"], w["e"], w["n"], aggregates)
        return self.sink, key.encode(), value

    async def process(self, parts: Iterable[tuple[int, Sequence[Any]]]) -> None:
        """Apply one fetch, emit results and late records (awaited), then either flush
        the dirty state now (exactly_once: inside this batch's transaction) or leave it
        for the flush that precedes the next offset commit.

        ``parts``: (partition, its records in offset order) per partition, the records
        with the fields of aiokafka's ``ConsumerRecord`` (``topic``, ``partition``,
        ``offset``, ``timestamp`` in ms, ``key``, ``value``, ``headers``): the batch
        agent hands over the fetched records themselves (``Batch.parts``), so no
        ``BatchRecord`` is made per record (~1 µs each) and the partition is known
        once per part instead of being compared per record."""
        t0 = time.perf_counter()
        if self.stale:
            self._reset()
        self._ensure_index()
        now = time.monotonic()
        # The first batch was gathered for up to one flush interval before this: count
        # it in, so rates computed from these times are never flattering.
        self.first_batch_at = self.first_batch_at or time.time() - settings.window_flush_interval
        final = self.defn.emit == "final"
        count_windows = self.spec.kind == "count"
        spec, aggs = self.spec, self.aggs
        repartition = self.defn.repartition
        decode = self.decode
        apply_record = W.apply_record
        next_close = W.next_close
        heappush = heapq.heappush
        buffer = self.buffer
        cached = buffer.cached
        # buffer.put inline: the state is already the cached value (get or load above).
        dirty_keys = buffer.dirty_keys
        ready = self._ready
        stats = self.stats
        out: list[tuple[Any, bytes | None, bytes, list[tuple[str, bytes]] | None]] = []
        dead: list[tuple[int, Any, RecordError]] = []  # (partition, raw record, why)
        touched: set[int] = set()
        ticks: set[int] = set()
        n_records = 0
        #: (partition, index of its first item in ``out``): whose input each output
        #: comes from, so that under exactly_once it joins that partition's transaction.
        sources: list[tuple[int, int]] = []
        for p, records in parts:
            if not records:
                continue
            sources.append((p, len(out)))
            meta = self._meta(p)
            st = meta["st"]
            pkey = str(p)
            open_p, due_p, times_p = self._index_of(p)
            self._meta_changed(p)
            touched.add(p)
            active = False
            for ev in records:
                src_offset = ev.offset
                src_pkey = pkey
                raw_headers = ev.headers
                if raw_headers:
                    headers = dict(raw_headers)
                    if TICK_HEADER in headers:
                        ticks.add(p)
                        continue
                    if SRC_PARTITION in headers:
                        src_pkey = str(int(headers[SRC_PARTITION]))
                        src_offset = int(headers[SRC_OFFSET])
                if not active:
                    # Input (not a tick) arrived: the partition is not idle.
                    active = True
                    self.last_activity[p] = now
                    self.idle_closed.discard(p)
                try:
                    if repartition:
                        ts, values = orjson.loads(ev.value)
                        key = ev.key
                        key_s = key.decode()
                    else:
                        kafka_ts = ev.timestamp  # ms; decoders take seconds, as Faust gives
                        key_s, ts, values = decode(ev.value, None if kafka_ts is None else kafka_ts / 1000.0)
                        key = key_s.encode()
                except (RecordError, ValueError, TypeError, AttributeError) as exc:
                    dead.append((p, ev, exc if isinstance(exc, RecordError) else RecordError("invalid_record", str(exc))))
                    continue
                state = cached.get(key)
                if state is None:
                    state = buffer.get(key, lambda p=p, key=key: self._load(p, key))
                # Replays after a crash (records after the committed offset whose effect is
                # already in the flushed state) are recognised per source partition.
                applied_o = state.get("o")
                if applied_o is None:
                    applied_o = state["o"] = {}
                else:
                    seen = applied_o.get(src_pkey)
                    if seen is not None and src_offset <= seen:
                        stats["replayed_skipped"] += 1
                        if ts > st:
                            st = ts  # as when it was applied: later records meet the same stream time
                        continue
                if ready:
                    ready.pop(key, None)  # made ahead from the state this record changes
                if ts > st:
                    st = ts
                applied = apply_record(spec, aggs, state, ts, values, st)
                applied_o[src_pkey] = src_offset
                state["p"] = p
                n_records += 1
                if applied.missed:
                    meta["late"] += 1
                    stats["late"] += 1
                    out.append(self._late_record(key_s, ts, values, st, applied, (int(src_pkey), src_offset)))
                if not final:
                    out.extend(self._result(key_s, w, False) for w in applied.updated)
                    out.extend(self._result(key_s, w, False, superseded=True) for w in applied.merged_away)
                if count_windows:
                    for w in W.expire(spec, state, st):
                        if final:
                            out.append(self._result(key_s, w, True, "count"))
                dirty_keys[key] = p
                if applied.created:
                    # The record opened a window, which may close before the key's
                    # scheduled close: _schedule, inlined (about 60 % of the records here).
                    nc = next_close(spec, state)
                    if nc is not None:
                        cur = open_p.get(key)
                        if cur is None or nc < cur:
                            open_p[key] = nc
                            keys = due_p.get(nc)
                            if keys is None:
                                due_p[nc] = [key]
                                heappush(times_p, nc)
                            else:
                                keys.append(key)
            meta["st"] = st
        stats["records"] += n_records
        buffer.updates += n_records
        # Final results of windows closed by event time are grouped by the sink's
        # partition as they are made, when the emitter takes them so
        # (Emitter.takes_grouped): every key's window closes at the same stream time, by
        # the thousand, and an item per result, grouped in a second pass, cost ~15 % more.
        results: dict[int, list[tuple[bytes, bytes]]] | None = None
        if final and any(self._due_now(p) for p in touched) and self.emitter.takes_grouped():
            results = {}
            self.sink_name = self.sink_name or self.sink.get_topic_name()
            self._sink_partition = await self.emitter.partitioner(self.sink_name)
        for p in touched:
            sources.append((p, len(out)))
            self._close_due(p, out, final, results)
        for p in ticks:
            sources.append((p, len(out)))
            self._idle_close(p, now, out, final)
        stats["emitted"] += len(out)
        grouped = ()
        if results:
            stats["emitted"] += sum(len(group) for group in results.values())
            grouped = ((self.sink_name, results),)
        t1 = time.perf_counter()
        # Results and late records are delivered (awaited) before this batch is acked,
        # and before any state that dropped a closed window can be flushed.
        await self._deliver(out, dead, sources, grouped)
        t2 = time.perf_counter()
        # Exactly_once: the state joins this batch's transaction now; at_least_once: at
        # the next commit (app.commit), after the results are acknowledged.
        await self.commit.end_batch(buffer)
        if final and n_records <= self.PRERENDER_MAX_BATCH and self.spec.kind == "tumbling":
            self._queue_prerender(touched)
        self.last_batch_at = time.time()
        stats["batches"] += 1
        # Where a batch's wall time goes (seconds, cumulative; GET /api/v1/windows).
        timing = self.timing
        timing["apply"] += t1 - t0
        timing["deliver"] += t2 - t1

    def _late_record(self, key: str, ts: int, values: dict[str, Any], st: int,
                     applied: W.Applied, src: tuple[int, int]) -> tuple[Any, bytes, bytes, list]:
        value = {
            "source": self.defn.source, "window": self.defn.name, "key": key, "ts": ts,
            "values": values, "stream_time": st, "src_partition": src[0], "src_offset": src[1],
            "windows_missed": applied.missed, "windows_applied": len(applied.updated),
        }
        headers = [
            ("late.reason", b"past_grace"),
            ("late.window", self.defn.name.encode()),
            ("late.stream_time", str(st).encode()),
            ("late.grace_ms", str(self.spec.grace).encode()),
        ]
        return self.late, key.encode(), dumps_held(value), headers

    def _due_now(self, p: int) -> bool:
        """Whether partition ``p``'s stream time has reached a scheduled close."""
        times = self.due_times.get(p)
        return bool(times) and times[0] <= self.meta[p]["st"]

    def _close_due(self, p: int, out: list, final: bool, results: Any = None) -> None:
        """Close partition ``p``'s windows that its stream time has reached: their final
        results (emit final) into ``results`` (the sink's partition -> (key, value)
        pairs) or else as items into ``out``.

        Per key, at a window end, by the thousand (every key's tumbling window ends at
        the same time): one pop of the index entry, one cache look-up, one look-up of
        the key's sink partition and JSON (``_key_out``), the result template filled in
        one ``%``, the dirty mark. A tumbling key's one window is taken without a call
        to ``expire``, and a key with no window left is not scheduled again. A result
        made ahead (``_prerender``) is taken as it is: its window is not read again."""
        times = self.due_times.get(p)
        if not times:
            return
        st = self.meta[p]["st"]
        open_p, due_p, times_p = self._index_of(p)
        spec = self.spec
        # Tumbling: a key's windows are sorted, one usually (hopping: size/step of them,
        # which ``expire`` handles); the closed ones end at or before the horizon.
        tumbling = spec.kind == "tumbling"
        horizon = st - spec.grace
        buffer = self.buffer
        cached = buffer.cached
        dirty_keys = buffer.dirty_keys
        expire = W.expire
        next_close = W.next_close
        index_at = self._index_at
        sink = self.sink
        fmt = self._result_format(True, "event_time", False)
        dumps = orjson.dumps
        aggregates_json = dumps if self.aggs.result_is_state else self._aggregates_json
        heappop = heapq.heappop
        if results is not None:
            key_out = self._key_outputs(self._sink_partition)
            key_out_get = key_out.get
        ready = self._ready
        ready_pop = ready.pop
        # Sink partitions found when the results were made hold while the partitioner
        # is the same (the sink's partition count unchanged).
        ready_partitions = results is not None and self._ready_for is self._sink_partition
        closed_lists = self._closed
        bury = closed_lists.append
        n_put = 0
        n_ahead = 0
        while times and times[0] <= st:
            due = heappop(times)
            for key in due_p.pop(due):
                scheduled = open_p.pop(key, None)
                if scheduled != due:
                    # A superseded index entry: the key's own entry is another one.
                    if scheduled is not None:
                        open_p[key] = scheduled
                    continue
                state = cached.get(key)
                if ready:
                    made = ready_pop(key, None)
                    if made is not None and made[0] is state and made[1] <= horizon:
                        # The key's one window, unchanged since its result was made;
                        # freed later (``_closed``).
                        bury(state["w"])
                        state["w"] = []
                        if final:
                            item = made[2]
                            if results is not None:
                                sink_p = made[3]
                                if not ready_partitions or sink_p < 0:
                                    known = key_out_get(key)
                                    if known is None:
                                        known = key_out[key] = self._key_output(key)
                                    sink_p = known[0]
                                group = results.get(sink_p)
                                if group is None:
                                    group = results[sink_p] = []
                                group.append(item)
                            else:
                                out.append((sink, key, item[1]))
                        dirty_keys[key] = p
                        n_put += 1
                        n_ahead += 1
                        continue
                if state is None:
                    state = buffer.get(key, lambda key=key: self._load(p, key))
                windows = state.get("w")
                if tumbling and windows and len(windows) == 1 and windows[0]["e"] <= horizon:
                    # ``expire`` inlined for the common case: the key's one window closed.
                    closed = windows
                    state["w"] = windows = []
                else:
                    closed = expire(spec, state, st)
                    windows = state.get("w")
                if closed:
                    if final:
                        # _result inlined (one call per closed window saved).
                        if results is not None:
                            known = key_out_get(key)
                            if known is None:
                                known = key_out[key] = self._key_output(key)
                            sink_p, key_json = known
                            group = results.get(sink_p)
                            if group is None:
                                group = results[sink_p] = []
                            for w in closed:
                                group.append((key, fmt % (key_json, w["s"], w["e"], w["n"],
                                                          aggregates_json(w["a"]))))
                        else:
                            key_json = _key_json(key)
                            for w in closed:
                                out.append((sink, key, fmt % (key_json, w["s"], w["e"], w["n"],
                                                              aggregates_json(w["a"]))))
                    # buffer.put inlined: the state is the cached value already.
                    dirty_keys[key] = p
                    n_put += 1
                if windows:
                    nc = next_close(spec, state)
                    if nc is not None:
                        index_at(key, nc, open_p, due_p, times_p)
        buffer.updates += n_put
        if n_ahead:
            self.stats["made_ahead"] += n_ahead
            releasing, loop = self.releasing, asyncio.get_running_loop()
            # A task of a loop that ended (a test's, a tool's) frees nothing any more.
            if releasing is None or releasing.done() or releasing.get_loop() is not loop:
                self.releasing = loop.create_task(self._release_closed())

    #: Seconds after a close before the windows it took are freed (the other partitions
    #: of a window end close within tens of milliseconds), and lists freed per turn of
    #: the event loop.
    RELEASE_DELAY = 0.2
    RELEASE_CHUNK = 1_000

    async def _release_closed(self) -> None:
        """Free the windows closes took (``_closed``), ``RELEASE_CHUNK`` per turn of
        the event loop, once the window end's closes are done."""
        closed = self._closed
        try:
            await asyncio.sleep(self.RELEASE_DELAY)
            while closed:
                del closed[-self.RELEASE_CHUNK:]
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            closed.clear()  # the loop ends: now, or never
            raise
        finally:
            if self.releasing is asyncio.current_task():
                self.releasing = None

    def _queue_prerender(self, partitions: Iterable[int]) -> None:
        """After a small batch: queue the next window end of each partition in
        ``partitions`` whose stream time is within ``PRERENDER_LEAD_MS`` of it, once per
        window end, and start the task that makes their results ahead.

        Why: at a window end every key's tumbling window closes at once (~6,300 in the
        benchmark), and making each result there is half of the close's CPU, all of it
        between the window end and the last result (docs/performance.md, "Issue 22,
        session 20"). Made in the idle time before, for the keys no record changes
        after, the close only takes them."""
        for p in partitions:
            times = self.due_times.get(p)
            if not times:
                continue
            due = times[0]
            if due - self.meta[p]["st"] <= self.PRERENDER_LEAD_MS and self._prerendered.get(p) != due:
                self._prerendered[p] = due
                self._prerender_queue.append((p, due))
        if self._prerender_queue and self.prerendering is None:
            self.prerendering = asyncio.get_running_loop().create_task(self._prerender(self._generation))

    async def _prerender(self, generation: int) -> None:
        """Make the queued window ends' results, ``PRERENDER_CHUNK`` keys per turn of
        the event loop, so that batches run between the chunks."""
        try:
            queue = self._prerender_queue
            while queue and generation == self._generation:
                p, due = queue.pop(0)
                # A copy: the close may take the list meanwhile, records may add to it.
                keys = list(self.due.get(p, {}).get(due, ()))
                chunk = self.PRERENDER_CHUNK
                for i in range(0, len(keys), chunk):
                    if generation != self._generation:
                        return
                    self._make_ahead(p, due, keys[i:i + chunk])
                    await asyncio.sleep(0)
        except Exception:
            # Only a saving is lost: the close makes what is missing (and meets the
            # same error, if any, where a batch handles it).
            log.exception("window %s: making results ahead failed", self.defn.name)
        finally:
            if generation == self._generation:
                self.prerendering = None

    def _make_ahead(self, p: int, due: int, keys: Sequence[bytes]) -> None:
        """The final results of ``keys`` whose one window closes at ``due`` (stream time
        of partition ``p``) into ``_ready``, as ``_close_due`` would make them now."""
        open_p = self.open.get(p)
        if open_p is None:
            return
        ready = self._ready
        cached = self.buffer.cached
        grace = self.spec.grace
        fmt = self._result_format(True, "event_time", False)
        # The sink partition of each key too, when known (as the close finds it).
        partition_of = self._sink_partition
        if partition_of is not self._ready_for:
            for made in ready.values():
                if made[3] >= 0:  # placed by another partitioner: the close makes them anew
                    ready.clear()
                    break
            self._ready_for = partition_of
        key_out = None if partition_of is None else self._key_outputs(partition_of)
        aggregates_json = orjson.dumps if self.aggs.result_is_state else self._aggregates_json
        for key in keys:
            if open_p.get(key) != due or key in ready:
                continue
            state = cached.get(key)
            if state is None:
                continue  # not in memory: the close loads it, as without this
            windows = state.get("w")
            if not windows or len(windows) != 1:
                continue
            w = windows[0]
            end = w["e"]
            if end + grace != due:
                continue
            if key_out is None:
                sink_p, key_json = -1, _key_json(key)
            else:
                known = key_out.get(key)
                if known is None:
                    known = key_out[key] = self._key_output(key)
                sink_p, key_json = known
            ready[key] = (state, end, (key, fmt % (key_json, w["s"], end, w["n"], aggregates_json(w["a"]))), sink_p)

    #: Keys whose sink partition and JSON are remembered (``_key_outputs``); past it the
    #: memo starts again (a key space that large just recomputes).
    KEY_OUTPUTS_MAX = 200_000

    def _key_outputs(self, partition_of: Callable[[bytes], int] | None) -> dict[bytes, tuple[int, bytes]]:
        """The memo of ``_key_output`` for the sink partitioner ``partition_of``: a key's
        windows close again and again (every window end), its sink partition and JSON
        stay the same. Started again when the partitioner changed (the sink's partition
        count) or the memo is full."""
        memo = self._key_out
        if partition_of is not self._key_out_for or len(memo) >= self.KEY_OUTPUTS_MAX:
            memo = self._key_out = {}
            self._key_out_for = partition_of
        return memo

    def _key_output(self, key: bytes) -> tuple[int, bytes]:
        """(the sink partition of ``key``, ``key`` as a JSON string)."""
        return self._key_out_for(key), _key_json(key)  # type: ignore[misc]

    def _idle_close(self, p: int, now: float, out: list, final: bool) -> None:
        if now - self.last_activity.setdefault(p, now) < self.defn.idle_close:
            return  # input arrived since the tick was sent (or the partition just came)
        meta = self.meta[p]
        open_p = self.open.setdefault(p, {})
        # Ticks are rare: look at the whole partition again, so a key the index missed
        # can never keep a window open forever: the stored states, and the cached ones,
        # which the store lacks until the next commit's flush.
        for key, state in self.store.scan():
            if not key.startswith(META_PREFIX) and isinstance(state, dict) and state.get("p") == p:
                if key not in self.buffer:
                    self.buffer.get(key, lambda state=state: state)
                if self.buffer.get(key, dict).get("w"):
                    open_p.setdefault(key, None)
        for key, state in self.buffer.cached.items():
            if isinstance(state, dict) and state.get("p") == p and state.get("w"):
                open_p.setdefault(key, None)
        for key in list(open_p):
            state = self.buffer.get(key, lambda key=key: self._load(p, key))
            closed, closed_at = W.close_all(self.spec, state)
            meta["st"] = max(meta["st"], closed_at)
            self._meta_changed(p)
            if final:
                out.extend(self._result(key.decode(), w, True, "idle") for w in closed)
            self.buffer.put(key, state, p)
            self.stats["idle_closed"] += len(closed)
        open_p.clear()
        self.due[p] = {}
        self.due_times[p] = []
        self.idle_closed.add(p)
        self._ready.clear()  # made from states this close changed

    async def _deliver(self, out: list, dead: list[tuple[int, Any, RecordError]],
                       sources: list[tuple[int, int]] | None = None, grouped: Sequence[tuple[str, Any]] = ()) -> None:
        # Acknowledged before the next offset commit and before any state is written
        # (the commit protocol waits for the emitter first); under exactly_once in the
        # transaction of the input partition each output comes from (``sources``).
        # ``grouped``: this batch's closed windows' results, by the sink's partition.
        await self.emitter.send_later(out, sources or [], grouped)
        for p, ev, exc in dead:
            await self.emitter.dead_letter(
                ev.key, ev.value, reason=exc.reason, message=str(exc), source_topic=self.input_name,
                pipeline=self.defn.name, step="window", partition=p, offset=ev.offset,
            )
            self.stats["dead_letters"] += 1

    def describe(self) -> dict[str, Any]:
        """This worker's view of the window: definition and counters since start."""
        d = self.defn
        return {
            "name": d.name, "source": d.source, "key_by": d.key_by, "window": self.spec.describe(),
            "aggregations": [s.name for s in self.aggs.specs], "emit": d.emit, "sink": d.sink,
            "late_topic": d.late_topic, "idle_close": d.idle_close, "repartition": d.repartition,
            "stats": dict(self.stats),
            "timing": {k: round(v, 3) for k, v in self.timing.items()},
            "buffer": {"loads": self.buffer.loads, "writes": self.buffer.writes,
                       "updates": self.buffer.updates, "cached": len(self.buffer)},
            "first_batch_at": self.first_batch_at, "last_batch_at": self.last_batch_at,
        }

    def _caught_up(self, input_name: str) -> bool:
        """True when this worker has read up to the end of its partitions of the source
        and input topics. Under load the rekey step can lag: records still waiting in
        the source are not idleness."""
        return caught_up({input_name, self.source_name})

    async def tick(self) -> None:
        """Timer: send a tick to each partition idle for ``idle_close`` with windows open."""
        if not app.tables.recovery.completed.is_set() or app.rebalancing:
            return
        now = time.monotonic()
        name = self.input.get_topic_name()
        if not self._caught_up(name):
            return  # input is waiting to be processed: the partition is busy, not idle
        for tp in app.consumer.assignment():
            if tp.topic != name:
                continue
            p = tp.partition
            last = self.last_activity.setdefault(p, now)
            if now - last < self.defn.idle_close:
                continue
            if p in self.idle_closed:
                continue  # already closed; nothing new arrived since
            if now - self.last_tick.get(p, 0.0) < self.defn.idle_close:
                continue
            self.last_tick[p] = now
            # A tick is input, not an output of processed records (emitter.tick).
            await self.emitter.tick(self.input, p, [(TICK_HEADER, b"1")])


def _key_json(key: bytes) -> bytes:
    """A result key as a JSON string. Letters and digits only (ASCII): the key in
    quotes; anything else is escaped by orjson."""
    return b'"%b"' % key if key.isalnum() else orjson.dumps(key.decode())


#: name -> runner, for the web views and tests.
RUNNERS: dict[str, WindowRunner] = {}


def read_to_end(consumer: Any, tp: Any) -> bool:
    """True when this worker has read ``tp`` up to its end: records still waiting to be
    read are not idleness."""
    read = read_offset(consumer, tp)
    try:
        high = consumer.highwater(tp)
    except Exception:  # no fetch position yet
        return False
    if read is not None and high is not None and read + 1 >= high:
        return True
    # Nothing delivered yet (just started or assigned), no end offset yet, or records
    # before the end not delivered: read to the end only if the fetch position is at
    # the end with nothing held back. Before, "nothing delivered yet" counted as read
    # to the end: right after a restart, a partition whose backlog had not been
    # fetched yet could look idle and have its windows closed early (a plausible cause
    # of the chaos test's early idle closes).
    return fetched_to(consumer, tp, high)


def caught_up(names: set[str], consumer: Any = None) -> bool:
    """True when this worker (``consumer``: its consumer, the app's unless given) has
    read up to the end of its partitions of the topics ``names`` (``read_to_end``; the
    idle rule of windows and joins)."""
    if consumer is None:
        consumer = app.consumer
    return all(read_to_end(consumer, tp) for tp in consumer.assignment() if tp.topic in names)


def rekey_handler(keyed: Any, forward: Callable[[Any], tuple[bytes, bytes]], *, pipeline: str, step: str,
                  on_dead_letter: Callable[[], None] | None = None) -> Any:
    """A batch handler that forwards each source record to the internal topic
    ``keyed``, keyed by what ``forward(record)`` returns as ``(key, value)`` (a
    RecordError sends the record to the dead-letter topic instead), with its source
    partition and offset in headers (``SRC_PARTITION``, ``SRC_OFFSET``), so the reader of
    ``keyed`` can skip repeats (windows: per key; joins: per partition)."""
    keyed_name = keyed.get_topic_name()

    async def rekey(records: Batch) -> None:
        # Outputs are awaited before returning: the consumer acks the fetch after that,
        # so a commit never covers a record whose keyed output is not durable.
        #
        # Under exactly_once too, the keyed records go out through kafka_io's plain
        # (idempotent, non-transactional) producer. Why: Faust's transactions are per
        # partition number, and a record rekeyed from source partition s to keyed
        # partition k joined the transaction of k while the offset of s is committed in
        # the transaction of s. A kill -9 between those two commits can lose records
        # (the offset of s committed, the keyed record aborted).
        # Sent plainly and acknowledged before the source offset can commit, a record
        # is at worst repeated in the keyed topic after a crash, and the reader of the
        # keyed topic skips such repeats by their source partition/offset (headers),
        # inside its own transaction: results and state stay exactly-once.
        out: list[OutgoingMessage] = []
        for r in records:
            try:
                key, value = forward(r)
            except RecordError as exc:
                await send_dead_letter(
                    r.key, r.value, reason=exc.reason, message=str(exc),
                    source_topic=r.topic, pipeline=pipeline, step=step,
                    partition=r.partition, offset=r.offset,
                )
                if on_dead_letter is not None:
                    on_dead_letter()
                continue
            headers = ((SRC_PARTITION, str(r.partition).encode()), (SRC_OFFSET, str(r.offset).encode()))
            out.append(OutgoingMessage(key, value, headers, None))
        if out:
            await kafka_io.ready.wait()
            # In order, resends included: the reader skips a record whose source offset
            # is not past the last it applied, so a batch's copy stored after a later
            # batch would be skipped, not applied.
            await kafka_io.send_topics({keyed_name: out}, in_order=True)

    return rekey


def _rekey_handler(defn: WindowDef, runner: WindowRunner, keyed: Any) -> Any:
    """The rekey batch handler of one window: source records to ``keyed`` by ``key_by``."""
    aggs = defn.aggs  # built once, not per record

    def forward(r: Any) -> tuple[bytes, bytes]:
        key, ts, values = decode_source(defn, aggs, r.value, r.timestamp)
        # Held until acknowledged: dumps_held.
        return key.encode(), dumps_held([ts, values])

    def dead_lettered() -> None:
        runner.stats["dead_letters"] += 1

    return rekey_handler(keyed, forward, pipeline=defn.name, step="window", on_dead_letter=dead_lettered)


def register(defn: WindowDef) -> None:
    """Declare the topics and batch agents of one window (app/startup.py)."""
    source = declare(defn.source)
    keyed = declare(defn.keyed_topic) if defn.repartition else source
    runner = WindowRunner(defn, window_tables[defn.name], keyed, declare(defn.sink),
                          declare(defn.late_topic))
    RUNNERS[defn.name] = runner

    if defn.repartition:
        # Windows that share a source each have a rekey batch agent on it; every one of
        # them gets each fetch (app/batches.py).
        batch_agent(source, name=f"window-{defn.name}-rekey")(_rekey_handler(defn, runner, keyed))

    @batch_agent(keyed, name=f"window-{defn.name}")
    async def aggregate(records: Batch) -> None:
        # One batch = one fetch (at most STREAMETL_MAX_POLL_RECORDS records) = one flush
        # of the write-back buffer (the commit-interval cache of Kafka Streams).
        await runner.process([(tp.partition, part) for tp, part in records.parts])

    if defn.idle_close > 0:
        async def idle_tick() -> None:
            await runner.tick()

        app.timer(max(0.2, defn.idle_close / 4), name=f"window-{defn.name}-idle")(idle_tick)


async def _on_moved(*args: Any, **kwargs: Any) -> None:
    # The commit protocol writes what is unwritten and empties the caches on revoke
    # and assign (app.commit); the open-window index is rebuilt before the next batch.
    for runner in RUNNERS.values():
        runner.mark_stale()


app.on_partitions_revoked.connect(_on_moved)
app.on_partitions_assigned.connect(_on_moved)

__all__ = ["RUNNERS", "SRC_OFFSET", "SRC_PARTITION", "TICK_HEADER", "WindowRunner", "caught_up", "read_to_end", "register",
           "rekey_handler"]
