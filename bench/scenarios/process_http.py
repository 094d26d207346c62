"""POST /api/v1/process of one record, sequential requests, against one real worker.

The body is the README's example with one record: ``{"records": [{"User_ID": "123",
"Action": " Click ", "value": "1"}], "transformations": ["deduplicate", "normalize"]}``.
One client sends ``requests`` of them one after the other (each waits for the answer
before the next is sent) after a warm-up of ``warmup`` requests (connection set-up,
first-call costs). Latency is per request, client send → whole answer read; each answer
is checked (200, the normalized record). ``--runs N`` repeats this with a fresh worker
per run, so the report has p50/p99 as min / median / max over the runs.

Options (``--option K=V``): ``requests`` (per run, default 5000), ``warmup`` (200).
``--events`` is not used: the number of requests is ``requests``.
"""

from __future__ import annotations

import time

import aiohttp
import orjson

from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker

NAME = "process-http"
DESCRIPTION = "POST /api/v1/process of one record (the README example), sequential requests"

#: The README's example, with one record.
BODY = orjson.dumps({
    "records": [{"User_ID": "123", "Action": " Click ", "value": "1"}],
    "transformations": ["deduplicate", "normalize"],
})
EXPECTED = [{"user_id": "123", "action": "Click", "value": "1"}]


async def run(ctx: Context) -> Result:
    opts = ctx.args.options
    requests = int(opts.get("requests", 5000))
    warmup = int(opts.get("warmup", 200))
    # No pipelines: nothing else runs on the two cores while the requests are timed.
    worker = Worker(app_id=ctx.namespace, topic_prefix=f"{ctx.namespace}.",
                    env={"STREAMETL_PIPELINES_FILE": ""}).start()
    try:
        url = worker.url + "/api/v1/process"
        headers = {"Content-Type": "application/json"}
        latencies: list[float] = []

        async def one(session: aiohttp.ClientSession) -> float:
            started = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as resp:
                reply = await resp.read()
            took = (time.perf_counter() - started) * 1000
            if resp.status != 200:
                raise RuntimeError(f"process failed: {resp.status} {reply[:300]!r}")
            if orjson.loads(reply)["records"] != EXPECTED:
                raise RuntimeError(f"process answered {reply[:300]!r}")
            return took

        assert worker.proc is not None
        async with aiohttp.ClientSession() as session:
            for _ in range(warmup):
                await one(session)
            cpu0, t0 = process_cpu_seconds(worker.proc.pid), time.perf_counter()
            for _ in range(requests):
                latencies.append(await one(session))
            seconds = time.perf_counter() - t0
            cpu = process_cpu_seconds(worker.proc.pid) - cpu0
    finally:
        worker.stop()
    return Result(
        NAME, requests, seconds, latencies, cpu,
        settings={"requests": requests, "warmup": warmup, "clients": 1, "records_per_request": 1,
                  "transformations": ["deduplicate", "normalize"]},
        notes=["latency per HTTP request (client send → answer read), one client, sequential",
               "events/s = requests/s; CPU is the worker process only"],
        compare_with=None,
    )
