"""GET /api/v1/pipelines: the configured pipelines with this worker's live counters."""

from __future__ import annotations

from typing import Any

from agents.pipeline import COUNTERS, PIPELINES
from app import app, settings
from web.api_models import PipelineList
from web.common import ApiView, Operation, endpoint


@endpoint("/api/v1/pipelines", "Configured live pipelines with live counters (this worker)",
          get=Operation(PipelineList))
class Pipelines(ApiView):
    async def get(self, request: Any) -> Any:
        return self.reply({
            "worker": {"web_port": app.conf.web_port, "app_id": settings.app_id},
            "pipelines": [
                {
                    "name": spec.name,
                    "source": settings.topic(spec.source),
                    "sink": settings.topic(spec.sink),
                    "key_by": spec.key_by,
                    "steps": spec.step_specs,
                    "counters": COUNTERS[spec.name].as_dict(),
                }
                for spec in PIPELINES.values()
            ],
        })
