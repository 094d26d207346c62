"""Pattern API: register, list and delete patterns; read recent alerts.

POST   /api/v1/patterns          a definition (JSON) → 201 created / 200 replaced
GET    /api/v1/patterns          every active pattern with its match count
DELETE /api/v1/patterns/{name}   remove a runtime pattern
GET    /api/v1/alerts?pattern=&key=&limit=   recent alerts, newest first
"""

from __future__ import annotations

from typing import Any

import orjson

from app.global_topics import read_recent
from app.kafka_io import kafka_io, partition_for
from app.patterns import EXPR_LANGUAGE, PatternError, parse_definition
from tables.patterns import CONFIG_PATTERNS, ENGINE, alerts_topic, catalog, definitions_topic
from web.api_models import (
    AlertList,
    AlertsQuery,
    Deleted,
    PatternDefinition,
    PatternInfo,
    PatternList,
)
from web.common import ApiError, ApiView, Operation, endpoint, invalid

MAX_LIMIT = 1000


def describe(p: Any) -> dict[str, Any]:
    return {"name": p.name, "type": p.kind, "key_by": p.key_by, "source": p.source,
            "origin": p.origin, "matches": catalog.match_count(p.name), "definition": p.definition}


async def store_definition(name: str, definition: dict[str, Any] | None) -> None:
    """Write (or tombstone) a runtime definition to its compacted topic, acks=all."""
    if not kafka_io.ready.is_set() or kafka_io.producer is None:
        raise ApiError(503, "not_ready", "the worker is still starting; retry shortly")
    value = None if definition is None else orjson.dumps(definition)
    await kafka_io.producer.send_and_wait(definitions_topic.get_topic_name(), value, key=name.encode())


# A definition's rules (conditions, durations, fields per type) are checked by
# app.patterns.parse_definition; the model describes its shape for the document.
@endpoint("/api/v1/patterns", "Register a pattern (POST) or list patterns with match counts (GET)",
          post=Operation(PatternInfo, body=PatternDefinition, statuses=(200, 201),
                         summary="Register a pattern: 201 created, 200 replaced"),
          get=Operation(PatternList, summary="Every active pattern with its match count"))
class Patterns(ApiView):
    async def post(self, request: Any) -> Any:
        body = await self.read_json_object(request)
        try:
            pattern = parse_definition(body, ENGINE, "runtime")
        except PatternError as exc:
            raise invalid(f"invalid pattern: {exc}", {"field": exc.field, "language": EXPR_LANGUAGE}) from None
        if pattern.name in CONFIG_PATTERNS:
            raise ApiError(409, "conflict", f"pattern {pattern.name!r} is declared in the config file",
                           {"field": "name"})
        existed = pattern.name in catalog.runtime
        await store_definition(pattern.name, pattern.definition)
        catalog.put_runtime(pattern.definition, pattern.name)  # read-your-writes here
        return self.reply(describe(pattern), status=200 if existed else 201)

    async def get(self, request: Any) -> Any:
        patterns = sorted(catalog.patterns().values(), key=lambda p: p.name)
        from agents.patterns import stats  # the agents module imports the app: late

        return self.reply({"patterns": [describe(p) for p in patterns], "engine": dict(stats)})


@endpoint("/api/v1/patterns/{name}", "Delete a runtime pattern", delete=Operation(Deleted))
class PatternByName(ApiView):
    async def delete(self, request: Any, name: str) -> Any:
        if name in CONFIG_PATTERNS:
            raise ApiError(409, "conflict", f"pattern {name!r} is declared in the config file; "
                           "remove it there", {"name": name})
        if name not in catalog.runtime:
            raise ApiError(404, "not_found", f"no runtime pattern named {name!r}", {"name": name})
        await store_definition(name, None)
        catalog.put_runtime(None, name)
        return self.reply({"deleted": name})


def parse_alert_query(query: Any) -> tuple[str | None, str | None, int]:
    """pattern, key and limit from the query string; ApiError on a bad limit."""
    raw_limit = query.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid(f"limit must be an integer from 1 to {MAX_LIMIT}", {"field": "limit", "value": raw_limit})
    return query.get("pattern") or None, query.get("key") or None, limit


async def recent_alerts(pattern: str | None, key: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest alerts from the alerts topic itself (the truth on every worker):
    the last ``alerts_scan`` records of each partition (only the key's partition when
    a key is given), filtered, de-duplicated by alert_id, newest first."""
    found: dict[str, dict[str, Any]] = {}

    def take(m: Any) -> None:
        try:
            alert = orjson.loads(m.value)
        except (orjson.JSONDecodeError, TypeError):
            return
        if (pattern is None or alert.get("pattern") == pattern) and \
                (key is None or alert.get("key") == key):
            found.setdefault(alert.get("alert_id"), alert)

    await read_recent(alerts_topic.get_topic_name(), ENGINE.alerts_scan, take,
                      None if key is None else lambda count: partition_for(key.encode(), count, 0))
    alerts = sorted(found.values(), key=lambda a: (a.get("detected_at", 0), a.get("at", 0)), reverse=True)
    return alerts[:limit]


@endpoint("/api/v1/alerts", "Recent alerts, newest first: ?pattern=&key=&limit=",
          get=Operation(AlertList, query=AlertsQuery))
class Alerts(ApiView):
    async def get(self, request: Any) -> Any:
        pattern, key, limit = parse_alert_query(request.query)
        alerts = await recent_alerts(pattern, key, limit)
        return self.reply({"alerts": alerts, "count": len(alerts)})
