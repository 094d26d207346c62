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
        "fetcher": {"started": app._fetcher._started.is_set(), "crashed": app._fetcher._crashed.is_set(),
                    "stopped": app._fetcher._stopped.is_set(), "state": str(app._fetcher.state)},
        "assigned": mine(consumer.assignment()),
        "active": mine(consumer._active_partitions or ()),
        "buffered": mine(consumer._buffered_partitions),
        "read_offset": {f"{tp.partition}": off for tp, off in consumer._read_offset.items()
                        if tp.topic == settings.topic("passthrough")},
    }


def mine(tps: Any) -> list[int]:
    """The passthrough input's partitions among ``tps``."""
    return sorted(tp.partition for tp in tps if tp.topic == settings.topic("passthrough"))


@endpoint("/api/v1/passthrough", "Events counted by the bare passthrough agent (benchmark)")
class Passthrough(ApiView):
    async def get(self, request: Any) -> Any:
        if not settings.passthrough_enabled:
            raise ApiError(404, "not_enabled", "the passthrough agent is off",
                           {"setting": "STREAMETL_PASSTHROUGH_ENABLED"})
        return self.reply({**STATS, "consumer": consumer_state()})
