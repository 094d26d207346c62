"""The dedupe step's expiry against the real broker and RocksDB: an id that expires in
one partition is deleted there only.

Dedupe is per partition: an id is refused as a duplicate by the partition that admitted
it (duplicates are keyed alike, so they meet in one partition). A keyless topic, or a
retry under another key, can carry the same id into two partitions; each then admits
it once and keeps its own entry, under the same table key."""

from __future__ import annotations

import time

import pytest

from tests.integration.test_pipelines import write_config
from tests.support import Worker, produce_json, read_topic, run, unique, wait_for

HORIZON = 8.0


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_an_id_expiring_in_one_partition_stays_a_duplicate_in_another(kafka, guarantee):
    """Faust's delete (``del table[key]``) removed a key from every partition's RocksDB
    when its key index did not know the key (entries written as record batches never
    enter it), or from the partition that index last saw it in. So the expiry of id
    ``x`` in partition 0 also deleted partition 1's younger entry of ``x``, locally and
    without a tombstone in partition 1's changelog, and partition 1 admitted ``x`` again
    within its horizon: a duplicate emitted."""
    name = unique("dexpiry")
    config = {"pipelines": [{
        "name": "dedupe", "source": "events", "sink": "events.clean",
        "steps": [{"op": "deduplicate", "horizon_seconds": HORIZON}],
    }]}
    w = Worker(app_id=name, topic_prefix=f"{name}.",
               env={"STREAMETL_PIPELINES_FILE": write_config(config), "STREAMETL_PROCESSING_GUARANTEE": guarantee})
    source, sink = w.topic_prefix + "events", w.topic_prefix + "events.clean"
    changelog = f"{name}-pipeline-dedupe-dedupe-changelog"
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"

    async def emitted() -> list[str]:
        return [r.json()["event_id"] for r in await read_topic(sink, timeout=10, idle=1.0, isolation_level=isolation)]

    def emitted_now(ids: list[str]):
        async def check() -> bool:
            return sorted(await emitted()) == sorted(ids)
        return check

    try:
        w.start(timeout=120)
        run(produce_json(source, [{"event_id": "x", "n": 1}], partition=0))
        run(wait_for(emitted_now(["x"]), timeout=30, what="x admitted in partition 0"))
        first_at = time.time()
        time.sleep(HORIZON / 2)
        run(produce_json(source, [{"event_id": "x", "n": 2}], partition=1))  # partition 1 has no x yet
        run(wait_for(emitted_now(["x", "x"]), timeout=30, what="x admitted in partition 1"))
        second_at = time.time()

        # Partition 0's x is past the horizon: a record there runs its expiry.
        time.sleep(max(0.0, first_at + HORIZON + 0.5 - time.time()))
        run(produce_json(source, [{"event_id": "y", "n": 3}], partition=0))

        async def expired_in_partition_0() -> bool:
            records = await read_topic(changelog, timeout=5, idle=1.0, isolation_level=isolation)
            return any(r.key == b"0|id:x" and r.value is None and r.partition == 0 for r in records)

        run(wait_for(expired_in_partition_0, timeout=30, interval=0.5, what="x expired in partition 0"))
        assert time.time() < second_at + HORIZON - 1.0, "too slow: partition 1's x would have expired too"
        # Partition 1's x is within its horizon: a duplicate there.
        run(produce_json(source, [{"event_id": "x", "n": 4}], partition=1))
        run(produce_json(source, [{"event_id": "z", "n": 5}], partition=1))  # behind it: x was handled

        async def z_admitted() -> bool:
            return "z" in await emitted()

        run(wait_for(z_admitted, timeout=30, what="z admitted in partition 1"))
        assert sorted(run(emitted())) == ["x", "x", "y", "z"], "partition 1 admitted x again within its horizon"
    finally:
        w.kill()


def test_each_dedupe_step_keeps_its_entries_for_its_own_horizon(kafka):
    """Two dedupe steps, by id for 2 s and by order for 10 minutes: once the first
    step's entry of an id expired (its tombstone in the changelog), the second step
    still refuses the same order under a new id. When every entry expired by the first
    step's horizon, the order's entry went with it and the repeat was admitted."""
    name = unique("dlanes")
    config = {"pipelines": [{
        "name": "dedupe", "source": "events", "sink": "events.clean",
        "steps": [{"op": "deduplicate", "horizon_seconds": 2},
                  {"op": "deduplicate", "fields": ["order"], "horizon_seconds": 600}],
    }]}
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(config)})
    source, sink = w.topic_prefix + "events", w.topic_prefix + "events.clean"
    changelog = f"{name}-pipeline-dedupe-dedupe-changelog"

    async def emitted() -> list[str]:
        return [r.json()["event_id"] for r in await read_topic(sink, timeout=10, idle=1.0)]

    def admitted(event_id: str):
        async def check() -> bool:
            return event_id in await emitted()
        return check

    try:
        w.start(timeout=120)
        run(produce_json(source, [{"event_id": "a", "order": "o1"}], partition=0))
        run(wait_for(admitted("a"), timeout=30, what="a admitted"))
        time.sleep(2.5)
        run(produce_json(source, [{"event_id": "t", "order": "o0"}], partition=0))  # runs the expiry

        async def a_expired() -> bool:
            records = await read_topic(changelog, timeout=5, idle=1.0)
            return any(r.key == b"0|id:a" and r.value is None for r in records)

        run(wait_for(a_expired, timeout=30, interval=0.5, what="the first step's entry of a expired"))
        run(produce_json(source, [{"event_id": "b", "order": "o1"}, {"event_id": "c", "order": "o2"}], partition=0))
        run(wait_for(admitted("c"), timeout=30, what="c admitted"))
        assert sorted(run(emitted())) == ["a", "c", "t"], "the second step admitted order o1 again within its horizon"
        records = run(read_topic(changelog, timeout=5, idle=1.0))
        assert not any(r.key == b'1|f:["o1"]' and r.value is None for r in records)
    finally:
        w.kill()
