"""The processor test harness (app/harness.py): a window rule tested in a few lines,
without a broker or patched private attributes, over the in-memory store and emitter;
and the same rule under exactly_once writes its state with every batch."""

from __future__ import annotations

import orjson

from app.harness import Record, run_batches, window_processor

RULE = {"name": "clicks", "source": "clicks", "key_by": "user", "time_field": "ts",
        "window": {"type": "tumbling", "size": 10}, "emit": "final",
        "aggregations": [{"name": "n", "type": "count"}], "repartition": False}


def click(offset: int, user: str, ts: float) -> Record:
    return Record(0, offset, orjson.dumps({"user": user, "ts": ts}))


def test_a_tumbling_window_counts_and_closes_and_its_state_is_stored():
    runner = window_processor(RULE)
    outputs, state = run_batches(runner, [
        [click(0, "a", 1), click(1, "a", 2), click(2, "b", 3)],
        [click(3, "a", 25)],  # stream time past the first window's end: it closes
    ])
    results = [(topic, orjson.loads(value)) for topic, _key, value, _headers, _p in outputs]
    assert [(t, r["key"], r["start"], r["count"]) for t, r in results] == [
        ("clicks.aggregates", "a", 0, 2), ("clicks.aggregates", "b", 0, 1)]
    assert all(p == 0 for *_, p in outputs)  # each result comes from the input of partition 0
    assert state[0][b"\x00meta:0"]["st"] == 25_000  # the partition's stream time, stored
    assert [w["s"] for w in state[0][b"a"]["w"]] == [20_000]  # a's open window


def test_under_exactly_once_the_state_is_written_with_every_batch():
    runner = window_processor(RULE, exactly_once=True)
    run_batches(runner, [[click(0, "a", 1)], [click(1, "a", 2)]], commit_every=10)
    assert runner.store.flushes == 2
