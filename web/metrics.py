"""GET /metrics: this worker's metrics in Prometheus' text format (app/metrics.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from web.common import ApiError, ApiView, endpoint


@endpoint("/metrics", "Prometheus metrics of this worker (text format)")
class Metrics(ApiView):
    async def get(self, request: Any) -> Any:
        if metrics.METRICS is None:
            raise ApiError(404, "metrics_disabled", "metrics are off on this worker (STREAMETL_METRICS=false)")
        # Content-Type through headers: aiohttp refuses a charset in ``content_type``.
        return self.web.bytes(metrics.METRICS.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
