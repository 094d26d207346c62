"""POST /api/v1/aggregate against two workers of one app: sequential requests, then 16
concurrent clients, each request sent to the two workers in turn, so about half of them
reach a worker that does not own the window_id and take the one HTTP hop to its owner.

Every request adds a known value to one of ``windows`` window_ids (a count window larger
than the run, one sum); at the end each window_id's running sum is read back from both
workers and checked against the sum of the values sent (``correct`` in the report).
Options: ``runs`` (5), ``requests`` per mode and run (2000), ``concurrency`` (16),
``windows`` (64), ``guarantee`` (at_least_once), ``workers`` (2; 1 = no hop).
Repeated ``runs`` times on the same workers; the report has each run's p50/p99 and
requests/s and their distribution (min / median / max over the runs)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import aiohttp
import orjson

from bench.harness import Context, Result, percentile, process_cpu_seconds
from tests.support import Worker

NAME = "aggregate-api"
DESCRIPTION = "POST /api/v1/aggregate, sequential and 16 concurrent clients, two workers (half the requests hop)"


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}


async def run(ctx: Context) -> list[Result]:
    opts = ctx.args.options
    requests = int(opts.get("requests", 2000))  # per mode and run
    runs = int(opts.get("runs", 5))
    concurrency = int(opts.get("concurrency", 16))
    windows = int(opts.get("windows", 64))
    guarantee = opts.get("guarantee", "at_least_once")
    n_workers = int(opts.get("workers", 2))  # 1: no request needs the hop
    env = {"STREAMETL_PIPELINES_FILE": "", "STREAMETL_PROCESSING_GUARANTEE": guarantee}
    workers = [Worker(app_id=ctx.namespace, topic_prefix=f"{ctx.namespace}.", env=env) for _ in range(n_workers)]
    for w in workers:
        w.start(wait=False)
    sent: dict[str, int] = {}
    per_mode: dict[str, list[dict[str, Any]]] = {"sequential": [], f"concurrent-{concurrency}": []}
    all_latencies: dict[str, list[float]] = {m: [] for m in per_mode}
    cpu = dict.fromkeys(per_mode, 0.0)
    seconds = dict.fromkeys(per_mode, 0.0)
    correct = False
    try:
        for w in workers:
            w.wait_ready(180)
        urls = [w.url + "/api/v1/aggregate" for w in workers]
        headers = {"Content-Type": "application/json"}
        counter = iter(range(10**12))

        async def one(session: aiohttp.ClientSession, latencies: list[float] | None) -> None:
            i = next(counter)
            window_id = f"w{i % windows}"
            value = i % 7 + 1
            body = orjson.dumps({"window_id": window_id, "window_size": 10**9, "aggregation": "sum",
                                 "value_key": "v", "record": {"v": value}})
            started = time.perf_counter()
            async with session.post(urls[i % len(urls)], data=body, headers=headers) as resp:
                reply = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"aggregate failed: {resp.status} {reply[:300]!r}")
            if latencies is not None:
                latencies.append((time.perf_counter() - started) * 1000)
            sent[window_id] = sent.get(window_id, 0) + value

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(2 * windows):  # warm-up: connections, every window_id once per worker
                await one(session, None)
            for _ in range(runs):
                for mode in per_mode:
                    latencies: list[float] = []
                    pids = [w.proc.pid for w in workers if w.proc is not None]
                    cpu0 = sum(process_cpu_seconds(p) for p in pids)
                    t0 = time.perf_counter()
                    if mode == "sequential":
                        for _ in range(requests):
                            await one(session, latencies)
                    else:
                        left = iter(range(requests))

                        async def client(left: Any = left, latencies: Any = latencies) -> None:
                            for _ in left:
                                await one(session, latencies)

                        await asyncio.gather(*(client() for _ in range(concurrency)))
                    took = time.perf_counter() - t0
                    cpu[mode] += sum(process_cpu_seconds(p) for p in pids) - cpu0
                    seconds[mode] += took
                    lat = sorted(latencies)
                    all_latencies[mode] += latencies
                    per_mode[mode].append({"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                                           "max": lat[-1], "rps": len(lat) / took})
            # The running aggregates, read back from both workers.
            correct = True
            for window_id, total in sent.items():
                for url in urls:
                    async with session.get(f"{url}/{window_id}") as resp:
                        view = orjson.loads(await resp.read())
                    got = sum(w["aggregates"]["sum"] for w in view["windows"])
                    if got != total:
                        correct = False
                        print(f"[bench] {window_id}: {got} != {total} sent", flush=True)
    finally:
        for w in workers:
            w.stop()
    results = []
    load = os.getloadavg()
    for mode, per_run in per_mode.items():
        results.append(Result(
            f"{NAME}-{mode}", len(all_latencies[mode]), seconds[mode], all_latencies[mode], cpu[mode],
            settings={"workers": n_workers, "runs": runs, "requests_per_run": requests, "window_ids": windows,
                      "processing_guarantee": guarantee, "clients": 1 if mode == "sequential" else concurrency},
            extra={"p50_ms_over_runs": _spread([r["p50"] for r in per_run]),
                   "p99_ms_over_runs": _spread([r["p99"] for r in per_run]),
                   "requests_per_second_over_runs": _spread([r["rps"] for r in per_run]),
                   "runs": [{k: round(v, 2) for k, v in r.items()} for r in per_run],
                   "running_aggregates_correct": correct,
                   "load_average_at_end": [round(x, 2) for x in load]},
            notes=["latency per HTTP request (client send → answer); with 2 workers half the requests hop to the owner",
                   "CPU is both workers'"],
            compare_with=None,
        ))
    if not correct:
        raise RuntimeError("the running aggregates differ from the values sent")
    return results
