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
