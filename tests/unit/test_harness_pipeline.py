"""The processor harness for pipelines (app/harness.py ``pipeline_processor``): a
pipeline's own batch handler (agents/pipeline.py ``pipeline_handler``) over the
in-memory store and emitter, tested in a few lines without a broker or patched
privates: dedupe within a batch, across batches (the previous batch's entries read
from the write-back cache or the store), per partition, across a restart (a new
processor over the same store), and expiry by position."""

from __future__ import annotations

import orjson

from app.harness import Record, pipeline_processor, run_batches

PIPELINE = {"name": "p", "source": "in", "sink": "out",
            "steps": [{"op": "deduplicate", "horizon_count": 3}, "normalize"]}


def ev(partition: int, offset: int, event_id: str) -> Record:
    return Record(partition, offset, orjson.dumps({"event_id": event_id, "user_id": "u"}))


def ids(outputs) -> list[tuple[int, str]]:
    return [(source, orjson.loads(value)["event_id"]) for _, _, value, _, source in outputs]


def test_duplicates_are_dropped_within_and_across_batches_per_partition():
    dedupe = pipeline_processor({**PIPELINE, "steps": [{"op": "deduplicate", "horizon_seconds": 3600}]})
    outputs, state = run_batches(dedupe, [
        [ev(0, 0, "a"), ev(0, 1, "a"), ev(1, 0, "a")],  # partition 1 has its own memory
        [ev(0, 2, "a"), ev(0, 3, "b"), Record(0, 4, b"not json")],
    ])
    assert ids(outputs) == [(0, "a"), (1, "a"), (0, "b")]
    assert sorted(state[0]) == [b"0|id:a", b"0|id:b"] and list(state[1]) == [b"0|id:a"]
    assert dedupe.counters.dropped == {"duplicate": 2} and dedupe.counters.dead_lettered == 1
    assert [why["reason"] for _, _, why in dedupe.commit.emitter.dead] == ["invalid_json"]
    assert dedupe.ctx.storing == []  # every batch's writes are stored once its outputs are out


def test_the_horizon_holds_across_a_restart():
    """Ids stored before a restart expire once past the horizon; recent ones are still
    refused (the expiry queue is rebuilt from the store)."""
    first = pipeline_processor(PIPELINE)
    run_batches(first, [[ev(0, o, f"id{o}") for o in range(3)]])
    restarted = pipeline_processor(PIPELINE, store=first.store)
    outputs, state = run_batches(restarted, [[ev(0, 4, "id2"), ev(0, 5, "id5")]])
    assert ids(outputs) == [(0, "id5")]  # id2 is within 3 records of offset 4
    assert sorted(state[0]) == [b"0|id:id2", b"0|id:id5"]  # id0, id1: more than 3 behind 5
    outputs, _ = run_batches(restarted, [[ev(0, 6, "id5"), ev(0, 7, "id0")]])
    assert ids(outputs) == [(0, "id5"), (0, "id0")]  # every output of the processor so far


def test_exactly_once_stores_each_batch_too():
    dedupe = pipeline_processor(PIPELINE, exactly_once=True)
    outputs, state = run_batches(dedupe, [[ev(0, 0, "a")], [ev(0, 1, "a"), ev(0, 2, "b")]], commit_every=10)
    assert ids(outputs) == [(0, "a"), (0, "b")] and sorted(state[0]) == [b"0|id:a", b"0|id:b"]


def test_a_batch_that_fails_half_way_leaves_no_dedupe_entry_for_a_commit_to_write():
    """A pipeline batch that raises after admitting ids (here: the dead-letter topic is
    unreachable) crashes the worker; the ids it admitted were never sent, so neither a
    commit nor the revoke on the way out may store them, or the replay after the
    restart would drop those records as duplicates (lost). Its dedupe entries live in
    a ``DedupeCache`` registered with the commit protocol; the failed batch marks it
    failed (its entries dropped, every later flush refused), as windows and patterns do
    with their caches."""
    import asyncio

    import pytest

    dedupe = pipeline_processor(PIPELINE)
    emitter = dedupe.commit.emitter

    async def unreachable(*args, **kwargs):
        raise RuntimeError("dead-letter topic unreachable")

    emitter.dead_letter = unreachable
    with pytest.raises(RuntimeError, match="unreachable"):
        asyncio.run(dedupe.process([(0, [ev(0, 0, "a"), Record(0, 1, b"not json")])]))
    with pytest.raises(RuntimeError, match="not writing"):
        asyncio.run(dedupe.commit.before_commit())
    asyncio.run(dedupe.commit.partitions_moved())
    assert dedupe.store.data.get(0, {}) == {}
