"""GET /api/v1/cluster: every live worker of the app id, its partitions, counters and
lag, and the cluster-wide totals (app/cluster.py)."""

from __future__ import annotations

from typing import Any

from app import cluster as cluster_module
from app import settings
from web.common import ApiError, ApiView, endpoint


def cluster_view() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(live workers, their totals), or None when metrics are off."""
    service = cluster_module.cluster
    if service is None:
        return None
    workers = service.view()
    return workers, cluster_module.totals(workers)


@endpoint("/api/v1/cluster", "Every worker of the app id: partitions, counters, lag; cluster totals")
class Cluster(ApiView):
    async def get(self, request: Any) -> Any:
        view = cluster_view()
        if view is None:
            raise ApiError(404, "metrics_disabled", "the cluster view is off on this worker (STREAMETL_METRICS=false)")
        workers, totals = view
        return self.reply({
            "app_id": settings.app_id,
            "interval_seconds": settings.cluster_status_interval,
            "timeout_seconds": settings.cluster_status_timeout,
            "workers": workers,
            "totals": totals,
        })
