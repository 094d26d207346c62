"""What every view shares: the error shape, JSON body parsing, the endpoint index.

Every API error answers ``{"error": {"code", "message", "details"}}`` with a 4xx/5xx
status. Views raise ``ApiError``; ``ApiView.dispatch`` turns it into that answer, so a
view body reads as parse → validate → call → reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from faust.web import View

from app import app, settings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error answer: status, machine-readable code, message and details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def invalid(message: str, details: Any = None) -> ApiError:
    """A 422: the body parsed but a field is wrong."""
    return ApiError(422, "validation_error", message, details)


@dataclass(frozen=True)
class Operation:
    """What the OpenAPI document (web/openapi.py) says of one method of an endpoint:
    its request body, query and answer models (pydantic, web/api_models.py)."""

    #: The model of the success answer (None: any JSON value).
    response: Any = None
    #: The model of the JSON request body.
    body: Any = None
    #: The model whose fields are the query parameters.
    query: Any = None
    #: The success status(es) answered with ``response``.
    statuses: tuple[int, ...] = (200,)
    #: The media type of the success answer.
    content_type: str = "application/json"
    #: This method's summary (default: the endpoint's).
    summary: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """One entry of the ``GET /api/v1`` index."""

    path: str
    methods: tuple[str, ...]
    summary: str
    #: Method (lowercase) → its Operation; a method without one is documented as
    #: answering any JSON value.
    operations: dict[str, Operation] = field(default_factory=dict, compare=False)


ENDPOINTS: list[Endpoint] = []


def endpoint(path: str, summary: str, **operations: Operation):
    """Register a view class at ``path`` and list it in the API index; ``operations``
    (``get=Operation(...)``) describe its methods in the OpenAPI document."""

    def register(view_cls: type[View]) -> type[View]:
        methods = tuple(
            m.upper()
            for m in ("get", "post", "put", "delete")
            if getattr(view_cls, m) is not getattr(View, m)
        )
        ENDPOINTS.append(Endpoint(path, methods, summary, operations))
        return app.page(path)(view_cls)

    return register


#: Content types a browser may send cross-site without a CORS preflight (besides
#: multipart/form-data, never JSON), and none at all: what `curl -d`, scripts and other
#: services send when they do not name the type.
SIMPLE_CONTENT_TYPES = frozenset({"", "application/x-www-form-urlencoded", "text/plain"})


def json_body_allowed(content_type: str, origin: str | None) -> bool:
    """Whether a body sent with this Content-Type is read as JSON.

    ``application/json`` always is. So is a simple type (none, form-urlencoded,
    text/plain) when the request has no ``Origin`` header: curl's ``-d`` sends
    form-urlencoded, and the README's examples must work as typed. A browser always
    sends ``Origin`` on a cross-site POST, and a simple type is the one way a page on
    another site can POST here without a preflight (an HTML form), so with an ``Origin``
    only ``application/json`` is accepted: such a page cannot write to Kafka."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        return True
    return origin is None and media_type in SIMPLE_CONTENT_TYPES


class ApiView(View):
    """A Faust view that answers ApiError (and any crash) in the project's error shape."""

    async def dispatch(self, request: Any) -> Any:
        try:
            return await super().dispatch(request)
        except ApiError as exc:
            return self.api_error(exc)
        except Exception as exc:  # a bug must still answer JSON, and be logged
            log.exception("unhandled error in %s %s", request.method, request.path)
            return self.api_error(ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}"))

    def api_error(self, exc: ApiError) -> Any:
        body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        return self.web.bytes(
            orjson.dumps(body), content_type="application/json", status=exc.status
        )

    def reply(self, value: Any, status: int = 200) -> Any:
        """A JSON answer serialized with orjson."""
        return self.web.bytes(
            orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS),
            content_type="application/json",
            status=status,
        )

    async def read_json_object(self, request: Any, max_bytes: int | None = None) -> dict[str, Any]:
        """The request body as a JSON object, or an ApiError naming what is wrong."""
        limit = max_bytes or settings.produce_max_bytes
        content_type = request.headers.get("Content-Type", "")
        if not json_body_allowed(content_type, request.headers.get("Origin")):
            raise ApiError(
                415,
                "unsupported_media_type",
                "the body must be JSON with Content-Type: application/json",
                {"content_type": content_type or None},
            )
        declared = request.content_length
        if declared is not None and declared > limit:
            raise ApiError(
                413, "payload_too_large", f"body is {declared} bytes; the limit is {limit}",
                {"limit_bytes": limit},
            )
        try:
            raw = await request.read()
        except Exception as exc:  # aiohttp raises HTTPRequestEntityTooLarge past client_max_size
            raise ApiError(413, "payload_too_large", str(exc), {"limit_bytes": limit}) from None
        if len(raw) > limit:
            raise ApiError(
                413, "payload_too_large", f"body is {len(raw)} bytes; the limit is {limit}",
                {"limit_bytes": limit},
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", f"body must be a JSON object, not {type(body).__name__}")
        return body


__all__ = [
    "ApiError", "ApiView", "ENDPOINTS", "Endpoint", "Operation", "endpoint", "invalid", "json_body_allowed",
]
