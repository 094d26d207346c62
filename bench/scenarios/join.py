"""The live interval join (agents/join.py): orders joined with payments over 10,000 keys,
matches within 10 s.

One fresh worker, one join pipeline (``type: inner``, ``within: 10s``, ``grace``
option, default 30 s), both topics keyed by ``user_id`` (co-partitioned):

1. throughput: ``--events`` orders and as many payments (each payment 0-5 s after an
   order of the same key; event times spread over ``events / event_rate`` seconds)
   are produced *before* the worker starts; the rate is input records (both sides) the
   join processed / time from its first to its last batch (its own counters,
   ``GET /api/v1/pipelines``), like the raw baseline's consume rate. CPU: the worker
   process meanwhile, per million input records.
2. latency: orders and payments are then produced live at ``--rate`` input records/s
   in total (default 5,000/s) for ``latency_seconds``, event time = send time; a pair's
   latency is the wall time a consumer of the sink reads it minus its time (the later
   side's send time).

Options (``--option K=V``): ``event_rate`` (default 1000 orders/s of event time in the
backlog), ``latency_seconds`` (default 20), ``grace`` (seconds, default 30).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker, create_topics, kafka_options

NAME = "join"
DESCRIPTION = "orders ⋈ payments, inner interval join within 10 s, 10k keys, both sides keyed by user_id"


def config(grace: float) -> dict:
    return {"pipelines": [{
        "name": "paid", "source": "orders", "sink": "paid",
        "steps": [{"op": "join", "with": "payments", "on": "user_id", "within": "10s", "grace": grace,
                   "type": "inner", "time_field": "ts"}],
    }]}


def make_pairs(n: int, keys: int, rng: random.Random, base: float, event_rate: float) -> tuple[list, list]:
    orders, payments = [], []
    for i in range(n):
        user = f"u{rng.randrange(keys):05d}"
        ts = base + i / event_rate
        orders.append({"user_id": user, "order_id": f"o{i}", "ts": ts, "amount": rng.randint(1, 500)})
        payments.append({"user_id": user, "payment_id": f"p{i}", "ts": ts + rng.uniform(0, 5), "method": "card"})
    payments.sort(key=lambda r: r["ts"])
    return orders, payments


async def produce(bootstrap: str, streams: list[tuple[str, list[dict]]], rate: float = 0) -> None:
    """Send each stream's records keyed by user_id; with ``rate``, interleaved at that
    many records/s in total, event time = send time."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kafka_options(),
                                max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = []
        if not rate:
            for topic, records in streams:
                for r in records:
                    futures.append(await producer.send(topic, orjson.dumps(r), key=r["user_id"].encode()))
        else:
            merged = [(topic, r) for topic, records in streams for r in records]
            merged.sort(key=lambda item: item[1]["ts"])
            t0 = time.perf_counter()
            for i, (topic, r) in enumerate(merged):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                r["ts"] = time.time()
                futures.append(await producer.send(topic, orjson.dumps(r), key=r["user_id"].encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def joined(worker: Worker) -> dict:
    status, body = await asyncio.to_thread(worker.get, "/api/v1/pipelines")
    if status != 200:
        return {}
    return next((p["counters"] for p in body["pipelines"] if p["name"] == "paid"), {})


async def wait_processed(worker: Worker, n: int, timeout: float = 1200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = await joined(worker)
        join = counters.get("join", {})
        if join.get("left", 0) + join.get("right", 0) >= n:
            return counters
        await asyncio.sleep(0.5)
    raise TimeoutError(f"join: {n} records not processed in {timeout}s")


async def read_live(bootstrap: str, topic: str, stop: asyncio.Event, latencies: list[float], since: float) -> None:
    """Read ``topic`` from its end; each pair timed at arrival against its time."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                enable_auto_commit=False, **kafka_options())
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for msgs in batch.values():
                for m in msgs:
                    t = orjson.loads(m.value)["ts"]
                    if t >= since:
                        latencies.append((now - t) * 1000)
    finally:
        await consumer.stop()


async def run(ctx: Context) -> Result:
    opts = ctx.args.options
    event_rate = float(opts.get("event_rate", 1000))
    latency_seconds = float(opts.get("latency_seconds", 20))
    grace = float(opts.get("grace", 30))
    rate = ctx.args.rate or 5000.0
    ns = f"{ctx.namespace}j"
    path = Path(tempfile.mkdtemp(prefix="streametl-bench-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config(grace)))
    env = {"STREAMETL_PIPELINES_FILE": str(path)}
    env.update({k.upper(): v for k, v in opts.items() if k.upper().startswith("STREAMETL_")})
    worker = Worker(app_id=ns, topic_prefix=f"{ns}.", env=env)
    orders_t, payments_t, sink = f"{ns}.orders", f"{ns}.payments", f"{ns}.paid"
    await create_topics([orders_t, payments_t, sink], partitions=4)

    rng = random.Random(7)
    base = time.time() - ctx.events / event_rate - 120
    orders, payments = make_pairs(ctx.events, ctx.keys, rng, base, event_rate)
    await produce(ctx.bootstrap, [(orders_t, orders), (payments_t, payments)])
    total = 2 * ctx.events

    await asyncio.to_thread(worker.start, True, 180)
    try:
        assert worker.proc is not None
        cpu0 = process_cpu_seconds(worker.proc.pid)
        done = await wait_processed(worker, total)
        cpu = process_cpu_seconds(worker.proc.pid) - cpu0
        join = done["join"]
        seconds = join["last_batch_at"] - join["first_batch_at"]

        live_n = int(rate * latency_seconds / 2)
        live_orders, live_payments = make_pairs(live_n, ctx.keys, rng, time.time(), rate / 2)
        latencies: list[float] = []
        stop = asyncio.Event()
        since = time.time()
        reader = asyncio.ensure_future(read_live(ctx.bootstrap, sink, stop, latencies, since))
        await asyncio.sleep(2)  # the reader is at the end of the sink
        await produce(ctx.bootstrap, [(orders_t, live_orders), (payments_t, live_payments)], rate=rate)
        after = await wait_processed(worker, total + 2 * live_n)
        await asyncio.sleep(3)
        stop.set()
        await reader
    finally:
        worker.stop()
    return Result(
        NAME, total, seconds, latencies, cpu,
        settings={"within_s": 10, "grace_s": grace, "keys": ctx.keys, "orders": ctx.events, "payments": ctx.events,
                  "event_rate": event_rate, "live_rate": rate, "latency_seconds": latency_seconds},
        notes=["events: input records of both sides; events/s: those / the join's first-to-last batch time (backlog)",
               "latency: wall time a consumer read a pair on the sink - the pair's time (the later side's send time), live phase",
               "CPU: worker process while draining the backlog (includes idle polling)",
               "backlog: each topic is produced whole before the worker starts, so one side may be read ahead of the "
               "other; records behind the grace count as late (extra.join.late)"],
        extra={"join": {k: v for k, v in join.items() if not k.endswith("_at")},
               "live_join": {k: v for k, v in after["join"].items() if not k.endswith("_at")},
               "latency_pairs": len(latencies)},
        compare_with="raw-aiokafka",
    )
