"""The transform pipeline: parse → deduplicate → normalize → enrich → filter → sink.

Two phases against one real worker running the pipeline (and only it):

1. throughput: ``--events`` ~300-byte click events over ``--keys`` users are produced
   *before* the worker starts; the rate is outputs / (last − first sink record
   timestamp), i.e. the worker's own output clock, like the raw baseline's consume rate.
2. latency: events are produced at ``--rate`` (default 5,000/s) for ``latency_seconds``
   (option, default 10), sent in ticks of ``pace_tick_ms`` (option, default 1); option ``profile=DIR`` runs the worker under pyinstrument while a consumer reads the sink; latency = arrival − ``sent_at``.

Option ``horizon_seconds`` (default 3600) is the dedupe step's: with a horizon shorter
than the backlog takes (e.g. 1), entries expire as fast as they are admitted during
most of it, so the throughput phase measures the expiry too (docs/performance.md,
"The dedupe expiry kept across moves").

The ``users`` reference data (one row per key) is loaded first through the HTTP API of
a worker running no pipeline, which then stops: the measured worker starts with every
row in the reference topic, so it enriches every event, and all its work on the backlog
falls inside the CPU measurement. (Loading through the measured worker let it process
the backlog while the rows arrived: early events went unenriched, and their CPU was
missed by a measurement that started after the load.)
"""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.events import make_payloads
from bench.harness import Context, CoresUsed, Result, percentile, process_cpu_seconds
from bench.scenarios.agent_passthrough import ProfiledWorker
from bench.scenarios.raw_aiokafka import produce_raw
from tests.support import Worker, create_topics, kafka_options, read_topic

NAME = "transform"
DESCRIPTION = "parse, deduplicate, normalize, enrich, filter, produce to the sink"

PIPELINE = {"pipelines": [{
    "name": "bench",
    "source": "events",
    "sink": "events.clean",
    "key_by": "user_id",
    "steps": [
        {"op": "deduplicate", "horizon_seconds": 3600},
        {"op": "normalize", "lowercase": ["action", "country"], "timestamps": ["ts"],
         "schema": {"value": {"type": "number", "required": True}}},
        {"op": "enrich", "from": "users", "key": "user_id", "fields": ["tier", "segment"]},
        {"op": "filter", "where": "action != 'heartbeat' and value > 0"},
    ],
}]}


#: The latency phase's load generator wakes at most once per this many ms and sends the
#: events due by then (5 at 5,000 events/s), each stamped as it is handed to the
#: producer. Woken for each event (option ``pace_tick_ms=0``), it used 0.50–0.53 cores
#: instead of 0.41–0.43, on the 2 cores the worker and the broker share
#: (docs/performance.md, "Session 32").
PACE_TICK_MS = 1.0


async def load_users(worker: Worker, keys: int) -> None:
    for start in range(0, keys, 5000):
        rows = {f"u{i:05d}": {"tier": ("gold", "silver", "bronze")[i % 3], "segment": f"s{i % 17}"}
                for i in range(start, min(keys, start + 5000))}
        status, reply = await asyncio.to_thread(worker.put, "/api/v1/reference/users", {"rows": rows})
        if status != 200:
            raise RuntimeError(f"loading users failed: {reply}")


async def latency_phase(ctx: Context, source: str, sink: str, rate: float, seconds: float,
                        worker_side: list[float] | None = None,
                        sent: list[float] | None = None, pace_tick: float = 0.0) -> list[float]:
    """End-to-end latencies (ms) of paced events; ``worker_side`` collects the part up to
    the worker's append of each output (its sink record timestamp minus ``sent_at``),
    ``sent`` each one's ``sent_at``."""
    consumer = AIOKafkaConsumer(sink, bootstrap_servers=ctx.bootstrap, auto_offset_reset="latest", **kafka_options(),
                                group_id=f"{ctx.namespace}-lat", enable_auto_commit=False)
    await consumer.start()
    await consumer.getmany(timeout_ms=1000)  # join and position at the end first
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks=1, linger_ms=0, **kafka_options())
    await producer.start()
    latencies: list[float] = []
    total = int(rate * seconds)
    events = make_payloads(total, ctx.keys, seed=99)

    async def produce() -> None:
        # Woken at most once per ``pace_tick`` seconds, it sends every event due by then,
        # each stamped as it is handed to the producer (0: woken for each event).
        t0 = time.perf_counter()
        i = 0
        while i < total:
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            while i < due:
                event = events[i]
                event["event_id"] = f"lat-{i}"
                event["sent_at"] = time.time()
                await producer.send(source, orjson.dumps(event), key=event["user_id"].encode())
                i += 1
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0 or pace_tick > 0:
                await asyncio.sleep(max(delay, pace_tick))

    async def consume() -> None:
        deadline = time.monotonic() + seconds + 30
        while len(latencies) < total and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for messages in batch.values():
                for m in messages:
                    sent_at = orjson.loads(m.value)["sent_at"]
                    latencies.append((now - sent_at) * 1000)
                    if sent is not None:
                        sent.append(sent_at)
                    if worker_side is not None:
                        worker_side.append(m.timestamp - sent_at * 1000)

    try:
        await asyncio.gather(produce(), consume())
    finally:
        await producer.stop()
        await consumer.stop()
    return latencies


async def run(ctx: Context) -> Result:
    config = Path(tempfile.mkdtemp(prefix="streametl-bench-")) / "pipelines.yaml"
    horizon = float(ctx.args.options.get("horizon_seconds", 3600))
    pipeline = copy.deepcopy(PIPELINE)
    pipeline["pipelines"][0]["steps"][0]["horizon_seconds"] = horizon
    config.write_text(json.dumps(pipeline))
    prefix = f"{ctx.namespace}."
    source, sink = prefix + "events", prefix + "events.clean"
    await create_topics([source, sink], partitions=4)
    events = make_payloads(ctx.events, ctx.keys)
    payloads = [orjson.dumps(e) for e in events]
    await produce_raw(ctx, source, payloads, [e["user_id"].encode() for e in events])

    no_pipelines = config.with_name("no-pipelines.yaml")
    no_pipelines.write_text(json.dumps({"pipelines": []}))
    # A consumer group of its own: the pattern engine of every worker reads ``events``,
    # so a loader in the measured worker's group consumed (and committed) part of the
    # backlog while it loaded users; under load the worker then never saw all of it and
    # the run waited for its counters until the 600 s timeout.
    loader = Worker(app_id=f"{ctx.namespace}-loader", topic_prefix=prefix,
                    env={"STREAMETL_PIPELINES_FILE": str(no_pipelines)})
    loader.start(timeout=120)
    try:
        await load_users(loader, ctx.keys)
    finally:
        loader.stop()

    profile_dir = ctx.args.options.get("profile")  # option profile=DIR: run under pyinstrument
    worker = (ProfiledWorker if profile_dir else Worker)(app_id=ctx.namespace, topic_prefix=prefix,
                    env={"STREAMETL_PIPELINES_FILE": str(config),
                         **{k: v for k, v in ctx.args.options.items() if k.startswith("STREAMETL_")}})
    if profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        worker.profile_path = Path(profile_dir) / "transform.txt"
    worker.start(wait=False)
    try:
        assert worker.proc is not None
        # The backlog is handled as soon as the worker can, maybe before it answers
        # HTTP: its CPU is sampled from the process start, and the CPU spent between
        # its first and last output (the window the rate is measured over) is reported.
        sampler = CpuSampler(worker.proc.pid)
        sampling = asyncio.ensure_future(sampler.run())
        await asyncio.to_thread(worker.wait_ready, 120)
        expected = sum(1 for e in events if e["value"] > 0)
        # The sink is read once the worker has handled the backlog: a reader running
        # alongside would take CPU from the worker on this 2-core machine (the window and
        # pattern scenarios also wait on the worker's counters). The rate still comes
        # from the sink records' own timestamps.
        await wait_handled(worker, len(events))
        out = await read_topic_timestamps(ctx, sink, expected)
        sampling.cancel()
        cpu = sampler.between(min(out) / 1000, max(out) / 1000) if out else None
        seconds = (max(out) - min(out)) / 1000 if len(out) > 1 else float("nan")
        rate = ctx.args.rate or 5000
        lat_seconds = float(ctx.args.options.get("latency_seconds", 10))
        worker_side: list[float] = []
        sent: list[float] = []
        cores = CoresUsed({"worker": worker.proc.pid})
        pace_tick_ms = float(ctx.args.options.get("pace_tick_ms", PACE_TICK_MS))
        pace_tick = pace_tick_ms / 1000
        latencies = await latency_phase(ctx, source, sink, rate, lat_seconds, worker_side, sent, pace_tick)
        latency_phase_cores = cores.stop()
        _, pipelines = worker.get("/api/v1/pipelines")
    finally:
        worker.stop()
    return Result(
        NAME, len(out), seconds, latencies, cpu,
        extra={"latency_to_sink_append_ms": spread(worker_side), "latency_phase_cores": latency_phase_cores},
        settings={"keys": ctx.keys, "partitions": 4, "latency_rate_events_per_s": rate,
                  "latency_seconds": lat_seconds, "steps": "deduplicate, normalize, enrich, filter",
                  "horizon_seconds": horizon, "latency_pace_tick_ms": pace_tick_ms},
        notes=["throughput: backlog produced before start; sink record timestamps first→last",
               "latency: paced input, arrival at a sink consumer minus sent_at (same clock)",
               "latency_to_sink_append_ms: sent_at to the worker's append of the output "
               "(its sink record timestamp); the rest is the sink's ack and the reader's fetch",
               "latency_phase_cores: CPU cores used during the latency phase by the worker, by "
               "this process (load generator and reader) and by the whole machine (broker included)",
               f"worker counters: {pipelines['pipelines'][0]['counters'] if isinstance(pipelines, dict) else pipelines}"],
        sent_at=sent,
        samples={"to_sink_append_ms": worker_side},
    )


async def wait_handled(worker: Worker, count: int, timeout: float = 600) -> None:
    """Wait until the worker's pipeline has handled ``count`` records (its counters)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(worker.get, "/api/v1/pipelines")
        if status == 200:
            c = body["pipelines"][0]["counters"]
            if c["out"] + c["dropped"] + c["dead_lettered"] >= count:
                return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the worker did not handle {count} records in {timeout}s")


class CpuSampler:
    """CPU seconds of a process, sampled every ``interval`` seconds with the wall time."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            try:
                self.samples.append((time.time(), process_cpu_seconds(self.pid)))
            except OSError:
                return
            await asyncio.sleep(self.interval)

    def between(self, start: float, end: float) -> float:
        """CPU seconds used from wall time ``start`` to ``end`` (nearest samples outside
        the span, so it errs high by at most two intervals of CPU)."""
        before = [cpu for at, cpu in self.samples if at <= start]
        after = [cpu for at, cpu in self.samples if at >= end]
        first = before[-1] if before else self.samples[0][1]
        last = after[0] if after else self.samples[-1][1]
        return last - first


def spread(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 of ``values``, rounded to 0.1."""
    ordered = sorted(values)
    return {f"p{q}": (None if not ordered else round(percentile(ordered, q), 1)) for q in (50, 95, 99)}


async def read_topic_timestamps(ctx: Context, topic: str, expected: int) -> list[int]:
    """Kafka timestamps of the first ``expected`` records of a topic (waits for them)."""
    records = await read_topic(topic, expect=expected, timeout=600, bootstrap=ctx.bootstrap)
    return [r.timestamp for r in records[:expected]]


__all__ = ["NAME", "DESCRIPTION", "run", "read_topic"]
