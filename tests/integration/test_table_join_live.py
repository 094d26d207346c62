"""The live stream-table join (agents/table_join.py) against the real broker: a table
topic of Debezium change events (inserts, updates, deletes with tombstones; several
versions of a key) and a stream topic, joined by three pipelines (``as_of:
event_time`` left, ``as_of: latest`` inner, and ``as_of: event_time`` against a
materialized table named in ``with_table``). What each writes to its sink equals a
fold of the inputs computed from the definition; a stream record between two updates
of its key joins the earlier version. The worker is restarted with its local state
wiped in the middle (the versions come back from the changelog and later stream
records still join them), and killed with -9 while it applies table records.

The inputs come in phases, each produced only once the worker has committed the
previous one, so the fold knows which table records were applied before each stream
record (within a phase the two topics are not read in step)."""

from __future__ import annotations

import random
import time
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support import (
    BOOTSTRAP,
    Worker,
    committed_to_end,
    create_topics,
    kafka_options,
    read_topic,
    run,
    unique,
    wait_for,
    write_config,
)

PARTITIONS = 4
HISTORY = 3600.0
PIPELINES = {"tv": ("event_time", "left"), "tl": ("latest", "inner"), "tm": ("event_time", "left")}
EXACTLY_ONCE = {"STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}


def config() -> dict:
    step = {"op": "join", "on": "customer_id", "time_field": "ts"}
    return {
        "sinks": [{"name": "crm", "type": "table", "source": "customers", "key": ["id"], "format": "debezium"}],
        "pipelines": [
            {"name": "tv", "source": "orders", "sink": "out.tv",
             "steps": [{**step, "with_table": "customers", "table_key": "id", "format": "debezium",
                        "as_of": "event_time", "history": "1h", "type": "left"}]},
            {"name": "tl", "source": "orders", "sink": "out.tl",
             "steps": [{**step, "with_table": "customers", "table_key": "id", "format": "debezium",
                        "as_of": "latest", "type": "inner"}]},
            # The materialized table's name: its topic, format and key come from the sink.
            {"name": "tm", "source": "orders", "sink": "out.tm",
             "steps": [{**step, "with_table": "crm", "as_of": "event_time", "history": "1h", "type": "left"}]},
        ]}


def make_phases(seed: int) -> list[tuple[str, list[tuple[int, dict | None, float]]]]:
    """(topic, [(key, value or None, time)]) phases: table, stream, (restart), stream,
    table, stream. Times are recent (the outputs carry them as record timestamps)."""
    rng = random.Random(seed)
    base = int(time.time()) - 1500
    phases = []
    serial = 0

    def table(lo: float, hi: float) -> list:
        records = []
        for k in range(20):
            for _ in range(rng.randint(1, 3)):
                serial_t = round(rng.uniform(lo, hi), 3)
                if rng.random() < 0.15:
                    records.append((k, {"op": "d", "before": {"id": k}, "after": None}, serial_t))
                    records.append((k, None, serial_t))  # the tombstone after a delete
                else:
                    records.append((k, {"op": "u", "after": {"id": k, "name": f"n{k}-{serial_t}"}}, serial_t))
        rng.shuffle(records)  # out of order in time: versions are placed by time
        return records

    def stream(lo: float, hi: float, n: int) -> list:
        nonlocal serial
        records = []
        for _ in range(n):
            serial += 1
            k = rng.randrange(24)  # 20-23: never in the table
            records.append((k, {"customer_id": k, "ts": round(rng.uniform(lo, hi), 3), "oid": serial}, 0.0))
        return records

    phases.append(("customers", table(base, base + 600)))
    phases.append(("orders", stream(base - 100, base + 700, 150)))
    phases.append(("restart", []))
    phases.append(("orders", stream(base - 100, base + 700, 100)))
    # kill -9 while this table phase is being applied: replayed (at_least_once, the
    # applied offsets skip what was flushed) or its transaction aborted (exactly_once).
    phases.append(("customers-kill", table(base + 600, base + 900)))
    phases.append(("orders", stream(base + 500, base + 1000, 150)))
    return phases


def fold(phases, as_of: str, join_type: str) -> Counter:
    """Each stream record with its key's row: the version valid at its time (the latest
    table record with a time <= it; the last produced on a tie), or the last record
    produced (latest). All times lie within the history."""
    versions: dict[int, list[tuple[float, int, dict | None]]] = {}
    serial = 0
    out = []
    for topic, records in phases:
        if topic.startswith("customers"):
            for k, value, t in records:
                serial += 1
                row = value["after"] if value is not None and value["op"] != "d" else None
                versions.setdefault(k, []).append((t, serial, row))
        elif topic == "orders":
            for k, value, _ in records:
                kept = versions.get(k, [])
                if as_of == "latest":
                    found = max(kept, key=lambda v: v[1]) if kept else None
                else:
                    older = [v for v in kept if v[0] <= value["ts"]]
                    found = max(older) if older else None
                row = found[2] if found else None
                if row is not None or join_type == "left":
                    out.append({"left": value, "right": row, "ts": value["ts"]})
    return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in out)


async def produce(prefix: str, topic: str, records, transactional: bool = False) -> None:
    """Keyed by the key, in partition ``key % PARTITIONS`` on both topics (co-partitioned);
    a table record's Kafka timestamp is its version's time, a stream record's its ts.
    ``transactional``: in one transaction (each partition then ends with its marker)."""
    txn = {"transactional_id": unique("tjoin-txn")} if transactional else {}
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **txn, **kafka_options())
    await producer.start()
    if transactional:
        await producer.begin_transaction()
    try:
        futures = []
        for k, value, t in records:
            ts = value["ts"] if topic == "orders" else t
            key = orjson.dumps({"id": k}) if topic == "customers" else str(k).encode()
            futures.append(await producer.send(f"{prefix}{topic}", None if value is None else orjson.dumps(value),
                                               key=key, partition=k % PARTITIONS, timestamp_ms=round(ts * 1000)))
        for f in futures:
            await f
        if transactional:
            await producer.commit_transaction()
    finally:
        await producer.stop()


def wait_committed(w: Worker) -> None:
    topics = [f"{w.topic_prefix}{t}" for t in ("orders", "customers")]
    run(wait_for(lambda: committed_to_end(w.app_id, topics, PARTITIONS), timeout=180, interval=1,
                 what="the worker to commit every input record"))


def assert_sinks_equal_the_fold(prefix: str, phases, isolation: str, timeout: float) -> dict[str, list]:
    """Each pipeline's sink, read until it holds as many records as the fold says,
    holds exactly the fold's records; returns each sink's records."""
    sinks = {}
    for pipeline, (as_of, join_type) in PIPELINES.items():
        want = fold(phases, as_of, join_type)

        async def complete(pipeline=pipeline, want=want):
            got = await read_topic(f"{prefix}out.{pipeline}", timeout=30, idle=3, isolation_level=isolation)
            return got if len(got) >= sum(want.values()) else None

        got = run(wait_for(complete, timeout=timeout, interval=2, what=f"{pipeline} outputs"))
        outputs = Counter(orjson.dumps(r.json(), option=orjson.OPT_SORT_KEYS) for r in got)
        missing, extra = want - outputs, outputs - want
        assert not missing and not extra, (
            f"{pipeline}: {sum(missing.values())} missing, {sum(extra.values())} extra "
            f"(of {sum(want.values())}): {[m[:120] for m in list(missing)[:3]]} "
            f"{[m[:120] for m in list(extra)[:3]]}")
        sinks[pipeline] = got
    return sinks


@pytest.mark.timeout(900)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_stream_table_joins_equal_the_fold_across_a_restart_with_wiped_state(kafka, guarantee):
    name = unique("tjoin")
    phases = make_phases(seed=17)
    run(create_topics([f"{name}.orders"], partitions=PARTITIONS))
    run(create_topics([f"{name}.customers"], partitions=PARTITIONS, compacted=True))
    env = EXACTLY_ONCE if guarantee == "exactly_once" else {}
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={**env, "STREAMETL_PIPELINES_FILE": write_config(config())})
    w.start(timeout=150)
    try:
        for topic, records in phases:
            if topic == "restart":
                w.stop()
                w.wipe_state()  # the versions must come back from the changelog
                w.start(timeout=150)
                continue
            if topic == "customers-kill":
                half = len(records) // 2
                run(produce(w.topic_prefix, "customers", records[:half]))
                w.kill()
                w.start(timeout=150)
                topic, records = "customers", records[half:]
            run(produce(w.topic_prefix, topic, records))
            wait_committed(w)
        for got in assert_sinks_equal_the_fold(w.topic_prefix, phases, isolation, timeout=120).values():
            for r in got:  # keyed and timed as the stream record
                joined = r.json()
                assert r.key == str(joined["left"]["customer_id"]).encode()
                assert r.timestamp == round(joined["ts"] * 1000)
        # Versions between updates were used: some stream record joined a non-latest one.
        assert fold(phases, "event_time", "left") != fold(phases, "latest", "left")
        status, body = w.get("/api/v1/pipelines")
        counters = {p["name"]: p["counters"]["join"] for p in body["pipelines"]}
        assert counters["tm"]["table_topic"] == f"{w.topic_prefix}customers"
        assert counters["tv"]["table"] > 0
    finally:
        w.kill()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_stream_backlog_meets_the_table_written_before_the_worker_started(kafka, guarantee):
    """Both topics hold a backlog when the worker starts (the stream's written first,
    the table in a transaction: each of its partitions ends with a commit marker, past
    the last record): each stream partition is held until its table partition is read
    to the end it had, so every stream record meets the table records written before
    the start, as the fold says, whichever topic the first fetches returned."""
    name = unique("tjoinb")
    rng = random.Random(5)
    base = int(time.time()) - 1500
    # Enough table versions for several fetches per partition: read in step with the
    # stream, early stream records would meet early versions.
    pad = "x" * 400  # ~5 MB a partition: 1 MB a fetch
    table = [(k, {"op": "u", "after": {"id": k, "name": f"n{k}-{v}", "pad": pad}}, base + v)
             for v in range(200) for k in range(200)]
    stream = [(k, {"customer_id": k, "ts": base + 300 + rng.random(), "oid": i}, 0.0)
              for i, k in enumerate(rng.randrange(210) for _ in range(4000))]
    phases = [("customers", table), ("orders", stream)]
    run(create_topics([f"{name}.orders"], partitions=PARTITIONS))
    run(create_topics([f"{name}.customers"], partitions=PARTITIONS, compacted=True))
    prefix = f"{name}."
    run(produce(prefix, "orders", stream))
    run(produce(prefix, "customers", table, transactional=True))
    env = EXACTLY_ONCE if guarantee == "exactly_once" else {}
    w = Worker(app_id=name, topic_prefix=prefix, env={**env, "STREAMETL_PIPELINES_FILE": write_config(config())})
    w.start(timeout=150)
    try:
        # (Not ``wait_committed``: the consumer commits one past the last record, and
        # the table's partitions end with a marker.)
        assert_sinks_equal_the_fold(prefix, phases, "read_committed", timeout=180)
        status, body = w.get("/api/v1/pipelines")
        assert all(p["counters"]["join"]["held_partitions"] == [] for p in body["pipelines"])
        assert "pipeline tv: stream partition 0 released" in w.log_path.read_text(errors="replace")
    finally:
        w.kill()
