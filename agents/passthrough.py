"""A bare counting agent: the consume benchmark's subject (bench agent-passthrough).

It reads ``<prefix>passthrough`` and only counts, so its rate is the cost of Faust's
consume path itself (fetch, deliver, stream iteration, acks, commits). It exists only
when ``STREAMETL_PASSTHROUGH_ENABLED=true``: a production worker neither subscribes to
nor creates its topic. Mode ``forward`` copies every event to ``passthrough.out``
(tests of delivery semantics: what is there was processed). ``GET /api/v1/passthrough`` (web/passthrough.py) reads the counter.
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
    from app.batches import Batch, batch_agent
    from app.commit import emitter
    from app.topics import declare
    from app.transport import commit_guard

    passthrough_topic = declare("passthrough")
    mode = settings.passthrough_mode

    if mode == "batch":

        @batch_agent(passthrough_topic, name="passthrough")
        async def passthrough(records: Batch) -> None:
            """Count each fetched batch (the batch delivery path: app/batches.py)."""
            count(len(records))

    elif mode in {"forward", "forward-stream"}:
        passthrough_out = declare("passthrough.out")

        def src(partition: int, offset: int) -> list[tuple[str, bytes]]:
            return [("src", f"{partition}:{offset}".encode())]

        if mode == "forward":

            @batch_agent(passthrough_topic, name="passthrough")
            async def passthrough(records: Batch) -> None:
                """Copy each record to ``passthrough.out`` with its source ``partition:offset``
                in header ``src``, on the same partition number (under exactly_once the
                output joins the transaction of its input partition); the delivery-semantics
                tests compare it with the input. Outputs are awaited before the batch is
                acked (the consumer acks when this returns)."""
                await emitter.send(passthrough_out, [(r.partition, r.key, r.value, src(r.partition, r.offset),
                                                      r.partition) for r in records])
                count(len(records))

        else:

            @app.agent(passthrough_topic, name="passthrough")
            async def passthrough(stream):
                """The same copy through a Faust stream (``take_events``), for comparison."""
                async for events in stream.take_events(settings.batch_max, within=settings.batch_within):
                    # Outputs and acks of one batch in one section: no commit (transaction,
                    # under exactly_once) can hold outputs of events it does not ack.
                    async with commit_guard.processing():
                        for event in events:
                            m = event.message
                            await passthrough_out.send(key=m.key, value=m.value, partition=m.partition,
                                                       headers=src(m.partition, m.offset))
                        for event in events:
                            event.ack()
                    count(len(events))

    elif mode == "each":

        @app.agent(passthrough_topic, name="passthrough")
        async def passthrough(stream):
            """Count every event, one at a time (the per-event stream path)."""
            async for _event in stream:
                count(1)

    else:

        @app.agent(passthrough_topic, name="passthrough")
        async def passthrough(stream):
            """Count events in batches (``take``: Faust's stream path)."""
            async for batch in stream.take(settings.batch_max, within=settings.batch_within):
                count(len(batch))
