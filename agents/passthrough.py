"""A bare counting agent: the consume benchmark's subject (bench agent-passthrough).

It reads ``<prefix>passthrough`` and only counts, so its rate is the cost of Faust's
consume path itself (fetch, deliver, stream iteration, acks, commits). It exists only
when ``STREAMETL_PASSTHROUGH_ENABLED=true``: a production worker neither subscribes to
nor creates its topic. ``GET /api/v1/passthrough`` (web/passthrough.py) reads the counter.
"""

from __future__ import annotations

import time
from typing import Any

from app import app, settings

#: What the agent has counted so far, in this process.
STATS: dict[str, Any] = {"events": 0, "batches": 0, "first_at": None, "last_at": None,
                         "mode": settings.passthrough_mode}


def count(n: int) -> None:
    """Add ``n`` processed events to the counter, stamping first and last times."""
    now = time.time()
    if STATS["first_at"] is None:
        STATS["first_at"] = now
    STATS["events"] += n
    STATS["batches"] += 1
    STATS["last_at"] = now


if settings.passthrough_enabled:
    from app.topics import declare

    passthrough_topic = declare("passthrough")

    if settings.passthrough_mode == "each":

        @app.agent(passthrough_topic, name="passthrough")
        async def passthrough(stream):
            """Count every event, one at a time (the per-event stream path)."""
            async for _event in stream:
                count(1)

    else:

        @app.agent(passthrough_topic, name="passthrough")
        async def passthrough(stream):
            """Count events in batches (``take``: the path the project's agents use)."""
            async for batch in stream.take(settings.batch_max, within=settings.batch_within):
                count(len(batch))
