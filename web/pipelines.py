"""GET /api/v1/pipelines: the configured pipelines with this worker's live counters
and, from the cluster status (app/cluster.py), the totals of every live worker."""

from __future__ import annotations

from typing import Any

from agents.pipeline import COUNTERS, PIPELINES
from app import app, settings
from web.api_models import PipelineList
from web.cluster import cluster_view
from web.common import ApiView, Operation, endpoint


@endpoint("/api/v1/pipelines", "Configured live pipelines with live counters (this worker and the cluster)",
          get=Operation(PipelineList))
class Pipelines(ApiView):
    async def get(self, request: Any) -> Any:
        view = cluster_view()
        totals = {} if view is None else view[1]["pipelines"]
        return self.reply({
            "worker": {"web_port": app.conf.web_port, "app_id": settings.app_id},
            # null when metrics are off; else the live workers' ids.
            "cluster_workers": None if view is None else [w["worker"] for w in view[0]],
            "pipelines": [
                {
                    "name": spec.name,
                    "source": settings.topic(spec.source),
                    "sink": settings.topic(spec.sink),
                    "key_by": spec.key_by,
                    "steps": spec.step_specs,
                    "counters": COUNTERS[spec.name].as_dict(),
                    # Summed over the live workers' latest status records (null: metrics off).
                    "cluster_counters": None if view is None else totals.get(spec.name),
                }
                for spec in PIPELINES.values()
            ],
        })
