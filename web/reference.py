"""PUT /api/v1/reference/{name} and GET /api/v1/reference/{name}/{key}."""

from __future__ import annotations

from typing import Any

import orjson

from app.kafka_io import OutgoingMessage, kafka_io
from tables.reference import NAME, reference_store, reference_topic, row_key
from web.api_models import ReferenceBody, ReferenceKeys, ReferenceRowOut, ReferenceWritten
from web.common import ApiError, ApiView, Operation, endpoint, invalid

MAX_ROWS = 10_000


def parse_rows(name: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """``{"key": k, "row": {...}}``, ``{"key_field": f, "rows": [...]}`` or
    ``{"rows": {"k1": {...}, "k2": null}}`` (null deletes) → [(key, row or None)]."""
    if not NAME.match(name):
        raise invalid("reference name must be 1-64 of letters, digits, '.', '_', '-'", {"field": "name"})
    unknown = set(body) - {"key", "row", "rows", "key_field"}
    if unknown:
        raise invalid(f"unknown fields: {sorted(unknown)}", {"fields": sorted(unknown)})
    pairs: list[tuple[Any, Any]]
    if "row" in body or "key" in body:
        if "key" not in body or "row" not in body:
            raise invalid("'key' and 'row' go together", {"field": "key" if "key" not in body else "row"})
        pairs = [(body["key"], body["row"])]
    elif isinstance(body.get("rows"), dict):
        pairs = list(body["rows"].items())
    elif isinstance(body.get("rows"), list):
        key_field = body.get("key_field")
        if not isinstance(key_field, str) or not key_field:
            raise invalid("a list of rows needs 'key_field'", {"field": "key_field"})
        pairs = []
        for i, row in enumerate(body["rows"]):
            if not isinstance(row, dict) or row.get(key_field) is None:
                raise invalid(f"rows[{i}] must be an object with {key_field!r}", {"index": i, "field": key_field})
            pairs.append((row[key_field], row))
    else:
        raise invalid("give 'key' + 'row', or 'rows' (object of key → row, or list + key_field)", {"field": "rows"})
    if not pairs:
        raise invalid("no rows given", {"field": "rows"})
    if len(pairs) > MAX_ROWS:
        raise ApiError(413, "too_many_rows", f"at most {MAX_ROWS} rows per request", {"limit_rows": MAX_ROWS})
    out = []
    for i, (key, row) in enumerate(pairs):
        if isinstance(key, bool) or not isinstance(key, (str, int)) or str(key) == "":
            raise invalid(f"row {i}: key must be a non-empty string or integer", {"index": i, "field": "key"})
        if row is not None and not isinstance(row, dict):
            raise invalid(f"row {i}: a row is an object (or null to delete)", {"index": i, "field": "row"})
        out.append((str(key), row))
    return out


# parse_rows checks the body (its three shapes and each row); ReferenceBody describes it.
@endpoint("/api/v1/reference/{name}", "Upsert (or delete with null) reference rows for enrichment",
          put=Operation(ReferenceWritten, body=ReferenceBody),
          get=Operation(ReferenceKeys, summary="How many rows a reference set has, and up to 1000 keys"))
class ReferenceRows(ApiView):
    async def put(self, request: Any, name: str) -> Any:
        rows = parse_rows(name, await self.read_json_object(request))
        if not kafka_io.ready.is_set():
            raise ApiError(503, "not_ready", "the worker is still starting; retry shortly")
        topic = reference_topic.get_topic_name()
        partitions = await kafka_io.partition_count(topic)
        messages = [
            OutgoingMessage(row_key(name, key), orjson.dumps(row) if row is not None else None)
            for key, row in rows
        ]
        delivered = await kafka_io.send_batch(topic, messages, partitions or 1)
        latest: dict[int, int] = {}
        for d in delivered:
            latest[d.partition] = max(latest.get(d.partition, -1), d.offset)
        visible = await reference_store.wait_for(latest)
        return self.reply({"name": name, "count": len(rows), "visible_here": visible})

    async def get(self, request: Any, name: str) -> Any:
        rows = reference_store.rows.get(name, {})
        return self.reply({"name": name, "count": len(rows), "keys": sorted(rows)[:1000]})


@endpoint("/api/v1/reference/{name}/{key}", "Read one reference row (any worker)",
          get=Operation(ReferenceRowOut))
class ReferenceRow(ApiView):
    async def get(self, request: Any, name: str, key: str) -> Any:
        row = reference_store.lookup(name, key)
        if row is None:
            raise ApiError(404, "not_found", f"no {name!r} row with key {key!r}", {"name": name, "key": key})
        return self.reply({"name": name, "key": key, "row": row})
