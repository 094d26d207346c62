"""GET /api/v1/openapi.json (the API's OpenAPI 3.1 document) and the Swagger UI at /docs.

The document is built from the endpoint index (web.common.ENDPOINTS) and the pydantic
models each endpoint names (web/api_models.py), the same models that validate request
bodies. Swagger UI's files are vendored in web/static/swagger-ui (see its VERSION file):
the page loads nothing from the internet.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from app import app
from web.api_models import Error
from web.common import ENDPOINTS, ApiError, ApiView, Endpoint, Operation, endpoint

STATIC = Path(__file__).resolve().parent / "static" / "swagger-ui"
REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{([^}]+)}")

#: The files /docs may serve, with their media types.
ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "init.js": "application/javascript",
}

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>streametl API</title>
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""

INIT_JS = """window.ui = SwaggerUIBundle({
  url: "/api/v1/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: false
});
"""


def _models(ops: list[Operation]) -> list[type]:
    found: dict[str, type] = {"Error": Error}
    for op in ops:
        for model in (op.response, op.body):
            if model is not None:
                found[model.__name__] = model
    return list(found.values())


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(ep: Endpoint, method: str, op: Operation | None, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    # An endpoint registered without an Operation is documented as answering anything
    # (any media type), so the contract never claims more than it knows.
    undescribed = op is None
    op = op or Operation(content_type="*/*")
    doc: dict[str, Any] = {
        "summary": op.summary or ep.summary,
        "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', ep.path).strip('_') or 'root'}",
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in _PARAM.findall(ep.path)
    ]
    if op.query is not None:
        schema = op.query.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            prop = {k: v for k, v in prop.items() if k != "title"}
            params.append({"name": name, "in": "query", "required": name in schema.get("required", []),
                           "schema": prop})
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": True, "content": _json(refs[(op.body, "validation")])}
    if op.content_type == "application/json":
        answer = refs[(op.response, "serialization")] if op.response is not None else {}
        content = _json(answer)
    else:
        content = {op.content_type: {"schema": {} if undescribed else {"type": "string"}}}
    responses: dict[str, Any] = {str(s): {"description": "OK" if s < 300 else "see schema",
                                          "content": content} for s in op.statuses}
    responses["default"] = {"description": "An error: {\"error\": {\"code\", \"message\", \"details\"}}",
                            "content": _json(refs[(Error, "serialization")])}
    doc["responses"] = responses
    return doc


def openapi_document(endpoints: list[Endpoint] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint in the index."""
    endpoints = sorted(ENDPOINTS if endpoints is None else endpoints, key=lambda e: e.path)
    ops = [op for ep in endpoints for op in ep.operations.values()]
    models = _models(ops)
    keys = [(m, mode) for m in models for mode in ("validation", "serialization")]
    refs, defs = models_json_schema(keys, ref_template=REF)
    paths: dict[str, Any] = {}
    for ep in endpoints:
        paths[ep.path] = {m.lower(): _operation(ep, m.lower(), ep.operations.get(m.lower()), refs)
                          for m in ep.methods}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streametl",
            "version": _version(),
            "description": "Real-time streaming ETL on Kafka. Every error answers "
                           "{\"error\": {\"code\", \"message\", \"details\"}}.",
        },
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streametl")
    except PackageNotFoundError:
        return "0"


@functools.cache
def _document() -> dict[str, Any]:
    # Built once: every view registered itself at import (autodiscovery), before any request.
    return openapi_document()


@endpoint("/api/v1/openapi.json", "This API's OpenAPI 3.1 document", get=Operation())
class OpenApi(ApiView):
    async def get(self, request: Any) -> Any:
        return self.reply(_document())


@endpoint("/docs", "Interactive API documentation (Swagger UI, served from local files)",
          get=Operation(content_type="text/html"))
class Docs(ApiView):
    async def get(self, request: Any) -> Any:
        return self.web.bytes(DOCS_PAGE.encode(), content_type="text/html")


@app.page("/docs/{asset}")
class DocsAsset(ApiView):
    """The Swagger UI files /docs loads (not in the index: assets, not API)."""

    async def get(self, request: Any, asset: str) -> Any:
        if asset not in ASSETS:
            raise ApiError(404, "not_found", f"no asset {asset!r}", {"asset": asset})
        data = INIT_JS.encode() if asset == "init.js" else _asset(asset)
        return self.web.bytes(data, content_type=ASSETS[asset],
                              headers={"Cache-Control": "public, max-age=3600"})


@functools.cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()
