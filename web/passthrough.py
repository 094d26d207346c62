"""GET /api/v1/passthrough: the consume benchmark's counter (agents/passthrough.py)."""

from __future__ import annotations

from typing import Any

from agents.passthrough import STATS
from app import app, settings
from app.transport import consumer_state as transport_consumer_state
from web.common import ApiError, ApiView, endpoint


def consumer_state() -> dict[str, Any]:
    """Why a consumer might not be fetching: flow, paused partitions, unacked messages."""
    if not app.started:
        return {}
    return transport_consumer_state(app, settings.topic("passthrough"))


@endpoint("/api/v1/passthrough", "Events counted by the bare passthrough agent (benchmark)")
class Passthrough(ApiView):
    async def get(self, request: Any) -> Any:
        if not settings.passthrough_enabled:
            raise ApiError(404, "not_enabled", "the passthrough agent is off",
                           {"setting": "STREAMETL_PASSTHROUGH_ENABLED"})
        return self.reply({**STATS, "consumer": consumer_state()})
