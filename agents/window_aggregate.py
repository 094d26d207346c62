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

Guarantees (argued in docs/windows.md): the consumer acks a batch only after the handler
returns (outputs awaited), and flushes the producer before committing, so a commit never
covers a buffered update. Each key's state remembers the last source offset it
applied per source partition, so records replayed after a crash are not counted twice.
Results and late records are delivered (awaited) before the state that drops a closed
window is written, so a crash can duplicate an emission but never lose one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from typing import Any

import orjson

from app import app, settings
from app.batches import Batch, batch_agent
from app.codec import RecordError
from app.dead_letter import send_dead_letter
from app.kafka_io import OutgoingMessage, kafka_io
from app.models.windows import WindowResult
from app.topics import declare
from app.windows import WindowDef, decode_source
from operators import windows as W
from operators.window_buffer import WriteBackBuffer
from tables.windows import META_PREFIX, WINDOW_DEFS, PartitionStore, meta_key, window_tables

log = logging.getLogger(__name__)

TICK_HEADER = "streametl.tick"
SRC_PARTITION = "streametl.src.partition"
SRC_OFFSET = "streametl.src.offset"


class WindowRunner:
    """The state and processing of one configured window on this worker."""

    def __init__(self, defn: WindowDef, table: Any, input_topic: Any, sink: Any, late: Any) -> None:
        self.defn = defn
        self.spec = defn.spec
        self.aggs = defn.aggs
        self.store = PartitionStore(table)
        self.buffer = WriteBackBuffer()
        self.input = input_topic
        self.source_name = settings.topic(defn.source)
        self.sink = sink
        self.late = late
        self.stats: Counter[str] = Counter()
        self.stale = True
        self.first_batch_at: float | None = None
        self.last_batch_at: float | None = None
        self.last_activity: dict[int, float] = {}
        self.last_tick: dict[int, float] = {}
        #: Partitions whose windows the idle rule closed, with no input since.
        self.idle_closed: set[int] = set()
        self._reset()

    def _reset(self) -> None:
        # Partitions moved: cached state and the open-window index may be wrong now.
        self.buffer.clear()
        self.meta: dict[int, dict[str, Any]] = {}
        self.open: dict[int, dict[bytes, int | None]] = {}
        self.heaps: dict[int, list[tuple[int, bytes]]] = {}
        self.indexed = False
        self.stale = False

    def mark_stale(self) -> None:
        """Called on rebalance: rebuild caches and index before the next batch."""
        self.stale = True

    # --- index of open windows -------------------------------------------------------

    def _index(self, p: int, key: bytes, state: dict[str, Any]) -> None:
        open_p = self.open.setdefault(p, {})
        if not state.get("w"):
            open_p.pop(key, None)
            return
        nc = W.next_close(self.spec, state)
        if key not in open_p or open_p[key] != nc:
            open_p[key] = nc
            if nc is not None:
                heapq.heappush(self.heaps.setdefault(p, []), (nc, key))

    def _ensure_index(self) -> None:
        if self.indexed:
            return
        # One scan of the partitions this worker holds, after each rebalance.
        for key, state in self.store.scan():
            if not key.startswith(META_PREFIX) and isinstance(state, dict) and "p" in state:
                self._index(state["p"], key, state)
        self.indexed = True

    def _meta(self, p: int, event: Any) -> dict[str, Any]:
        meta = self.meta.get(p)
        if meta is None:
            meta = self.meta[p] = self.store.read(event, meta_key(p)) or {"st": 0, "late": 0}
        return meta

    # --- processing -------------------------------------------------------------------

    def _decode(self, event: Any) -> tuple[str, int, dict[str, Any]]:
        msg = event.message
        if self.defn.repartition:
            ts, values = orjson.loads(msg.value)
            return msg.key.decode(), ts, values
        return decode_source(self.defn, self.aggs, msg.value, msg.timestamp)

    def _result(self, key: str, w: dict[str, Any], final: bool, closed_by: str | None = None,
                superseded: bool = False) -> tuple[Any, bytes, bytes]:
        r = W.window_result(self.spec, self.aggs, w)
        out = WindowResult(
            source=self.defn.source, window=self.defn.name, key=key, window_type=r["window_type"],
            start=r["start"], end=r["end"], count=r["count"],
            aggregates=None if superseded else r["aggregates"], final=final,
            closed_by=closed_by, superseded=superseded,
        )
        return self.sink, key.encode(), orjson.dumps(out.to_json_dict())

    async def process(self, events: list[Any]) -> None:
        """Apply one batch of events, emit, then write each dirty key once."""
        if self.stale:
            self._reset()
        self._ensure_index()
        now = time.monotonic()
        # The first batch was gathered for up to one flush interval before this: count
        # it in, so rates computed from these times are never flattering.
        self.first_batch_at = self.first_batch_at or time.time() - settings.window_flush_interval
        final = self.defn.emit == "final"
        out: list[tuple[Any, bytes | None, bytes, list[tuple[str, bytes]] | None]] = []
        dead: list[tuple[Any, RecordError]] = []
        touched: dict[int, Any] = {}
        ticks: set[int] = set()
        for ev in events:
            msg = ev.message
            p = msg.partition
            touched[p] = ev
            meta = self._meta(p, ev)
            headers = ev.headers or {}
            if TICK_HEADER in headers:
                ticks.add(p)
                continue
            self.last_activity[p] = now
            self.idle_closed.discard(p)
            try:
                key_s, ts, values = self._decode(ev)
            except (RecordError, ValueError, TypeError, AttributeError) as exc:
                dead.append((ev, exc if isinstance(exc, RecordError) else RecordError("invalid_record", str(exc))))
                continue
            if SRC_PARTITION in headers:
                src = (int(headers[SRC_PARTITION]), int(headers[SRC_OFFSET]))
            else:
                src = (p, msg.offset)
            key = key_s.encode()
            state = self.buffer.get(key, lambda ev=ev, key=key: self.store.read(ev, key) or W.new_state())
            if W.already_applied(state, *src):
                self.stats["replayed_skipped"] += 1
                continue
            st = meta["st"] = max(meta["st"], ts)
            applied = W.apply_record(self.spec, self.aggs, state, ts, values, st)
            W.mark_applied(state, *src)
            state["p"] = p
            self.stats["records"] += 1
            if applied.late:
                meta["late"] += 1
                self.stats["late"] += 1
                out.append(self._late_record(key_s, ts, values, st, applied, src))
            if not final:
                out.extend(self._result(key_s, w, False) for w in applied.updated)
                out.extend(self._result(key_s, w, False, superseded=True) for w in applied.merged_away)
            if self.spec.kind == "count":
                for w in W.expire(self.spec, state, st):
                    if final:
                        out.append(self._result(key_s, w, True, "count"))
            self.buffer.put(key, state, p)
            self._index(p, key, state)
        for p, ev in touched.items():
            self._close_due(p, ev, out, final)
        for p in ticks:
            self._idle_close(p, touched[p], now, out, final)
        self.stats["emitted"] += len(out)
        await self._deliver(out, dead)
        # Only now (outputs acknowledged) the state is written: once per dirty key.
        writes = [(touched[p], key, state) for key, state, p in self.buffer.drain()]
        writes.extend((ev, meta_key(p), self.meta[p]) for p, ev in touched.items())
        await self.store.write_many(writes)
        self.last_batch_at = time.time()
        self.stats["batches"] += 1

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
        return self.late, key.encode(), orjson.dumps(value), headers

    def _close_due(self, p: int, ev: Any, out: list, final: bool) -> None:
        heap = self.heaps.get(p)
        if not heap:
            return
        st = self.meta[p]["st"]
        open_p = self.open.setdefault(p, {})
        while heap and heap[0][0] <= st:
            due, key = heapq.heappop(heap)
            if open_p.get(key) != due:
                continue  # superseded index entry
            state = self.buffer.get(key, lambda key=key: self.store.read(ev, key) or W.new_state())
            closed = W.expire(self.spec, state, st)
            if final:
                out.extend(self._result(key.decode(), w, True, "event_time") for w in closed)
            self.buffer.put(key, state, p)
            open_p.pop(key, None)
            self._index(p, key, state)

    def _idle_close(self, p: int, ev: Any, now: float, out: list, final: bool) -> None:
        if now - self.last_activity.get(p, 0.0) < self.defn.idle_close:
            return  # input arrived since the tick was sent
        meta = self.meta[p]
        open_p = self.open.setdefault(p, {})
        # Ticks are rare: look at the whole partition again, so a key the index missed
        # can never keep a window open forever.
        for key, state in self.store.scan():
            if not key.startswith(META_PREFIX) and isinstance(state, dict) and state.get("p") == p:
                if key not in self.buffer:
                    self.buffer.get(key, lambda state=state: state)
                if self.buffer.get(key, dict).get("w"):
                    open_p.setdefault(key, None)
        for key in list(open_p):
            state = self.buffer.get(key, lambda key=key: self.store.read(ev, key) or W.new_state())
            closed, closed_at = W.close_all(self.spec, state)
            meta["st"] = max(meta["st"], closed_at)
            if final:
                out.extend(self._result(key.decode(), w, True, "idle") for w in closed)
            self.buffer.put(key, state, p)
            self.stats["idle_closed"] += len(closed)
        open_p.clear()
        self.heaps[p] = []
        self.idle_closed.add(p)

    async def _deliver(self, out: list, dead: list[tuple[Any, RecordError]]) -> None:
        futures = []
        if out and settings.processing_guarantee == "at_least_once" and kafka_io.ready.is_set():
            # Pipelined record batches (app.kafka_io): far cheaper per message than
            # Faust's per-message send. Awaited below, before any state is written.
            by_topic: dict[str, list[OutgoingMessage]] = {}
            for topic, key, value, *rest in out:
                by_topic.setdefault(topic.get_topic_name(), []).append(
                    OutgoingMessage(key, value, tuple(rest[0]) if rest else ()))
            futures.append(kafka_io.send_topics(by_topic))
        else:
            # exactly_once: through Faust, inside the transaction of this batch.
            for topic, key, value, *rest in out:
                headers = rest[0] if rest else None
                futures.append(await topic.send(key=key, value=value, headers=headers))
        for ev, exc in dead:
            msg = ev.message
            await send_dead_letter(
                msg.key, msg.value, reason=exc.reason, message=str(exc), source_topic=msg.topic,
                pipeline=self.defn.name, step="window", partition=msg.partition, offset=msg.offset,
            )
            self.stats["dead_letters"] += 1
        if futures:
            await asyncio.gather(*futures)

    def describe(self) -> dict[str, Any]:
        """This worker's view of the window: definition and counters since start."""
        d = self.defn
        return {
            "name": d.name, "source": d.source, "key_by": d.key_by, "window": self.spec.describe(),
            "aggregations": [s.name for s in self.aggs.specs], "emit": d.emit, "sink": d.sink,
            "late_topic": d.late_topic, "idle_close": d.idle_close, "repartition": d.repartition,
            "stats": dict(self.stats),
            "buffer": {"loads": self.buffer.loads, "writes": self.buffer.writes,
                       "updates": self.buffer.updates, "cached": len(self.buffer)},
            "first_batch_at": self.first_batch_at, "last_batch_at": self.last_batch_at,
        }

    def _caught_up(self, input_name: str) -> bool:
        """True when this worker has read up to the end of its partitions of the source
        and input topics. Under load the rekey step can lag: records still waiting in
        the source are not idleness."""
        consumer = app.consumer
        names = {input_name, self.source_name}
        for tp in consumer.assignment():
            if tp.topic not in names:
                continue
            read = consumer._read_offset.get(tp)
            try:
                high = consumer.highwater(tp)
            except Exception:  # no fetch position yet
                return False
            if read is not None and high is not None and read + 1 < high:
                return False
        return True

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
            await self.input.send(key=None, value=b"", partition=p, headers=[(TICK_HEADER, b"1")])


#: name -> runner, for the web views and tests.
RUNNERS: dict[str, WindowRunner] = {}


def _rekey_handler(defn: WindowDef, runner: WindowRunner, keyed: Any) -> Any:
    """The rekey batch handler of one window: source records to ``keyed`` by ``key_by``."""
    aggs = defn.aggs  # built once, not per record
    keyed_name = keyed.get_topic_name()

    async def rekey(records: Batch) -> None:
        # Outputs are awaited before returning: the consumer acks the fetch after that,
        # so a commit never covers a record whose keyed output is not durable.
        eos = settings.processing_guarantee == "exactly_once"
        out: list[OutgoingMessage] = []
        for r in records:
            try:
                key, ts, values = decode_source(defn, aggs, r.value, r.timestamp)
            except RecordError as exc:
                await send_dead_letter(
                    r.key, r.value, reason=exc.reason, message=str(exc),
                    source_topic=r.topic, pipeline=defn.name, step="window",
                    partition=r.partition, offset=r.offset,
                )
                runner.stats["dead_letters"] += 1
                continue
            headers = ((SRC_PARTITION, str(r.partition).encode()), (SRC_OFFSET, str(r.offset).encode()))
            if eos:
                # exactly_once: through Faust, joining the transaction (as before).
                await keyed.send(key=key.encode(), value=orjson.dumps([ts, values]), headers=list(headers))
            else:
                out.append(OutgoingMessage(key.encode(), orjson.dumps([ts, values]), headers))
        if out:
            await kafka_io.ready.wait()
            await kafka_io.send_topics({keyed_name: out})

    return rekey


def _register(defn: WindowDef) -> None:
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
        await runner.process(list(records))

    if defn.idle_close > 0:
        async def idle_tick() -> None:
            await runner.tick()

        app.timer(max(0.2, defn.idle_close / 4), name=f"window-{defn.name}-idle")(idle_tick)


for _defn in WINDOW_DEFS:
    _register(_defn)


async def _on_rebalance(*args: Any, **kwargs: Any) -> None:
    for runner in RUNNERS.values():
        runner.mark_stale()


app.on_partitions_revoked.connect(_on_rebalance)
app.on_partitions_assigned.connect(_on_rebalance)

__all__ = ["RUNNERS", "WindowRunner"]
