"""Database sink under failure (issue 21): kill -9 the worker several times while
100,000 changes over 10,000 keys replicate into PostgreSQL, under both processing
guarantees; and PostgreSQL itself stopped for 10 s mid-stream. The table ends equal to
the fold of the changes, and the sink's audit shows every partition's batches back to
back: no gap (nothing skipped) and no overlap (nothing applied twice)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from operators.cdc import fold, parse_change
from tests.support import (
    BOOTSTRAP,
    REPO,
    Worker,
    create_topics,
    kafka_options,
    run,
    unique,
    write_config,
)
from tests.support_db import assert_no_gap_no_overlap, sink_audit

CHANGES = 100_000
KEYS = 10_000
PG_SH = str(REPO / "deploy" / "postgres" / "postgres.sh")


def change_stream(seed: int) -> list[tuple[bytes, bytes | None]]:
    rng = random.Random(seed)
    out = []
    for i in range(CHANGES):
        k = rng.randrange(KEYS)
        key = json.dumps({"id": k}).encode()
        roll = rng.random()
        if roll < 0.08:
            out.append((key, json.dumps({"op": "d", "before": {"id": k}, "source": {"ts_ms": i}}).encode()))
            if roll < 0.04:
                out.append((key, None))
        else:
            after = {"id": k, "seq": i, "v": rng.randrange(1000)}
            out.append((key, json.dumps({"op": "u" if roll < 0.6 else "c", "after": after,
                                         "source": {"ts_ms": i}}).encode()))
    return out


async def produce(topic: str, records) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5, **kafka_options())
    await producer.start()
    try:
        sent = [await producer.send(topic, v, key=k) for k, v in records]
        for fut in sent:
            await fut
    finally:
        await producer.stop()


async def table_rows(dsn: str, table: str) -> dict[int, dict]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["id"]: dict(r) for r in await conn.fetch(f'SELECT id, seq, v FROM "{table}"')}
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()


def applied(dsn, sink, topic) -> int:
    return sum(run(sink_audit(dsn, sink, topic))[0].values())


def setup(namespace, postgres_dsn, guarantee):
    app_id, prefix = namespace
    table = f"chaos_{unique('t')}"
    config = write_config({"sinks": [{
        "name": "replica", "source": "changes", "type": "postgres", "dsn": postgres_dsn, "table": table,
        "key": ["id"], "format": "debezium", "columns": {"id": "BIGINT", "seq": "BIGINT", "v": "BIGINT"}}]})
    topic = f"{prefix}changes"
    run(create_topics([topic]))
    records = change_stream(seed=len(table))
    run(produce(topic, records))
    want = {k[0]: {"id": row["id"], "seq": row["seq"], "v": row["v"]}
            for k, row in fold([parse_change(k, v, ["id"]) for k, v in records]).items()}
    env = {"STREAMETL_PIPELINES_FILE": config, "STREAMETL_PROCESSING_GUARANTEE": guarantee}
    worker = Worker(app_id=app_id, topic_prefix=prefix, env=env)
    return worker, table, topic, want


def topic_ends(topic: str) -> dict[int, int]:
    from tests.integration.test_delivery_semantics import end_offsets

    return run(end_offsets(topic))


def wait_for_progress(check, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("no progress")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_kill_9_three_times_while_replicating(namespace, postgres_dsn, guarantee):
    worker, table, topic, want = setup(namespace, postgres_dsn, guarantee)
    ends = topic_ends(topic)
    total = sum(ends.values())
    try:
        worker.start(timeout=150)
        at_kill = []
        for kill in range(1, 4):
            wait_for_progress(lambda k=kill: applied(postgres_dsn, "replica", topic) >= total * k // 5)
            worker.kill()
            at_kill.append(applied(postgres_dsn, "replica", topic))
            worker.start(timeout=150)
        assert all(n < total for n in at_kill), f"killed too late to test anything: {at_kill} of {total}"
        wait_for_progress(lambda: applied(postgres_dsn, "replica", topic) >= total)
    finally:
        worker.kill()
    assert_no_gap_no_overlap(*run(sink_audit(postgres_dsn, "replica", topic)), ends)
    assert run(table_rows(postgres_dsn, table)) == want


def test_postgres_stopped_for_10s_mid_stream_loses_nothing(namespace, postgres_dsn):
    worker, table, topic, want = setup(namespace, postgres_dsn, "at_least_once")
    ends = topic_ends(topic)
    total = sum(ends.values())
    pg_env = {**os.environ, "PG_PORT": str(urlsplit(postgres_dsn).port)}
    try:
        worker.start(timeout=150)
        wait_for_progress(lambda: applied(postgres_dsn, "replica", topic) >= total // 4)
        subprocess.run([PG_SH, "stop"], env=pg_env, check=True, timeout=60, capture_output=True)
        time.sleep(10)
        status, health = worker.get("/health")
        assert status == 200 and health["sinks"]["replica"]["state"] == "retrying", health
        subprocess.run([PG_SH, "start"], env=pg_env, check=True, timeout=120, capture_output=True)
        wait_for_progress(lambda: applied(postgres_dsn, "replica", topic) >= total)
    finally:
        worker.kill()
        subprocess.run([PG_SH, "start"], env=pg_env, timeout=120, capture_output=True)
    assert_no_gap_no_overlap(*run(sink_audit(postgres_dsn, "replica", topic)), ends)
    assert run(table_rows(postgres_dsn, table)) == want
