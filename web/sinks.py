"""GET /api/v1/sinks: the database sinks, their state and counters (this worker)."""

from __future__ import annotations

from typing import Any

from agents.db_sink import SINKS
from web.common import ApiView, endpoint


@endpoint("/api/v1/sinks", "Database sinks: state, counters and the offsets applied (this worker)")
class Sinks(ApiView):
    async def get(self, request: Any) -> Any:
        return self.reply({"sinks": [sink.describe() for sink in SINKS.values()]})
