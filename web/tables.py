"""GET /api/v1/tables/{name}/{key} and GET /api/v1/tables/{name}?prefix=&limit=: the
rows of a materialized table. Every worker keeps the whole table (agents/db_sink.py),
so any worker answers, from its own copy (it follows the change stream within about a
fetch of the others)."""

from __future__ import annotations

from typing import Any

from agents.db_sink import materialized
from web.common import ApiError, ApiView, endpoint, invalid

MAX_LIMIT = 1000


def table_or_404(name: str) -> Any:
    sink = materialized(name)
    if sink is None:
        raise ApiError(404, "not_found", f"no materialized table named {name!r}", {"name": name})
    return sink


def key_values(sink: Any, raw: str) -> tuple[Any, ...]:
    """The key from the URL: comma-separated for a composite key; numbers when the
    key column holds numbers."""
    parts = raw.split(",")
    if len(parts) != len(sink.spec.key):
        raise invalid(f"the key of {sink.spec.name!r} has {len(sink.spec.key)} part(s): "
                      f"{', '.join(sink.spec.key)}", {"key": raw})
    out = []
    for column, part in zip(sink.spec.key, parts, strict=True):
        kind = sink.target.columns.get(column, "TEXT").upper()
        try:
            out.append(int(part) if "INT" in kind else float(part) if kind in {"REAL", "DOUBLE PRECISION"} else part)
        except ValueError:
            raise invalid(f"key column {column!r} holds numbers, not {part!r}", {"key": raw}) from None
    return tuple(out)


@endpoint("/api/v1/tables/{name}", "Rows of a materialized table: ?prefix= (of the first key column) &limit=")
class TableScan(ApiView):
    async def get(self, request: Any, name: str) -> Any:
        sink = table_or_404(name)
        prefix = request.query.get("prefix", "")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            raise invalid(f"limit must be an integer from 1 to {MAX_LIMIT}", {"field": "limit"})
        rows = await sink.target.scan(prefix, limit)
        return self.reply({"table": name, "rows": rows, "count": len(rows), "offsets": sink.describe()["partitions"]})


@endpoint("/api/v1/tables/{name}/{key}", "One row of a materialized table by key")
class TableRow(ApiView):
    async def get(self, request: Any, name: str, key: str) -> Any:
        sink = table_or_404(name)
        row = await sink.target.get(key_values(sink, key))
        if row is None:
            raise ApiError(404, "not_found", f"no row with key {key!r} in {name!r}", {"key": key})
        return self.reply({"table": name, "key": key, "row": row})
