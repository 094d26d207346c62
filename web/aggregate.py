"""POST /api/v1/aggregate and GET /api/v1/aggregate/{window_id}: one record into a
named window, answered by the worker that owns the window_id (agent request/reply)."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.aggregate_api import aggregate_api
from agents.window_aggregate import RUNNERS
from app.models.windows import AggregateRequest
from app.windows import WindowConfigError, parse_api_spec, spec_from_canonical
from operators.aggregations import AggregationError
from operators.windows import WindowSpecError
from web.api_models import AggregateBody, WindowList
from web.api_models import AggregateState as AggregateAnswer
from web.cluster import cluster_view
from web.common import ApiError, ApiView, Operation, endpoint, invalid

#: How long a view waits for the owning worker's answer.
ASK_TIMEOUT = 30.0


def parse_aggregate(body: dict[str, Any]) -> AggregateRequest:
    """Validate a POST body into the request for the owning agent; 4xx on bad input.

    The model checks window_id, record and unknown fields; the window and aggregation
    fields are checked by parse_api_spec, whose messages name them."""
    req = AggregateBody.parse_body(body)
    window_id, record = req.window_id, req.record
    try:
        spec = parse_api_spec(body)
        _, aggs = spec_from_canonical(spec)
        aggs.extract(record)
    except AggregationError as exc:
        raise invalid(str(exc), {"reason": exc.reason}) from None
    except (WindowSpecError, WindowConfigError) as exc:
        raise invalid(str(exc)) from None
    return AggregateRequest(op="add", window_id=window_id, spec=spec, record=record)


async def ask(req: AggregateRequest) -> dict[str, Any]:
    """The owning worker's answer; ApiError for its error answers or a timeout."""
    try:
        reply = await asyncio.wait_for(aggregate_api.ask(key=req.window_id, value=req), ASK_TIMEOUT)
    except TimeoutError:
        raise ApiError(504, "timeout", f"no answer from the owner of {req.window_id!r} in {ASK_TIMEOUT}s") from None
    if isinstance(reply, dict) and "error" in reply:
        err = reply["error"]
        raise ApiError(err["status"], err["code"], err["message"], err.get("details"))
    return reply


@endpoint("/api/v1/aggregate", "Feed one record into a named window; answers the aggregate after it",
          post=Operation(AggregateAnswer, body=AggregateBody))
class Aggregate(ApiView):
    async def post(self, request: Any) -> Any:
        req = parse_aggregate(await self.read_json_object(request))
        return self.reply(await ask(req))


@endpoint("/api/v1/aggregate/{window_id}", "The current windows of a window_id and their values",
          get=Operation(AggregateAnswer))
class AggregateState(ApiView):
    async def get(self, request: Any, window_id: str) -> Any:
        return self.reply(await ask(AggregateRequest(op="get", window_id=window_id)))


@endpoint("/api/v1/windows", "The configured windows and their counters (this worker and the cluster)",
          get=Operation(WindowList))
class Windows(ApiView):
    async def get(self, request: Any) -> Any:
        view = cluster_view()
        totals = {} if view is None else view[1]["windows"]
        windows = []
        for r in RUNNERS.values():
            d = r.describe()
            # Summed over the live workers' latest status records (null: metrics off).
            d["cluster_stats"] = None if view is None else totals.get(r.defn.name)
            windows.append(d)
        return self.reply({"windows": windows,
                           "cluster_workers": None if view is None else [w["worker"] for w in view[0]]})
