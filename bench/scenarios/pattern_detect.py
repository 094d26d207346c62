"""pattern-detect: five patterns (threshold, frequency, trend, anomaly, sequence) keyed
by user over the benchmark's key space, on one real worker.

Two phases (like ``transform`` and ``window-aggregate``):

1. throughput: ``--events`` events (keyed by user_id, the engine's source key, so no
   repartition hop) are produced *before* the worker starts, event time spread at
   ``event_rate`` per second (option, default 20,000) ending a minute before now; the
   rate is records / (last - first handled batch) by the worker's own clock
   (``GET /api/v1/patterns`` "engine"), like the raw baseline's consume rate. Why not
   "first send until commits reach the end": the producer alone reaches only ~15-20k
   events/s on this machine, so that figure measured the producer, and a worker
   started before its input topic existed could miss the topic altogether.
2. latency: events are produced at ``--rate`` (default 5,000/s) for ``latency_seconds``
   (option, default 10) with event time = send time; latency = alert ``detected_at`` -
   event time of the event that completed the match.

The alerts of both phases are compared with a fold of the sent events through the pure
matchers (``alerts_match_fold``). Options: ``workers=N`` (default 1; throughput is then
summed over the workers' own clocks from the first to the last batch of any of them),
``live_linger_ms`` (the live producer's linger, default 0, as
``bench.events.produce_events`` explains).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.events import make_payloads, produce_events
from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker, create_topics, kafka_options

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


async def read_alerts(bootstrap: str, topic: str) -> list[dict]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kafka_options(),
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


async def engine_stats(workers: list[Worker]) -> list[dict]:
    out = []
    for w in workers:
        status, body = await asyncio.to_thread(w.get, "/api/v1/patterns")
        out.append(body.get("engine", {}) if status == 200 and isinstance(body, dict) else {})
    return out


async def wait_processed(workers: list[Worker], n: int, timeout: float = 900) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await engine_stats(workers)
        if sum(s.get("records", 0) for s in stats) >= n:
            return stats
        await asyncio.sleep(0.3)
    raise TimeoutError(f"{n} records not processed in {timeout}s")


async def commit_metrics(workers: list[Worker]) -> dict:
    """Per worker, from ``GET /metrics``: the commits (count, mean ms) and how long they
    held batches back (``streametl_commit_hold_seconds``; absent before issue 22's
    snapshot commit, when the whole commit held them: ``commit``)."""
    out: dict = {}
    for i, w in enumerate(workers):
        status, body = await asyncio.to_thread(w.http, "GET", "/metrics")
        if status != 200:
            continue
        text = body if isinstance(body, str) else body.decode() if isinstance(body, bytes) else str(body)
        found: dict[str, float] = {}
        for line in text.splitlines():
            for name in ("streametl_commit_seconds", "streametl_commit_hold_seconds"):
                for part in ("_sum", "_count"):
                    if line.startswith(name + part + " "):
                        found[name + part] = float(line.split()[-1])
        for name, label in (("streametl_commit_seconds", "commit"), ("streametl_commit_hold_seconds", "hold")):
            n = found.get(name + "_count")
            if n:
                out[f"w{i}_{label}"] = {"count": int(n), "mean_ms": round(found[name + "_sum"] / n * 1000, 2)}
    return out


async def run(ctx: Context) -> Result:
    opts = ctx.args.options
    workers_n = int(opts.get("workers", 1))
    event_rate = float(opts.get("event_rate", 20000))
    latency_seconds = float(opts.get("latency_seconds", 10))
    rate = ctx.args.rate or 5000.0
    config = Path(tempfile.mkdtemp(prefix="bench-patterns-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump({"patterns": {
        "sources": ["events"], "source_key": "user_id", "definitions": PATTERNS}}))
    env = {"STREAMETL_PIPELINES_FILE": str(config)}
    env.update({k.upper(): v for k, v in opts.items() if k.upper().startswith("STREAMETL_")})
    prefix = f"{ctx.namespace}."
    workers = [Worker(app_id=ctx.namespace, topic_prefix=prefix, env=env) for _ in range(workers_n)]
    events_topic = prefix + "events"
    alerts_topic = prefix + "alerts"
    await create_topics([events_topic], partitions=4)

    backlog = make_payloads(ctx.events, ctx.keys)
    base = time.time() - ctx.events / event_rate - 60
    for i, e in enumerate(backlog):
        e["ts"] = e["sent_at"] = base + i / event_rate
    await produce_events(ctx.bootstrap, events_topic, backlog)

    for w in workers:
        await asyncio.to_thread(w.start, True, 180)
    try:
        pids = [w.proc.pid for w in workers if w.proc is not None]
        cpu0 = sum(process_cpu_seconds(p) for p in pids)
        done = await wait_processed(workers, ctx.events)
        cpu = sum(process_cpu_seconds(p) for p in pids) - cpu0
        seconds = max(s["last_batch_at"] for s in done if s.get("last_batch_at")) - \
            min(s["first_batch_at"] for s in done if s.get("first_batch_at"))

        live_n = int(rate * latency_seconds)
        live = make_payloads(live_n, ctx.keys, seed=8)
        for i, e in enumerate(live):
            e["event_id"] = f"l-{i:012d}"
        live_start = time.time()
        # Paced in steps of 50 so the producer is not a timer loop.
        await produce_events(ctx.bootstrap, events_topic, live, rate=rate, pace_every=50,
                             linger_ms=int(opts.get("live_linger_ms", 0)))
        await wait_processed(workers, ctx.events + live_n)
        alerts = await read_alerts(ctx.bootstrap, alerts_topic)
        commits = await commit_metrics(workers)
    finally:
        for w in workers:
            w.stop()
    completed = [(a["detected_at"], max(e["ts"] for e in a["evidence"])) for a in alerts
                 if a["kind"] != "absence" and a["evidence"]]
    completed = [(detected, ts) for detected, ts in completed if ts >= live_start]
    latencies = [(detected - ts) * 1000 for detected, ts in completed]
    by_pattern: dict[str, int] = {}
    for a in alerts:
        by_pattern[a["pattern"]] = by_pattern.get(a["pattern"], 0) + 1
    expected = expected_alerts(backlog + live)
    return Result(
        NAME, ctx.events, seconds, latencies, cpu,
        settings={"workers": workers_n, "patterns": len(PATTERNS), "keys": ctx.keys,
                  "event_rate": event_rate, "live_rate": rate, "latency_seconds": latency_seconds,
                  "source_key": "user_id (no repartition)"},
        notes=[
            "events/s: source records the engine handled / its first-to-last batch time (backlog produced before start)",
            "latency: alert detected_at minus event time (= send time) of the completing event, live phase at --rate",
            "CPU: worker process(es) while draining the backlog (includes idle polling); the producer runs in the bench process",
        ],
        extra={"alerts_by_pattern": by_pattern, "alerts_expected_by_fold": expected,
               "alerts_match_fold": by_pattern == {k: v for k, v in expected.items() if v},
               "engine": done, "commits": commits},
        compare_with="raw-aiokafka",
        sent_at=[ts for _, ts in completed],
    )
