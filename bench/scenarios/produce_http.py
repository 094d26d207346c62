"""POST /api/v1/produce with batches of 1,000 events against one real worker."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from bench.events import make_payloads
from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker, create_topics

NAME = "produce-http"
DESCRIPTION = "batches of 1,000 ~300-byte events through POST /api/v1/produce"


async def run(ctx: Context) -> Result:
    batch_size = int(ctx.args.options.get("batch", 1000))
    concurrency = int(ctx.args.options.get("concurrency", 4))
    # A topic no agent reads: this measures the produce path, not the sample pipelines
    # that would otherwise consume `events` on the same two cores.
    topic = f"{ctx.namespace}.produce-bench"
    await create_topics([topic], partitions=4)
    worker = Worker(app_id=ctx.namespace, topic_prefix=f"{ctx.namespace}.").start()
    try:
        events = make_payloads(ctx.events, ctx.keys)
        bodies = [
            orjson.dumps({"topic": topic, "key_field": "user_id", "messages": events[i : i + batch_size]})
            for i in range(0, len(events), batch_size)
        ]
        latencies: list[float] = []
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def client(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(
                    worker.url + "/api/v1/produce", data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    reply = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"produce failed: {resp.status} {reply[:300]!r}")
                latencies.append((time.perf_counter() - started) * 1000)

        assert worker.proc is not None
        async with aiohttp.ClientSession() as session:
            # One warm-up request so connection set-up and metadata are not measured.
            await session.post(worker.url + "/api/v1/produce", data=bodies[0],
                               headers={"Content-Type": "application/json"})
            cpu0, t0 = process_cpu_seconds(worker.proc.pid), time.perf_counter()
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
            seconds = time.perf_counter() - t0
            cpu = process_cpu_seconds(worker.proc.pid) - cpu0
    finally:
        worker.stop()
    return Result(
        NAME, len(events), seconds, latencies, cpu,
        settings={"batch": batch_size, "concurrency": concurrency, "acks": "all", "key_field": "user_id"},
        notes=["latency is per HTTP request of one batch (send → all acks → reply)",
               "CPU is the worker process only"],
        compare_with="raw-aiokafka-produce",
    )
