"""The owner side of ``POST /api/v1/aggregate`` and ``GET /api/v1/aggregate/{window_id}``.

A window_id's state lives in the changelog-backed ``aggregate-api`` table, in the
partition Kafka's default partitioner gives its key (murmur2 of the window_id), on the
worker that holds that changelog partition as active. The view (web/aggregate.py)
applies a request here when this worker is that owner, and otherwise forwards it over
HTTP to the owner, one hop (as Kafka Streams' interactive queries and Faust's
``table_route``). Requests of one partition are applied one at a time (a lock per
partition, see ``Owner``): read the state, fold the record in, write the changelog,
await it, write RocksDB, answer.

What "applied" means, per guarantee (docs/delivery.md, R):

- at_least_once: the changelog record is acknowledged (acks=all) before RocksDB is
  written and before the answer. A crash after the answer loses nothing: recovery
  replays the changelog.
- exactly_once: the changelog record is sent by a transactional producer of its own
  per partition (``{app id}-aggregate-api-{partition}``) and its transaction is
  committed before RocksDB is written and before the answer. A kill -9 before the
  commit aborts it, and the client got no answer (it retries; see replay below).
  Fencing: the producer is registered (InitProducerId) when the partition is assigned,
  before Faust's table recovery starts (``transport.ASSIGNMENT_HOOKS``), which fences
  the previous owner's producer and aborts its open transaction. So the new owner's
  recovery reads every state the previous owner answered for, and a previous owner
  that still believes it owns the partition (a zombie) can no longer commit: its
  request fails and is answered as "not the owner" (retried by the forwarder).

Replays: every request carries an id (the client's ``Idempotency-Key`` header, else
one the first worker draws). The state keeps the ids of its last ``KEEP_IDS`` applied
requests, in the changelog with the state: a request whose id is there was applied
already (a forward retried after its answer was lost, a client's retry) and is
answered from the state, not applied again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import orjson
from faust.types import TP

from app import app, settings
from app.codec import RecordError
from app.commit import PartitionLost, on_assignment, owner_state_writer
from app.kafka_io import partition_for
from app.models.windows import AggregateRequest
from app.windows import event_time_ms, spec_from_canonical
from operators import windows as W
from operators.aggregations import AggregateSet, AggregationError, get_field
from tables.store import PartitionStore
from tables.windows import api_windows

log = logging.getLogger(__name__)

#: How many closed windows per window_id stay visible to GET.
KEEP_CLOSED = 10
#: How many applied request ids per window_id are remembered against replays.
KEEP_IDS = 32

store = PartitionStore(api_windows)


class NotOwner(Exception):
    """This worker does not own (or has not recovered) the window_id's partition now."""


@functools.lru_cache(maxsize=1024)
def _spec(canonical_json: str) -> tuple[W.WindowSpec, AggregateSet]:
    return spec_from_canonical(orjson.loads(canonical_json))


def _spec_of(spec: dict[str, Any]) -> tuple[W.WindowSpec, AggregateSet]:
    return _spec(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS).decode())


def _error(status: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message, "details": details}}


def _view(window_id: str, state: dict[str, Any], spec: W.WindowSpec, aggs: AggregateSet) -> dict[str, Any]:
    return {
        "window_id": window_id,
        "spec": state["spec"],
        "stream_time": state["st"],
        "late_records": state.get("late", 0),
        "windows": [W.window_result(spec, aggs, w) for w in state["w"].get("w", [])],
        "closed": state.get("closed", []),
    }


def handle(req: AggregateRequest, state: dict[str, Any] | None, request_id: str,
           now_ms: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Apply (op add) or read (op get) one window_id's state.

    Returns the JSON answer and the new state to store (None: nothing to store).
    ``now_ms`` is the record's time when the spec has no ``time_key``."""
    if req.op == "get":
        if state is None:
            return _error(404, "unknown_window", f"no window_id {req.window_id!r}"), None
        return _view(req.window_id, state, *_spec_of(state["spec"])), None
    if state is not None and state["spec"] != req.spec:
        return _error(409, "spec_conflict",
                      f"window_id {req.window_id!r} exists with a different spec; use a new window_id",
                      {"existing": state["spec"], "requested": req.spec}), None
    if state is not None and request_id in state.get("ids", ()):
        if state.get("last_id") == request_id and state.get("last"):
            return state["last"], None
        return _view(req.window_id, state, *_spec_of(state["spec"])), None
    spec, aggs = _spec_of(req.spec)
    record = req.record or {}
    try:
        values = aggs.extract(record)
        time_key = req.spec.get("time_key")
        ts = event_time_ms(get_field(record, time_key)) if time_key else now_ms
    except KeyError:
        return _error(422, "validation_error", f"record has no time field {req.spec.get('time_key')!r}"), None
    except (AggregationError, RecordError) as exc:
        return _error(422, "validation_error", str(exc)), None
    if state is None:
        state = {"spec": req.spec, "w": W.new_state(), "st": 0, "closed": [], "late": 0}
    st = state["st"] = max(state["st"], ts)
    applied = W.apply_record(spec, aggs, state["w"], ts, values, st)
    closed = [W.window_result(spec, aggs, w) for w in W.expire(spec, state["w"], st)]
    if applied.late:
        state["late"] = state.get("late", 0) + 1
    state["closed"] = (state.get("closed", []) + closed)[-KEEP_CLOSED:]
    updated = [W.window_result(spec, aggs, w) for w in applied.updated]
    latest = updated[-1]["aggregates"] if updated else None
    names = [s.name for s in aggs.specs]
    reply = {
        "window_id": req.window_id,
        "window_type": spec.kind,
        "record_time": ts,
        "late": applied.late,
        # The aggregate of the newest window the record went into (a single value when
        # there is one aggregation); every updated window is in ``windows``.
        "value": None if latest is None else (latest[names[0]] if len(names) == 1 else latest),
        "windows": updated,
        "closed": closed,
    }
    state["last"] = reply
    state["last_id"] = request_id
    state["ids"] = ([i for i in state.get("ids", ()) if i != request_id] + [request_id])[-KEEP_IDS:]
    return reply, state


class Owner:
    """Applies requests for the partitions this worker owns.

    A partition's requests are applied one batch at a time: whatever arrived while the
    previous batch was being stored is folded in together, in arrival order, and
    stored with one changelog write (one transaction under exactly_once), then every
    request of the batch is answered. A lone request is a batch of one; concurrent
    clients share the changelog round trip instead of queueing for one each."""

    def __init__(self) -> None:
        self.pending: dict[int, list[tuple[AggregateRequest, str, asyncio.Future]]] = {}
        self.draining: dict[int, asyncio.Task] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        #: How applied state reaches the changelog and RocksDB (the guarantee's way:
        #: app.commit.owner_state_writer).
        self.writer = owner_state_writer(store)

    @property
    def changelog(self) -> str:
        return api_windows.changelog_topic.get_topic_name()

    def partition_of(self, window_id: str) -> int:
        """The partition of a window_id: Kafka's default partitioner, as every earlier
        version placed it (the request topic was keyed by window_id), so existing
        changelog state stays where it is."""
        return partition_for(window_id.encode(), settings.topic_partitions, 0)

    def owns(self, partition: int) -> bool:
        """This worker holds ``partition`` as active and its recovery has finished."""
        return (app.started and not app.should_stop and not app.rebalancing
                and app.tables.recovery.completed.is_set()
                and TP(self.changelog, partition) in app.assignor.assigned_actives())

    def _lock(self, partition: int) -> asyncio.Lock:
        lock = self.locks.get(partition)
        if lock is None:
            lock = self.locks[partition] = asyncio.Lock()
        return lock

    async def apply(self, req: AggregateRequest, request_id: str) -> dict[str, Any]:
        """The answer to ``req``, applied here; NotOwner when this worker is not (or no
        longer) the owner of its partition."""
        partition = self.partition_of(req.window_id)
        if not self.owns(partition):
            raise NotOwner(partition)
        done = asyncio.get_running_loop().create_future()
        self.pending.setdefault(partition, []).append((req, request_id, done))
        if partition not in self.draining:
            self.draining[partition] = asyncio.ensure_future(self._drain(partition))
        return await done

    async def _drain(self, partition: int) -> None:
        try:
            while self.pending.get(partition):
                batch = self.pending.pop(partition)
                try:
                    async with self._lock(partition):
                        if not self.owns(partition):
                            raise NotOwner(partition)
                        replies = await self._apply_batch(partition, batch)
                except BaseException as exc:  # NotOwner, or a bug: every waiter hears it
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(exc if isinstance(exc, Exception) else NotOwner(partition))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, _, done), reply in zip(batch, replies, strict=True):
                    if not done.done():
                        done.set_result(reply)
        finally:
            self.draining.pop(partition, None)

    async def _apply_batch(self, partition: int, batch: list) -> list[dict[str, Any]]:
        states: dict[bytes, Any] = {}
        changed: dict[bytes, dict[str, Any]] = {}
        replies = []
        now_ms = round(time.time() * 1000)
        at = store.at(partition)
        for req, request_id, _ in batch:
            key = req.window_id.encode()
            state = states[key] if key in states else store.read(at, key)
            try:
                reply, new = handle(req, state, request_id, now_ms)
            except Exception as exc:  # a bad request must be answered, never fail the batch
                reply, new = _error(500, "internal_error", f"{type(exc).__name__}: {exc}"), None
            if new is not None:
                states[key] = changed[key] = new
            else:
                states[key] = state
            replies.append(reply)
        if changed:
            await self._store(partition, list(changed.items()))
        return replies

    async def _store(self, partition: int, items: list[tuple[bytes, dict[str, Any]]]) -> None:
        try:
            await self.writer.write(partition, items)
        except PartitionLost as exc:
            raise NotOwner(partition) from exc

    async def on_assigned(self, assigned: Any) -> None:
        actives = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == self.changelog}
        for partition in self.writer.partitions() - actives:
            async with self._lock(partition):
                await self.writer.release(partition)
        await self.writer.acquire(actives)


owner = Owner()
if owner.writer.needs_assignments:
    on_assignment(owner.on_assigned)


@app.on_before_shutdown.connect
async def _stop_writer(sender: Any = None, **kwargs: Any) -> None:
    await owner.writer.stop()


__all__ = ["NotOwner", "Owner", "handle", "owner"]
