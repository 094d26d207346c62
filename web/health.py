"""GET /health and the GET /api/v1 index."""

from __future__ import annotations

from typing import Any

from agents.db_sink import sinks_health
from app import app, settings
from app.kafka_io import kafka_io
from web.api_models import Health as HealthAnswer
from web.api_models import Index as IndexAnswer
from web.common import ENDPOINTS, ApiView, Operation, endpoint


def readiness() -> dict[str, Any]:
    """Why this worker is (not) ready: assigned partitions, recovery, broker."""
    consumer = app.consumer if app.started else None
    assignment = sorted(f"{tp.topic}:{tp.partition}" for tp in consumer.assignment()) if consumer else []
    recovered = app.tables.recovery.completed.is_set() if app.started else False
    broker_ok = kafka_io.ready.is_set()
    # Table recovery completes after the first partition assignment, so it also says
    # the worker has joined the group; a worker may hold no partition of a small topic.
    checks = {
        "joined_group": recovered and not app.rebalancing,
        "broker": broker_ok,
    }
    return {
        "status": "ok" if all(checks.values()) else "starting",
        "checks": checks,
        # A database sink that retries (its database is away) holds its input back and
        # loses nothing: it is reported, it does not make the worker unready.
        "sinks": sinks_health(),
        "app_id": settings.app_id,
        "assigned_partitions": len(assignment),
        "web_port": app.conf.web_port,
    }


@endpoint("/health", "Readiness: 200 once assigned, recovered and connected; 503 before",
          get=Operation(HealthAnswer, statuses=(200, 503)))
class Health(ApiView):
    async def get(self, request: Any) -> Any:
        state = readiness()
        return self.reply(state, status=200 if state["status"] == "ok" else 503)


@endpoint("/api/v1", "This index of endpoints", get=Operation(IndexAnswer))
class Index(ApiView):
    async def get(self, request: Any) -> Any:
        return self.reply(
            {
                "service": "streametl",
                "endpoints": [
                    {"path": e.path, "methods": list(e.methods), "summary": e.summary}
                    for e in sorted(ENDPOINTS, key=lambda e: e.path)
                ],
            }
        )
