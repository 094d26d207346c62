"""A Debezium change stream replicated into PostgreSQL and SQLite (issue 21), against
the real broker and the real database: snapshot reads, inserts, updates, deletes with
tombstones, two updates of one key back to back, a truncate, an added column and a
malformed envelope. Each table ends equal to the fold of the changes, the offsets the
sink stored match the topic's end, and its batches follow each other with no gap and no
overlap."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from operators.cdc import ChangeError, fold, parse_change
from tests.integration.test_delivery_semantics import end_offsets
from tests.support import (
    BOOTSTRAP,
    Worker,
    create_topics,
    kafka_options,
    read_topic,
    run,
    unique,
    write_config,
)
from tests.support_db import (
    assert_every_record_applied_once,
    assert_no_gap_no_overlap,
    count_rows,
    sink_audit,
)


def envelope(op, before=None, after=None, wrapped=False):
    payload = {"op": op, "before": before, "after": after,
               "source": {"ts_ms": int(time.time() * 1000), "lsn": 0}}
    return json.dumps({"schema": {}, "payload": payload} if wrapped else payload).encode()


def key(i):
    return json.dumps({"id": i}).encode()


def first_part():
    out = [(key(i), envelope("r", after={"id": i, "name": f"n{i}", "score": i * 1.5})) for i in range(1, 41)]
    out += [(key(i), envelope("c", after={"id": i, "name": f"new{i}", "score": 0.0}, wrapped=True)) for i in range(41, 61)]
    for i in range(1, 21):
        out.append((key(i), envelope("u", before={"id": i}, after={"id": i, "name": f"u{i}", "score": 1.0})))
    # Two updates of one key back to back (one batch): the last one wins.
    out += [(key(7), envelope("u", after={"id": 7, "name": "first", "score": 2.0})),
            (key(7), envelope("u", after={"id": 7, "name": "second", "score": 3.0}))]
    for i in range(50, 56):  # deletes, each followed by its tombstone
        out += [(key(i), envelope("d", before={"id": i, "name": "x"})), (key(i), None)]
    out.append((key(99), b"{not an envelope"))
    return out


def second_part():
    out = [(key(i), envelope("c", after={"id": i, "name": f"again{i}", "score": 5.0})) for i in range(100, 130)]
    # A column the table does not have yet (evolve: true adds it).
    out += [(key(i), envelope("u", after={"id": i, "name": f"mail{i}", "score": 6.0, "email": f"{i}@x"}))
            for i in range(100, 110)]
    out += [(key(i), envelope("d", before={"id": i})) for i in range(120, 125)]
    return out


async def produce(topic, records):
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **kafka_options())
    await producer.start()
    try:
        for k, v in records:
            await producer.send_and_wait(topic, v, key=k)
    finally:
        await producer.stop()


def expected(records):
    changes = []
    for k, v in records:
        try:
            changes.append(parse_change(k, v, ["id"]))
        except ChangeError:
            pass
    return {k[0]: row for k, row in fold(changes).items()}


def normalized(rows):
    return {r["id"]: {c: v for c, v in r.items() if v is not None} for r in rows}


async def pg_rows(dsn, table):
    conn = await asyncpg.connect(dsn)
    try:
        try:
            return normalized([dict(r) for r in await conn.fetch(f'SELECT * FROM "{table}"')])
        except asyncpg.UndefinedTableError:
            return {}
    finally:
        await conn.close()


def sqlite_rows(path, table):
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return normalized([dict(r) for r in db.execute(f'SELECT * FROM "{table}"')])
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def wait_until(check, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout}s: {last}")


def test_a_debezium_stream_replicates_into_postgres_and_sqlite_exactly(postgres_dsn, namespace):
    app_id, prefix = namespace
    table = f"customers_{unique('c')}"
    sqlite_path = str(Path(tempfile.mkdtemp(prefix="streametl-sqlite-")) / "replica.db")
    common = {"source": "customers", "format": "debezium", "table": table, "key": ["id"], "mode": "upsert",
              "evolve": True}
    config = write_config({"sinks": [
        {"name": "pg", "type": "postgres", "dsn": postgres_dsn, **common},
        {"name": "lite", "type": "sqlite", "path": sqlite_path, **common},
    ]})
    run(create_topics([f"{prefix}customers"]))
    worker = Worker(app_id=app_id, topic_prefix=prefix, env={"STREAMETL_PIPELINES_FILE": config})
    try:
        worker.start(timeout=150)
        first = first_part()
        run(produce(f"{prefix}customers", first))
        want = expected(first)

        def replicated(want):
            def check():
                got = run(pg_rows(postgres_dsn, table)), sqlite_rows(sqlite_path, table)
                return got[0] == want and got[1] == want, {"pg": len(got[0]), "sqlite": len(got[1]), "want": len(want)}
            return check

        wait_until(replicated(want), what="the first part replicated")
        # A truncate, once everything before it is applied (it orders only its partition).
        run(produce(f"{prefix}customers", [(None, envelope("t"))]))
        wait_until(replicated({}), what="the truncate applied")
        second = second_part()
        run(produce(f"{prefix}customers", second))
        wait_until(replicated(expected(second)), what="the second part replicated")

        # The malformed envelope, dead-lettered once by each sink.
        dead = run(read_topic(f"{prefix}dlq", expect=2, timeout=30))
        assert sorted((dict(d.headers)["dlq.pipeline"], dict(d.headers)["dlq.reason"]) for d in dead) == [
            (b"sink:lite", b"invalid_json"), (b"sink:pg", b"invalid_json")]
        status, sinks = worker.get("/api/v1/sinks")
        assert status == 200 and {s["state"] for s in sinks["sinks"]} == {"running"}, sinks
        assert worker.get("/health")[1]["sinks"] == {"pg": {"state": "running", "error": None},
                                                     "lite": {"state": "running", "error": None}}
    finally:
        worker.kill()

    offsets, batches = run(sink_audit(postgres_dsn, "pg", f"{prefix}customers"))
    assert_no_gap_no_overlap(offsets, batches, run(end_offsets(f"{prefix}customers")))


@pytest.mark.parametrize("bad", [{"type": "postgres"}, {"mode": "merge"}])
def test_a_bad_sink_declaration_stops_the_worker(namespace, bad):
    app_id, prefix = namespace
    sink = {"name": "s", "source": "customers", "type": "sqlite", "path": "x.db", "table": "t", "key": ["id"], **bad}
    config = write_config({"sinks": [sink]})
    worker = Worker(app_id=app_id, topic_prefix=prefix, env={"STREAMETL_PIPELINES_FILE": config})
    worker.start(wait=False)
    try:
        assert worker.proc.wait(60) != 0
    finally:
        worker.kill()
    assert "SinkConfigError" in worker.log_path.read_text()




def test_a_pipeline_writes_its_results_into_tables(postgres_dsn, namespace):
    """A pipeline's `sink:` may be a table: upsert into SQLite by key, append into
    PostgreSQL (every record)."""
    from tests.support import produce_json

    app_id, prefix = namespace
    table = f"events_{unique('p')}"
    sqlite_path = str(Path(tempfile.mkdtemp(prefix="streametl-sqlite-")) / "latest.db")
    steps = [{"op": "filter", "where": "value > 0"}]
    config = write_config({"pipelines": [
        {"name": "latest", "source": "events", "steps": steps,
         "sink": {"type": "sqlite", "path": sqlite_path, "table": "latest", "key": ["user_id"], "mode": "upsert"}},
        {"name": "history", "source": "events", "steps": steps,
         "sink": {"type": "postgres", "dsn": postgres_dsn, "table": table, "mode": "append"}},
    ]})
    events = [{"user_id": f"u{i % 10}", "value": i % 7, "seq": i} for i in range(200)]
    worker = Worker(app_id=app_id, topic_prefix=prefix, env={"STREAMETL_PIPELINES_FILE": config})
    try:
        worker.start(timeout=150)
        run(produce_json(f"{prefix}events", events, key="user_id"))
        kept = [e for e in events if e["value"] > 0]
        latest = {}
        for e in kept:
            latest[e["user_id"]] = e

        def done():
            lite = sqlite_rows_by(sqlite_path, "latest", "user_id")
            history = run(count_rows(postgres_dsn, table))
            return lite == latest and history == len(kept), {"sqlite": len(lite), "pg": history}

        wait_until(done, what="both tables written")
    finally:
        worker.kill()


def test_records_the_database_refuses_are_dead_lettered_and_the_rest_written(postgres_dsn, namespace):
    """A value the database refuses (a missing NOT NULL column; text for a BIGINT in
    PostgreSQL) goes to the dead-letter topic, and the records around it are written:
    the sink does not retry the batch forever. All in one partition, one batch."""
    from tests.support import produce_json

    app_id, prefix = namespace
    table = f"amounts_{unique('r')}"
    sqlite_path = str(Path(tempfile.mkdtemp(prefix="streametl-sqlite-")) / "amounts.db")
    common = {"source": "amounts", "format": "json", "table": table, "key": ["id"], "mode": "upsert",
              "columns": {"id": "BIGINT", "amount": "BIGINT NOT NULL"}}
    config = write_config({"sinks": [
        {"name": "pg", "type": "postgres", "dsn": postgres_dsn, **common},
        {"name": "lite", "type": "sqlite", "path": sqlite_path, **common},
    ]})
    run(create_topics([f"{prefix}amounts"]))
    records = [{"id": 1, "amount": 5}, {"id": 2, "amount": "lots"}, {"id": 3}, {"id": 4, "amount": 7},
               *({"id": i, "amount": i} for i in range(5, 40))]
    run(produce_json(f"{prefix}amounts", records, partition=0))
    worker = Worker(app_id=app_id, topic_prefix=prefix, env={"STREAMETL_PIPELINES_FILE": config})
    try:
        worker.start(timeout=150)
        good = {r["id"]: r for r in records if "amount" in r and r["id"] != 2}
        # SQLite keeps the text in an INTEGER column (type affinity): only the missing
        # value is refused there.
        lite_good = {**good, 2: records[1]}

        def written():
            pg, lite = run(pg_rows(postgres_dsn, table)), sqlite_rows(sqlite_path, table)
            return pg == good and lite == lite_good, {"pg": sorted(pg), "sqlite": sorted(lite)}

        wait_until(written, what="the accepted records written")
        dead = run(read_topic(f"{prefix}dlq", expect=3, timeout=30))
        got = sorted((dict(d.headers)["dlq.pipeline"], json.loads(d.value)["id"], dict(d.headers)["dlq.reason"])
                     for d in dead)
        assert got == [(b"sink:lite", 3, b"refused_by_database"), (b"sink:pg", 2, b"refused_by_database"),
                       (b"sink:pg", 3, b"refused_by_database")], got
        status, sinks = worker.get("/api/v1/sinks")
        assert {s["name"]: (s["state"], s["partitions"].get("0")) for s in sinks["sinks"]} == {
            "pg": ("running", len(records)), "lite": ("running", len(records))}, sinks
    finally:
        worker.kill()
    offsets, batches = run(sink_audit(postgres_dsn, "pg", f"{prefix}amounts"))
    assert_no_gap_no_overlap(offsets, batches, run(end_offsets(f"{prefix}amounts")))


def sqlite_rows_by(path, table, key):
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return {r[key]: dict(r) for r in db.execute(f'SELECT * FROM "{table}"')}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def test_a_materialized_table_is_read_from_any_worker(namespace):
    """`type: table`: every worker keeps the whole table; a row by key and a prefix scan
    answer the same on both, deletes and tombstones included, and after a restart."""
    app_id, prefix = namespace
    config = write_config({"sinks": [{"name": "customers", "source": "customers", "format": "debezium",
                                      "type": "table", "key": ["id"]}]})
    run(create_topics([f"{prefix}customers"]))
    records = first_part()
    run(produce(f"{prefix}customers", records))
    want = expected(records)
    workers = [Worker(app_id=app_id, topic_prefix=prefix, env={"STREAMETL_PIPELINES_FILE": config}) for _ in range(2)]
    try:
        for w in workers:
            w.start(timeout=150)

        def served(w):
            def check():
                status, body = w.get("/api/v1/tables/customers?limit=1000")
                got = {r["id"]: {k: v for k, v in r.items() if v is not None} for r in body.get("rows", [])}
                return status == 200 and got == want, {"status": status, "rows": len(got), "want": len(want)}
            return check

        for w in workers:
            wait_until(served(w), what=f"the table on :{w.web_port}")
        status, body = workers[1].get("/api/v1/tables/customers/7")
        assert status == 200 and body["row"]["name"] == "second", body
        assert workers[0].get("/api/v1/tables/customers/50")[0] == 404  # deleted
        status, body = workers[0].get("/api/v1/tables/customers?prefix=1&limit=5")
        assert [r["id"] for r in body["rows"]] == sorted(k for k in want if str(k).startswith("1"))[:5]
        assert workers[0].get("/api/v1/tables/nope/1")[0] == 404
        assert workers[0].get("/api/v1/tables/customers/x")[0] == 422
        # A restart reads on from its stored offsets (the file survives), nothing twice.
        workers[0].kill()
        run(produce(f"{prefix}customers", [(key(7), envelope("d", before={"id": 7}))]))
        want.pop(7)
        workers[0].start(timeout=150)
        for w in workers:
            wait_until(served(w), what=f"the table on :{w.web_port} after the restart")
    finally:
        for w in workers:
            w.kill()


def cdc_stream():
    """Snapshot reads, inserts, updates into and out of the filter, two updates of one
    key back to back, deletes each followed by its tombstone, a re-insert after a
    delete, and one malformed envelope."""
    out = [(key(i), envelope("r", after={"id": i, "name": f"n{i}", "score": i % 4, "secret": "s"})) for i in range(1, 41)]
    out += [(key(i), envelope("c", after={"id": i, "name": f"c{i}", "score": 2, "secret": "s"}, wrapped=True))
            for i in range(41, 51)]
    out += [(key(i), envelope("u", before={"id": i}, after={"id": i, "name": f"u{i}", "score": (i + 1) % 4}))
            for i in range(1, 21)]
    out += [(key(7), envelope("u", after={"id": 7, "name": "first", "score": 0})),
            (key(7), envelope("u", after={"id": 7, "name": "second", "score": 9}))]
    for i in (3, 11, 30, 45):
        out += [(key(i), envelope("d", before={"id": i, "name": "x"})), (key(i), None)]
    out += [(key(30), envelope("c", after={"id": 30, "name": "back", "score": 1}))]
    out.append((key(99), b"{not an envelope"))
    return out


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_cdc_pipeline_filters_and_maps_a_change_stream_into_postgres_a_topic_and_a_table(postgres_dsn, namespace,
                                                                                            guarantee):
    """Issue 21 item 1: a Debezium stream through pipelines whose first step is `cdc`,
    then a filter and a map. The PostgreSQL table (a pipeline's database sink), and a
    materialized table replicating another pipeline's Kafka topic, and a third
    pipeline's materialized table (`sink: {type: table}`), all equal
    {id: map(row)} over the rows of the input's fold that pass the filter: tombstones
    and deletes delete, an update out of the filter deletes. The malformed envelope is
    dead-lettered by each pipeline with its reason, naming the cdc step. Under both
    processing guarantees."""
    app_id, prefix = namespace
    table = f"active_{unique('c')}"
    steps = [{"op": "cdc", "key": ["id"]}, {"op": "filter", "where": "score > 0"},
             {"op": "map", "set": {"doubled": "score * 2"}, "drop": ["secret"]}]
    config = write_config({
        "pipelines": [
            {"name": "to_pg", "source": "customers", "steps": steps,
             "sink": {"type": "postgres", "dsn": postgres_dsn, "table": table, "key": ["id"], "mode": "upsert"}},
            {"name": "to_topic", "source": "customers", "steps": steps, "sink": "customers.active"},
            {"name": "to_table", "source": "customers", "steps": steps,
             "sink": {"type": "table", "table": "direct", "key": ["id"]}},
        ],
        "sinks": [{"name": "active", "source": "customers.active", "format": "debezium", "type": "table",
                   "key": ["id"]}],
    })
    run(create_topics([f"{prefix}customers", f"{prefix}customers.active"]))
    stream = cdc_stream()
    source = fold([parse_change(k, v, ["id"]) for k, v in stream if not (v or b"").startswith(b"{not")])
    want = {i: {"id": i, "name": row["name"], "score": row["score"], "doubled": row["score"] * 2}
            for (i,), row in source.items() if row["score"] > 0}
    assert 7 in want and 30 in want and 3 not in want and len(want) > 20
    worker = Worker(app_id=app_id, topic_prefix=prefix,
                    env={"STREAMETL_PIPELINES_FILE": config, "STREAMETL_PROCESSING_GUARANTEE": guarantee})
    try:
        worker.start(timeout=150)
        run(produce(f"{prefix}customers", stream))

        def replicated():
            pg = run(pg_rows(postgres_dsn, table))
            served = {}
            for name in ("active", "direct"):
                status, body = worker.get(f"/api/v1/tables/{name}?limit=1000")
                served[name] = normalized(body.get("rows", [])) if status == 200 else {}
            return (pg == want and served["active"] == want and served["direct"] == want,
                    {"pg": len(pg), **{k: len(v) for k, v in served.items()}, "want": len(want)})

        wait_until(replicated, what="the filtered, mapped fold in PostgreSQL and the materialized table")
        dead = run(read_topic(f"{prefix}dlq", expect=3, timeout=30))
        assert sorted((dict(d.headers)["dlq.pipeline"], dict(d.headers)["dlq.reason"], dict(d.headers)["dlq.step"])
                      for d in dead) == [(name, b"invalid_json", b"0:cdc") for name in (b"to_pg", b"to_table", b"to_topic")]
        status, pipelines = worker.get("/api/v1/pipelines")
        counters = {p["name"]: p for p in pipelines["pipelines"]}["to_pg"]
        assert status == 200 and counters["counters"]["dead_lettered"] == 1, counters
    finally:
        worker.kill()

    # The pipeline writes its topic in transactions under exactly_once: check the audit
    # against the records (commit markers take offsets too).
    sink_topic = f"{prefix}pipeline.to_pg.to-postgres"
    offsets, batches = run(sink_audit(postgres_dsn, "pipeline.to_pg", sink_topic))
    records: dict[int, list[int]] = {}
    for r in run(read_topic(sink_topic, isolation_level="read_committed", idle=1.0)):
        records.setdefault(r.partition, []).append(r.offset)
    assert sum(map(len, records.values())) == len(stream) - 1  # one output per event but the malformed one
    assert_every_record_applied_once(offsets, batches, records)
