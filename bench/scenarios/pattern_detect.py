"""pattern-detect: five patterns (threshold, frequency, trend, anomaly, sequence) keyed
by user over the benchmark's key space, on one real worker.

The worker is started first; then events (keyed by user_id, the engine's source key,
so no repartition hop) are produced as fast as possible (or paced with ``--rate``).
Throughput = events / (first send → the worker's committed offsets reach the end);
latency = alert ``detected_at`` − event time of the event that completed the match
(event time is stamped at send). Options: ``--option workers=N`` (default 1).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.events import make_payloads
from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker

NAME = "pattern-detect"
DESCRIPTION = "threshold + frequency + trend + anomaly + sequence per user, alerts to a topic"

PATTERNS = [
    {"name": "big-value", "type": "threshold", "key_by": "user_id", "where": "value > 98"},
    {"name": "login-burst", "type": "frequency", "key_by": "user_id",
     "where": "action == 'login'", "count": 3, "within": 60},
    {"name": "value-rising", "type": "trend", "key_by": "user_id", "field": "value",
     "direction": "rising", "min_slope": 20, "points": 5, "per": "point"},
    {"name": "value-odd", "type": "anomaly", "key_by": "user_id", "field": "value",
     "method": "ewma", "alpha": 0.2, "threshold": 3, "warmup": 5},
    {"name": "login-then-buy-abroad", "type": "sequence", "key_by": "user_id", "within": 60,
     "steps": [{"name": "login", "where": "action == 'login'"},
               {"name": "buy", "where": "action == 'purchase' and country != match.login.country"}]},
]


async def committed_total(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def read_alerts(bootstrap: str, topic: str) -> list[dict]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[dict] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            batch = await consumer.getmany(timeout_ms=1000, max_records=20000)
            for msgs in batch.values():
                out.extend(orjson.loads(m.value) for m in msgs)
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return out


def expected_alerts(events: list[dict]) -> dict[str, int]:
    """Alerts per pattern recomputed by folding the sent events (their send-time ``ts``)
    through the pure matchers, key by key in send order (each key's order is kept:
    events are keyed by user)."""
    from app.patterns import EngineConfig, parse_definition

    patterns = [parse_definition(d, EngineConfig()) for d in PATTERNS]
    states: dict[tuple[str, str], object] = {}
    counts = {p.name: 0 for p in patterns}
    for e in events:
        for p in patterns:
            key = (p.name, e["user_id"])
            states[key], matches = p.matcher.step(states.get(key), e, e["ts"], e["event_id"])
            counts[p.name] += len(matches)
    return counts


async def run(ctx: Context) -> Result:
    workers_n = int(ctx.args.options.get("workers", 1))
    config = Path(tempfile.mkdtemp(prefix="bench-patterns-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump({"patterns": {
        "sources": ["events"], "source_key": "user_id", "definitions": PATTERNS}}))
    env = {"STREAMETL_PIPELINES_FILE": str(config), "STREAMETL_PRODUCER_LINGER": "0.005"}
    workers = [Worker(app_id=ctx.namespace, topic_prefix=f"{ctx.namespace}.", env=env)
               for _ in range(workers_n)]
    for w in workers:
        w.start(timeout=180)
    events_topic = workers[0].topic_prefix + "events"
    alerts_topic = workers[0].topic_prefix + "alerts"
    events = make_payloads(ctx.events, ctx.keys)
    admin = AIOKafkaAdminClient(bootstrap_servers=ctx.bootstrap)
    await admin.start()
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all", linger_ms=5,
                                max_batch_size=512 * 1024)
    await producer.start()
    try:
        pids = [w.proc.pid for w in workers if w.proc is not None]
        cpu0 = sum(process_cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        interval = 1.0 / ctx.args.rate if ctx.args.rate else 0.0
        futures = []
        for i, e in enumerate(events):
            if interval and i % 100 == 0:
                # Pace in steps of 100 so the producer is not a timer loop.
                lag = t0 + i * interval - time.perf_counter()
                if lag > 0:
                    await asyncio.sleep(lag)
            e["ts"] = e["sent_at"] = time.time()
            futures.append(await producer.send(events_topic, orjson.dumps(e), key=e["user_id"].encode()))
        await asyncio.gather(*futures)
        produced_s = time.perf_counter() - t0
        deadline = time.monotonic() + max(300.0, ctx.events / 1000)
        while await committed_total(admin, ctx.namespace, events_topic) < len(events):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not catch up in time")
            await asyncio.sleep(0.2)
        # Offsets are committed every commit_interval (1 s): up to that much is idle time.
        seconds = time.perf_counter() - t0
        cpu = sum(process_cpu_seconds(p) for p in pids) - cpu0
        alerts = await read_alerts(ctx.bootstrap, alerts_topic)
    finally:
        await producer.stop()
        await admin.close()
        for w in workers:
            w.stop()
    latencies = [
        (a["detected_at"] - max(e["ts"] for e in a["evidence"])) * 1000
        for a in alerts if a["kind"] != "absence" and a["evidence"]
    ]
    by_pattern: dict[str, int] = {}
    for a in alerts:
        by_pattern[a["pattern"]] = by_pattern.get(a["pattern"], 0) + 1
    expected = expected_alerts(events)
    return Result(
        NAME, len(events), seconds, latencies, cpu,
        settings={"workers": workers_n, "patterns": len(PATTERNS), "keys": ctx.keys,
                  "rate": ctx.args.rate or "max", "source_key": "user_id (no repartition)",
                  "producer_linger_s": env["STREAMETL_PRODUCER_LINGER"]},
        notes=[
            "throughput: first send until committed offsets cover every event (commit every 1 s)",
            "latency: alert detected_at minus event time (stamped at send) of the completing event",
            "CPU is the worker process(es) only; the producer runs in the bench process",
        ],
        extra={"alerts_by_pattern": by_pattern, "alerts_expected_by_fold": expected,
               "alerts_match_fold": by_pattern == {k: v for k, v in expected.items() if v},
               "produce_seconds": round(produced_s, 3)},
        compare_with="raw-aiokafka",
    )
