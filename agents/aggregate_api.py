"""The request/reply agent behind ``POST /api/v1/aggregate`` and
``GET /api/v1/aggregate/{window_id}``.

Views call ``aggregate_api.ask(key=window_id, value=AggregateRequest(...))``. The
request is produced to ``aggregate-requests`` keyed by window_id, so Kafka's partitioner
sends every request for one window_id to one partition, and the worker that owns that
partition answers: whichever worker was asked, the running aggregate is the same one.
State lives in the changelog-backed ``aggregate-api`` table (per window_id: its spec,
its open windows, stream time, recently closed windows). A request replayed after a
crash (offset already applied) is answered from the state, not applied twice.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from app import app, settings
from app.codec import RecordError
from app.models.windows import AggregateRequest
from app.windows import event_time_ms, spec_from_canonical
from operators import windows as W
from operators.aggregations import AggregateSet, AggregationError, get_field
from tables.store import PartitionStore
from tables.windows import api_windows

#: How many closed windows per window_id stay visible to GET.
KEEP_CLOSED = 10

requests_topic = app.topic(
    settings.topic("aggregate-requests"),
    partitions=settings.topic_partitions,
    internal=True,
    key_serializer="raw",
    value_serializer="json",
)

store = PartitionStore(api_windows)


@functools.lru_cache(maxsize=1024)
def _spec(canonical_json: str) -> tuple[W.WindowSpec, AggregateSet]:
    return spec_from_canonical(orjson.loads(canonical_json))


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


def handle(req: AggregateRequest, event: Any) -> dict[str, Any]:
    """Apply (op add) or read (op get) one window_id's state; the JSON reply."""
    key = req.window_id.encode()
    state = store.read(event, key)
    if req.op == "get":
        if state is None:
            return _error(404, "unknown_window", f"no window_id {req.window_id!r}")
        spec, aggs = _spec(orjson.dumps(state["spec"], option=orjson.OPT_SORT_KEYS).decode())
        return _view(req.window_id, state, spec, aggs)
    if state is not None and state["spec"] != req.spec:
        return _error(409, "spec_conflict",
                      f"window_id {req.window_id!r} exists with a different spec; use a new window_id",
                      {"existing": state["spec"], "requested": req.spec})
    partition, offset = event.message.partition, event.message.offset
    if state is not None and W.already_applied(state["w"], partition, offset):
        return state.get("last") or _view(req.window_id, state, *_spec(
            orjson.dumps(state["spec"], option=orjson.OPT_SORT_KEYS).decode()))
    spec, aggs = _spec(orjson.dumps(req.spec, option=orjson.OPT_SORT_KEYS).decode())
    record = req.record or {}
    try:
        values = aggs.extract(record)
        time_key = req.spec.get("time_key")
        if time_key:
            ts = event_time_ms(get_field(record, time_key))
        else:
            ts = round(event.message.timestamp * 1000)
    except KeyError:
        return _error(422, "validation_error", f"record has no time field {req.spec.get('time_key')!r}")
    except (AggregationError, RecordError) as exc:
        return _error(422, "validation_error", str(exc))
    if state is None:
        state = {"spec": req.spec, "w": W.new_state(), "st": 0, "closed": [], "late": 0}
    st = state["st"] = max(state["st"], ts)
    applied = W.apply_record(spec, aggs, state["w"], ts, values, st)
    W.mark_applied(state["w"], partition, offset)
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
    store.write(event, key, state)
    return reply


@app.agent(requests_topic, name="aggregate-api")
async def aggregate_api(stream: Any) -> Any:
    """Answer each request from the partition that owns its window_id."""
    async for req in stream:
        event = stream.current_event
        try:
            yield handle(req, event)
        except Exception as exc:  # a bad request must be answered, never crash the agent
            yield _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


__all__ = ["aggregate_api", "handle", "requests_topic"]
