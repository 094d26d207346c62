"""POST /api/v1/aggregate and GET /api/v1/aggregate/{window_id}: one record into a
named window, applied by the worker that owns the window_id's partition.

A worker that owns it applies the request itself (agents/aggregate_api.py); any other
worker forwards the request over HTTP to the owner, one hop, with the caller's
``Authorization`` header and over HTTPS when the web server has a certificate (the
owner's certificate is verified with ``web_peer_cafile``). A forwarded request is never
forwarded again: a worker that is not (or no longer) the owner answers 503 not_owner,
and the forwarding worker looks the owner up again and retries, with the same request
id, until it gets an answer or ``ASK_TIMEOUT`` passes (a rebalance moves partitions)."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from typing import Any

import aiohttp
import orjson
from yarl import URL

from agents.aggregate_api import NotOwner, owner
from agents.window_aggregate import RUNNERS
from app import app, settings
from app.models.windows import AggregateRequest
from app.windows import WindowConfigError, parse_api_spec, spec_from_canonical
from operators.aggregations import AggregationError
from operators.windows import WindowSpecError
from tables.windows import api_windows
from web.api_models import AggregateBody, WindowList
from web.api_models import AggregateState as AggregateAnswer
from web.cluster import cluster_view
from web.common import ApiError, ApiView, Operation, endpoint, invalid

#: How long a request waits for the owner's answer (a rebalance may move the owner).
ASK_TIMEOUT = 30.0
#: Marks a request one worker forwarded to another: the receiver never forwards it on.
FORWARDED = "X-Streametl-Forwarded"
#: The caller's request id (optional); a repeated id is answered, not applied again.
REQUEST_ID = "Idempotency-Key"
#: Pause between two looks for the owner while partitions move.
RETRY_PAUSE = 0.05


def parse_aggregate(body: dict[str, Any]) -> AggregateRequest:
    """Validate a POST body into the request for the owner; 4xx on bad input.

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


class Forwarder:
    """One HTTP client (keep-alive connections) to the other workers."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context: ssl.SSLContext | bool = False
            if settings.web_ssl_certfile:
                context = ssl.create_default_context(
                    cafile=settings.web_peer_cafile or settings.kafka_ssl_cafile or None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=0),
                timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT))
        return self._session

    def owner_url(self, partition: int) -> URL | None:
        """The web address of the worker that holds ``partition`` as active, per the
        latest assignment (None while it is unknown)."""
        topic = api_windows.changelog_topic.get_topic_name()
        for url, topics in app.router.table_metadata(api_windows.name).items():
            if partition in topics.get(topic, ()):
                url = URL(str(url))
                return url.with_scheme("https" if settings.web_ssl_certfile else "http")
        return None

    async def send(self, url: URL, method: str, path: str, body: bytes | None,
                   headers: dict[str, str]) -> tuple[int, bytes]:
        async with self.session().request(method, url.with_path(path), data=body, headers=headers) as resp:
            return resp.status, await resp.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


forwarder = Forwarder()


@app.on_before_shutdown.connect
async def _close_forwarder(sender: Any = None, **kwargs: Any) -> None:
    await forwarder.close()


def _raise_error_answer(reply: Any) -> Any:
    if isinstance(reply, dict) and "error" in reply:
        err = reply["error"]
        raise ApiError(err.get("status", 500), err["code"], err["message"], err.get("details"))
    return reply


async def route(request: Any, req: AggregateRequest, body: dict[str, Any] | None) -> dict[str, Any]:
    """The owner's answer to ``req``: applied here when this worker owns it, else
    forwarded to the owner; ApiError for error answers, 503 or 504 when no owner answers."""
    forwarded = request.headers.get(FORWARDED) == "1"
    request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
    partition = owner.partition_of(req.window_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ASK_TIMEOUT
    self_url = URL(str(app.conf.canonical_url))
    last_problem = "no worker owns it yet"
    while True:
        try:
            return _raise_error_answer(await owner.apply(req, request_id))
        except NotOwner:
            pass
        if forwarded:
            # One hop only; the forwarding worker looks the owner up again.
            raise ApiError(503, "not_owner", f"this worker does not own partition {partition} of "
                                             f"{req.window_id!r} now", {"partition": partition})
        url = forwarder.owner_url(partition)
        if url is not None and (url.host, url.port) != (self_url.host, self_url.port):
            headers = {FORWARDED: "1", REQUEST_ID: request_id, "Content-Type": "application/json"}
            if "Authorization" in request.headers:
                headers["Authorization"] = request.headers["Authorization"]
            data = None if body is None else orjson.dumps(body)
            try:
                status, raw = await forwarder.send(url, request.method, request.path, data, headers)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                last_problem = f"the owner at {url} did not answer: {type(exc).__name__}: {exc}"
            else:
                reply = orjson.loads(raw) if raw else {}
                error = reply.get("error") if isinstance(reply, dict) else None
                if not (status == 503 and error and error.get("code") == "not_owner"):
                    if error:
                        raise ApiError(status, error["code"], error["message"], error.get("details"))
                    return reply
                last_problem = f"the worker at {url} no longer owns it"
        if loop.time() >= deadline:
            raise ApiError(504, "timeout", f"no answer from the owner of {req.window_id!r} in "
                                           f"{ASK_TIMEOUT}s: {last_problem}")
        await asyncio.sleep(RETRY_PAUSE)


@endpoint("/api/v1/aggregate", "Feed one record into a named window; answers the aggregate after it",
          post=Operation(AggregateAnswer, body=AggregateBody))
class Aggregate(ApiView):
    async def post(self, request: Any) -> Any:
        body = await self.read_json_object(request)
        return self.reply(await route(request, parse_aggregate(body), body))


@endpoint("/api/v1/aggregate/{window_id}", "The current windows of a window_id and their values",
          get=Operation(AggregateAnswer))
class AggregateState(ApiView):
    async def get(self, request: Any, window_id: str) -> Any:
        return self.reply(await route(request, AggregateRequest(op="get", window_id=window_id), None))


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
