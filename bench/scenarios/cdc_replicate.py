"""Debezium changes replicated into PostgreSQL by a database sink on one worker.

Throughput: a backlog of changes over `--keys` keys (updates, some deletes) is
replicated; changes/s from the first applied batch to the last, and the worker's CPU.
Latency: then changes to new keys at `--rate` (default 5,000/s) for `--option seconds=10`;
each carries its send time, and the table stamps each row with the database clock when
it is written (a column default), so the lag is event time -> row written.

PostgreSQL: `--option dsn=...`, else STREAMETL_TEST_POSTGRES_DSN, else the local
`deploy/postgres` server on 5433 (`make postgres-start`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import asyncpg
import yaml
from aiokafka import AIOKafkaProducer

from bench.harness import Context, Result, process_cpu_seconds
from tests.support import Worker, create_topics, kafka_options

NAME = "cdc-replicate"
DESCRIPTION = "Debezium changes into PostgreSQL through a database sink (exactly-once effect)"


def changes(n: int, keys: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(keys)
        if rng.random() < 0.05:
            value = {"op": "d", "before": {"id": k}, "source": {"ts_ms": i}}
        else:
            value = {"op": "u", "after": {"id": k, "seq": i, "name": f"user-{k}", "score": rng.random()},
                     "source": {"ts_ms": i}}
        out.append((json.dumps({"id": k}).encode(), json.dumps(value).encode()))
    return out


async def produce(bootstrap: str, topic: str, records, rate: float = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kafka_options())
    await producer.start()
    try:
        started, pending = time.perf_counter(), []
        for i, (key, value) in enumerate(records):
            if rate and i % 50 == 0:
                ahead = i / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if callable(value):
                value = value()
            pending.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def applied(conn, topic: str) -> int:
    return int(await conn.fetchval("SELECT coalesce(sum(next_offset), 0) FROM streametl_sink_offsets "
                                   "WHERE sink = 'bench' AND topic = $1", topic))


async def run(ctx: Context) -> list[Result]:
    dsn = ctx.args.options.get("dsn") or os.environ.get(
        "STREAMETL_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5433/streametl")
    rate = ctx.args.rate or 5000.0
    seconds = float(ctx.args.options.get("seconds", 10))
    table = f"bench_{ctx.namespace}".replace(".", "_").replace("-", "_")[:60]
    topic = ctx.topic("changes")
    await create_topics([topic], partitions=4)
    config = Path(tempfile.mkdtemp(prefix="streametl-bench-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump({"sinks": [{
        "name": "bench", "source": "changes", "format": "debezium", "type": "postgres", "dsn": dsn,
        "table": table, "key": ["id"], "mode": "upsert",
        "columns": {"id": "BIGINT", "seq": "BIGINT", "name": "TEXT", "score": "DOUBLE PRECISION",
                    "sent_at": "DOUBLE PRECISION",
                    "written_at": "DOUBLE PRECISION DEFAULT extract(epoch from clock_timestamp())"}}]}))
    backlog = changes(ctx.events, ctx.keys)
    await produce(ctx.bootstrap, topic, backlog)
    worker = Worker(app_id=ctx.namespace, topic_prefix=f"{ctx.namespace}.",
                    env={"STREAMETL_PIPELINES_FILE": str(config)})
    conn = await asyncpg.connect(dsn)
    try:
        worker.start(timeout=180)
        assert worker.proc is not None
        while await applied(conn, topic) == 0:
            await asyncio.sleep(0.05)
        cpu0, t0 = process_cpu_seconds(worker.proc.pid), time.perf_counter()
        while await applied(conn, topic) < len(backlog):
            await asyncio.sleep(0.05)
        took = time.perf_counter() - t0
        cpu = process_cpu_seconds(worker.proc.pid) - cpu0

        n_live = int(rate * seconds)
        base = ctx.keys + 1

        def live(i):
            def value():
                after = {"id": base + i, "seq": i, "name": "live", "score": 0.0, "sent_at": time.time()}
                return json.dumps({"op": "c", "after": after, "source": {"ts_ms": int(time.time() * 1000)}}).encode()
            return json.dumps({"id": base + i}).encode(), value

        await produce(ctx.bootstrap, topic, [live(i) for i in range(n_live)], rate=rate)
        while await applied(conn, topic) < len(backlog) + n_live:
            await asyncio.sleep(0.05)
        lags = [float(r["lag"]) * 1000 for r in await conn.fetch(
            f'SELECT written_at - sent_at AS lag FROM "{table}" WHERE id >= $1', base)]
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.close()
        worker.stop()
    return [
        Result(NAME, len(backlog), took, [], cpu,
               settings={"keys": ctx.keys, "mode": "upsert", "deletes": "5 %"},
               notes=["backlog replicated: changes/s from the first to the last applied batch",
                      "CPU is the worker process only (PostgreSQL's own CPU not counted)"]),
        Result(f"{NAME}-latency", n_live, seconds, lags, None,
               settings={"rate": rate, "seconds": seconds},
               notes=["latency = row written in PostgreSQL (its clock) - change sent (same host clock)"]),
    ]
