"""Windowed count + sum per user over 10,000 keys: 10 s tumbling, then 60 s / 10 s hopping.

Per window type, one fresh worker:

1. throughput: ``--events`` click events (keyed by user_id, event time spread over
   ``events / event_rate`` seconds) are produced *before* the worker starts; the rate is
   records the window agent processed / time from its first to its last batch (the
   worker's own counters, ``GET /api/v1/windows``), like the raw baseline's consume rate.
2. latency: events are then produced live at ``--rate`` (default 1,000/s) for
   ``latency_seconds`` with event time = send time. A window's latency is the sink
   record's timestamp minus the wall time at which the window became closeable (its
   end + grace): how long after a window could close its final result is on the sink
   topic (windows closed by event time during the live phase). The sink topic is
   created first with ``message.timestamp.type=LogAppendTime``, so that a result's
   timestamp is when the broker stored it, not when the worker appended it to a record
   batch (option ``log_append_time=false``: the worker's time, as before session 21).

Options (``--option K=V``): ``repartition`` (default false: the source is keyed by
user_id, so no repartition hop; true measures the rekey agent too), ``event_rate``
(event-time events/s in the backlog, default 1000), ``latency_seconds`` (default 25),
``types`` (default tumbling,hopping), ``live_linger_ms`` (the live producer's linger,
default 0, as ``bench.events.produce_events`` explains), ``log_append_time`` (default
true, see 2.).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import orjson
import yaml

from bench.events import make_event, produce_events
from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker, create_topics, read_topic

NAME = "window-aggregate"
DESCRIPTION = "count + sum per user_id, 10 s tumbling and 60 s / 10 s hopping windows, 10k keys"

WINDOWS = {
    "tumbling": {"type": "tumbling", "size": 10, "grace": 0},
    "hopping": {"type": "hopping", "size": 60, "step": 10, "grace": 0},
}


def config(kind: str, repartition: bool) -> dict:
    return {"windows": [{
        "name": f"bench-{kind}", "source": "clicks", "key_by": "user_id", "time_field": "ts",
        "window": WINDOWS[kind],
        "aggregations": [{"name": "count", "type": "count"},
                         {"name": "sum", "type": "sum", "field": "value"}],
        "emit": "final", "idle_close": 5, "repartition": repartition,
    }]}


async def wait_processed(worker: Worker, name: str, n: int, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(worker.get, "/api/v1/windows")
        if status == 200:
            for w in body["windows"]:
                if w["name"] == name and w["stats"].get("records", 0) + w["stats"].get("late", 0) >= n:
                    return w
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{name}: {n} records not processed in {timeout}s")


async def run_one(ctx: Context, kind: str) -> Result:
    opts = ctx.args.options
    repartition = opts.get("repartition", "false").lower() == "true"
    event_rate = float(opts.get("event_rate", 1000))
    latency_seconds = float(opts.get("latency_seconds", 25))
    rate = ctx.args.rate or 1000.0
    grace_ms = WINDOWS[kind]["grace"] * 1000
    ns = f"{ctx.namespace}{kind[:3]}"
    path = Path(tempfile.mkdtemp(prefix="streametl-bench-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config(kind, repartition)))
    env = {"STREAMETL_PIPELINES_FILE": str(path)}
    env.update({k.upper(): v for k, v in opts.items() if k.upper().startswith("STREAMETL_")})
    worker = Worker(app_id=ns, topic_prefix=f"{ns}.", env=env)
    topic = f"{ns}.clicks"
    name = f"bench-{kind}"
    await create_topics([topic], partitions=4)
    log_append_time = opts.get("log_append_time", "true").lower() == "true"
    if log_append_time:
        await create_topics([f"{ns}.{name}.aggregates"], partitions=4,
                            configs={"message.timestamp.type": "LogAppendTime"})

    # Backlog: event time spread at event_rate per second, ending a minute before now.
    rng = random.Random(7)
    span = ctx.events / event_rate
    base = time.time() - span - 60
    backlog = [make_event(i, ctx.keys, rng, ts=base + i / event_rate) for i in range(ctx.events)]
    await produce_events(ctx.bootstrap, topic, backlog)

    await asyncio.to_thread(worker.start, True, 180)
    try:
        assert worker.proc is not None
        cpu0 = process_cpu_seconds(worker.proc.pid)
        done = await wait_processed(worker, name, ctx.events)
        cpu = process_cpu_seconds(worker.proc.pid) - cpu0
        seconds = done["last_batch_at"] - done["first_batch_at"]

        live_n = int(rate * latency_seconds)
        live = [make_event(ctx.events + i, ctx.keys, rng) for i in range(live_n)]
        live_start = time.time() * 1000
        await produce_events(ctx.bootstrap, topic, live, rate=rate, linger_ms=int(opts.get("live_linger_ms", 0)))
        live_end = time.time() * 1000
        await wait_processed(worker, name, ctx.events + live_n)
        results = await read_sink(ctx.bootstrap, f"{ns}.{name}.aggregates")
        latencies = []
        for timestamp, value in results:
            v = orjson.loads(value)
            # Windows that ended during the live phase, closed by event time: event time
            # is send time there, so a window is closeable at wall time end + grace. The
            # record's Kafka timestamp (ms) is when the broker stored the result (with
            # log_append_time=false: when the worker appended it to a record batch).
            closeable = v["end"] + grace_ms
            if v["closed_by"] == "event_time" and live_start <= closeable <= live_end:
                latencies.append(timestamp - closeable)
    finally:
        worker.stop()
    return Result(
        f"{NAME}-{kind}", ctx.events, seconds, latencies, cpu,
        settings={"window": WINDOWS[kind], "keys": ctx.keys, "repartition": repartition,
                  "event_rate": event_rate, "live_rate": rate, "latency_seconds": latency_seconds},
        notes=["events/s: records the window agent processed / its first-to-last batch time (backlog)",
               "latency: sink record timestamp - (window end + grace) as wall time (live phase: event time = send time; windows closed by event time); "
               + ("the timestamp is the broker's (LogAppendTime)" if log_append_time
                  else "the timestamp is the worker's append (CreateTime)"),
               "CPU: worker process while draining the backlog (includes idle polling)"],
        extra={"windows_emitted": len(results), "latency_windows": len(latencies),
               "buffer": done["buffer"], "stats": done["stats"], "timing": done.get("timing")},
        compare_with="raw-aiokafka",
    )


async def read_sink(bootstrap: str, topic: str, idle: float = 8.0) -> list[tuple[int, bytes]]:
    """(Kafka timestamp ms, value) of every record on ``topic``, read until idle."""
    records = await read_topic(topic, idle=idle, timeout=3600, bootstrap=bootstrap)
    return [(r.timestamp, r.value) for r in records]


async def run(ctx: Context) -> list[Result]:
    types = ctx.args.options.get("types", "tumbling,hopping").split(",")
    return [await run_one(ctx, kind) for kind in types]
