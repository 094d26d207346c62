"""GET /api/v1/passthrough: the consume benchmark's counter (agents/passthrough.py)."""

from __future__ import annotations

from typing import Any

from agents.passthrough import STATS
from app import app, settings
from web.common import ApiError, ApiView, endpoint


def consumer_state() -> dict[str, Any]:
    """Why a consumer might not be fetching: flow, paused partitions, unacked messages."""
    if not app.started:
        return {}
    consumer = app.consumer
    return {
        "flow_active": consumer.flow_active,
        "app_flow_active": app.flow_control.is_active(),
        "paused": sorted(f"{tp.topic}:{tp.partition}" for tp in consumer._paused_partitions),
        "unacked": len(consumer._unacked_messages),
        "rebalancing": app.rebalancing,
    }


@endpoint("/api/v1/passthrough", "Events counted by the bare passthrough agent (benchmark)")
class Passthrough(ApiView):
    async def get(self, request: Any) -> Any:
        if not settings.passthrough_enabled:
            raise ApiError(404, "not_enabled", "the passthrough agent is off",
                           {"setting": "STREAMETL_PASSTHROUGH_ENABLED"})
        return self.reply({**STATS, "consumer": consumer_state()})
