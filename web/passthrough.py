"""GET /api/v1/passthrough: the consume benchmark's counter (agents/passthrough.py)."""

from __future__ import annotations

from typing import Any

from agents.passthrough import STATS
from app import settings
from web.common import ApiError, ApiView, endpoint


@endpoint("/api/v1/passthrough", "Events counted by the bare passthrough agent (benchmark)")
class Passthrough(ApiView):
    async def get(self, request: Any) -> Any:
        if not settings.passthrough_enabled:
            raise ApiError(404, "not_enabled", "the passthrough agent is off",
                           {"setting": "STREAMETL_PASSTHROUGH_ENABLED"})
        return self.reply(dict(STATS))
