"""A pipeline deduplicates across kill -9 and restart: the dedupe table comes back
from its changelog (even with the local RocksDB folder deleted), so duplicates sent
before and after the restart are both dropped."""

from __future__ import annotations

import time

from tests.integration.test_pipelines import write_config
from tests.support import Worker, produce_json, read_topic, run, unique

CONFIG = {"pipelines": [{
    "name": "dedupe", "source": "events", "sink": "events.clean",
    "steps": [{"op": "deduplicate", "horizon_seconds": 3600}, "normalize"],
}]}


def event(i: int) -> dict:
    return {"event_id": f"e{i}", "user_id": f"u{i % 7}", "value": i}


def test_duplicates_before_and_after_a_crash_are_dropped(kafka):
    name = unique("dchaos")
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(CONFIG)})
    sink = w.topic_prefix + "events.clean"
    try:
        w.start(timeout=120)
        originals = [event(i) for i in range(100)]
        # Duplicates are keyed alike (here by event_id), so they meet in one partition.
        run(produce_json(w.topic_prefix + "events", originals, key="event_id"))
        run(produce_json(w.topic_prefix + "events", originals[:40], key="event_id"))  # before the crash
        assert len(run(read_topic(sink, expect=100))) >= 100
        time.sleep(2.5)  # past the commit interval: the dedupe changelog is written
        w.kill()
        w.wipe_state()  # the state must come back from the changelog, not from local disk
        run(produce_json(w.topic_prefix + "events", originals[40:], key="event_id"))  # while down
        w.start(timeout=120)
        newer = [event(i) for i in range(100, 120)]
        run(produce_json(w.topic_prefix + "events", originals[:30] + newer, key="event_id"))  # after
        out = run(read_topic(sink, expect=120, timeout=60, idle=3))
        ids = [r.json()["event_id"] for r in out]
        assert sorted(set(ids)) == sorted(f"e{i}" for i in range(120))
        assert len(ids) == len(set(ids)), f"duplicates emitted: {len(ids) - len(set(ids))}"
    finally:
        w.kill()


HORIZON = 6.0
HORIZON_CONFIG = {"pipelines": [{
    "name": "dedupe", "source": "events", "sink": "events.clean",
    "steps": [{"op": "deduplicate", "horizon_seconds": HORIZON}],
}]}


def ids_in_every_partition(prefix: str, per_partition: int) -> list[dict]:
    """Events with ids ``<prefix><i>``, ``per_partition`` of them in each of the 4
    partitions when keyed by id, so that each partition gets records (expiry runs as a
    partition's records flow)."""
    from app.kafka_io import partition_for

    out, covered = [], {}
    for i in range(10_000):
        p = partition_for(f"{prefix}{i}".encode(), 4, 0)
        if covered.get(p, 0) < per_partition:
            covered[p] = covered.get(p, 0) + 1
            out.append({"event_id": f"{prefix}{i}", "value": i})
        if len(out) == 4 * per_partition:
            return out
    raise AssertionError("keys do not cover every partition")


def test_the_dedupe_horizon_holds_across_a_restart(kafka):
    """Issue 18: expiry lives in the store, so it survives a restart. Ids admitted
    before the worker restarted are deleted (tombstoned in the dedupe changelog) once
    older than the horizon, while ids admitted after it, within the horizon, are still
    refused as duplicates. Before, the expiry queue lived only in the worker's memory:
    keys admitted before a restart were never deleted, and the state grew without bound.
    """
    name = unique("dhorizon")
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(HORIZON_CONFIG)})
    source, sink = w.topic_prefix + "events", w.topic_prefix + "events.clean"
    changelog = f"{name}-pipeline-dedupe-dedupe-changelog"
    old = [{"event_id": f"old{i}", "value": i} for i in range(12)]
    # Recent ids in every partition, so that each partition holding an old id gets records.
    recent = ids_in_every_partition("new", 3)
    try:
        w.start(timeout=120)
        run(produce_json(source, old, key="event_id"))
        assert len(run(read_topic(sink, expect=len(old)))) == len(old)
        admitted_at = time.time()
        time.sleep(2.5)  # past the commit interval: the dedupe entries are stored
        w.stop()
        w.start(timeout=120)
        time.sleep(max(0.0, admitted_at + HORIZON + 1.0 - time.time()))
        run(produce_json(source, recent, key="event_id"))
        assert len(run(read_topic(sink, expect=len(old) + len(recent)))) == len(old) + len(recent)
        # Duplicates of the recent ids, within the horizon: refused.
        run(produce_json(source, recent, key="event_id"))

        async def old_ids_deleted() -> bool:
            records = await read_topic(changelog, timeout=5, idle=1.0)
            gone = {r.key for r in records if r.value is None}
            return all(f"0|id:{e['event_id']}".encode() in gone for e in old)

        from tests.support import wait_for

        run(wait_for(old_ids_deleted, timeout=60, interval=1.0, what="the old ids expired"))
        # The clean stop closed each partition's expiry index to be kept, and nothing
        # wrote the table while the worker was down: reopened, not built again.
        status, reply = w.get("/api/v1/pipelines")
        expiry = reply["pipelines"][0]["counters"]["expiry"]
        assert status == 200 and expiry["indexes_reopened"] >= 1 and expiry["indexes_built"] == 0, expiry
        out = run(read_topic(sink, timeout=20, idle=3))
        ids = [r.json()["event_id"] for r in out]
        assert sorted(ids) == sorted(e["event_id"] for e in old + recent), "a recent duplicate was admitted"

        # Ids admitted since the restart expire too: their entries were added to the
        # partition's expiry index on disk as they were stored, not rebuilt from the store.
        assert list(w.data_dir.rglob("expiry")), "no expiry index on disk"
        time.sleep(HORIZON + 1.0)
        later = [{"event_id": f"later{i}", "value": i} for i in range(400)]
        run(produce_json(source, later, key="event_id"))  # records in every partition

        async def recent_ids_deleted() -> bool:
            records = await read_topic(changelog, timeout=5, idle=1.0)
            gone = {r.key for r in records if r.value is None}
            return all(f"0|id:{e['event_id']}".encode() in gone for e in recent)

        run(wait_for(recent_ids_deleted, timeout=60, interval=1.0, what="the ids admitted after the restart expired"))
    finally:
        w.kill()


def test_ids_another_worker_admitted_while_this_one_was_down_expire_here(kafka):
    """A worker's expiry index is kept across a clean stop, but only while nothing else
    writes its table partitions. Here worker B admits ids while A is down; when A comes
    back, Faust's recovery writes B's entries into A's tables, so A's kept indexes do
    not cover them: they are built again from the table, and B's ids expire at A. A kept
    index trusted regardless would never expire them (the table grows without bound)."""
    from tests.support import wait_for

    name = unique("dhandover")
    env = {"STREAMETL_PIPELINES_FILE": write_config(HORIZON_CONFIG)}
    a = Worker(app_id=name, topic_prefix=f"{name}.", env=env)
    b = Worker(app_id=name, topic_prefix=f"{name}.", env=env)
    source, sink = a.topic_prefix + "events", a.topic_prefix + "events.clean"
    changelog = f"{name}-pipeline-dedupe-dedupe-changelog"

    first, by_b = ids_in_every_partition("a", 2), ids_in_every_partition("b", 2)
    try:
        a.start(timeout=120)
        run(produce_json(source, first, key="event_id"))
        assert len(run(read_topic(sink, expect=len(first)))) == len(first)
        time.sleep(2.5)  # stored, and indexed at A
        a.stop()
        b.start(timeout=120)
        run(produce_json(source, by_b, key="event_id"))
        assert len(run(read_topic(sink, expect=len(first) + len(by_b)))) == len(first) + len(by_b)
        admitted_at = time.time()
        time.sleep(2.5)
        b.stop()
        a.start(timeout=120)
        time.sleep(max(0.0, admitted_at + HORIZON + 1.0 - time.time()))
        run(produce_json(source, ids_in_every_partition("later", 3), key="event_id"))  # runs expiry everywhere

        async def b_ids_deleted() -> bool:
            records = await read_topic(changelog, timeout=5, idle=1.0)
            gone = {r.key for r in records if r.value is None}
            return all(f"0|id:{e['event_id']}".encode() in gone for e in first + by_b)

        run(wait_for(b_ids_deleted, timeout=60, interval=1.0, what="the ids B admitted expired at A"))
        status, reply = a.get("/api/v1/pipelines")
        expiry = reply["pipelines"][0]["counters"]["expiry"]
        assert status == 200 and expiry["indexes_built"] >= 1, expiry
    finally:
        a.kill()
        b.kill()
