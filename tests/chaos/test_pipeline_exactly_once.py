"""A deduplicating pipeline under exactly_once survives kill -9 (and the loss of its
local state): a ``read_committed`` reader of the sink sees every distinct event exactly
once, though each event is sent twice and the worker dies mid-stream.

Why this matters beyond the passthrough test (tests/integration/test_exactly_once.py):
here the transaction must hold three things together — the sink outputs, the dedupe
table's changelog records and the input offsets. A dedupe write outside the transaction
would survive an aborted batch and drop its re-delivered records as duplicates (loss);
an output outside it would repeat after the restart.
"""

from __future__ import annotations

from collections import Counter

from tests.integration.test_pipelines import write_config
from tests.support import Worker, create_topics, produce_json, read_topic, run, unique, wait_for

PARTITIONS = 4
CONFIG = {"pipelines": [{
    "name": "eos", "source": "events", "sink": "events.clean",
    "steps": [{"op": "deduplicate", "horizon_seconds": 3600}, "normalize"],
}]}


def kill9_mid_stream(config: dict, pipeline: str, users: int) -> list:
    """Run ``config``'s pipeline under exactly_once over 8,000 distinct events, each sent
    twice (the copy 1,000 events later: duplicates keyed alike, by event_id, meet in one
    partition, often in another batch, and some across the kill); kill -9 the worker
    mid-stream, wipe its local state (the dedupe memory must come back from the committed
    changelog) and restart it. Asserts every distinct event is in the ``read_committed``
    sink exactly once; returns what the sink holds."""
    name = unique("peos")
    prefix = f"{name}."
    env = {"STREAMETL_PIPELINES_FILE": write_config(config), "STREAMETL_PROCESSING_GUARANTEE": "exactly_once",
           "STREAMETL_COMMIT_INTERVAL": "0.2"}
    source, sink = prefix + "events", prefix + "events.clean"
    run(create_topics([source, sink], partitions=PARTITIONS))
    distinct = [{"event_id": f"e{i}", "user_id": f"u{i % users}", "value": i} for i in range(8000)]
    sent = []
    for i in range(0, len(distinct), 1000):
        sent += distinct[i:i + 1000] + distinct[max(0, i - 1000):i]
    sent += distinct[-1000:]
    run(produce_json(source, sent, key="event_id"))

    first = Worker(app_id=name, topic_prefix=prefix, env=env)
    second = Worker(app_id=name, topic_prefix=prefix, env=env)
    try:
        first.start(timeout=120)

        def handled() -> int:
            status, body = first.get("/api/v1/pipelines", timeout=5)
            if status != 200:
                return 0
            return next(p["counters"]["in"] for p in body["pipelines"] if p["name"] == pipeline)

        run(wait_for(lambda: handled() >= 4000, timeout=120, interval=0.05, what="part of the input handled"))
        first.kill()
        first.wipe_state()
        before = run(read_topic(sink, isolation_level="read_committed", idle=1.0))
        assert len(before) < len(distinct), "killed too late to test anything"
        assert all(n == 1 for n in Counter(r.json()["event_id"] for r in before).values())

        second.start(timeout=120)
        out = run(read_topic(sink, expect=len(distinct), timeout=180, idle=3.0, isolation_level="read_committed"))
        ids = Counter(r.json()["event_id"] for r in out)
        want = Counter(e["event_id"] for e in distinct)
        assert ids == want, (f"missing {len(set(want) - set(ids))}, "
                             f"repeated {sum(n - 1 for n in ids.values() if n > 1)}")
        return out
    finally:
        first.kill()
        second.kill()


def test_kill9_mid_stream_every_distinct_event_exactly_once(kafka):
    kill9_mid_stream(CONFIG, "eos", users=50)


KEYED_CONFIG = {"pipelines": [{
    "name": "eoskeyed", "source": "events", "sink": "events.clean", "key_by": "user_id",
    "steps": [{"op": "deduplicate", "horizon_seconds": 3600}, "normalize"],
}]}


def test_outputs_keyed_to_other_partitions_join_their_inputs_transactions_across_kill9(kafka):
    """Inputs keyed by event_id, outputs keyed by user_id: most outputs go to another
    partition than their input's. Each must join the transaction of the input partition
    it came from (the one committing that input's offset): then a kill -9 mid-stream
    aborts the outputs of every uncommitted input with it, and nothing repeats after the
    restart. Before, exactly_once kept each output in its input's partition number
    (Faust finds a transaction by the output partition), so ``key_by`` did not place
    outputs at all; and an output sent to a partition whose transaction this worker
    does not hold (another worker owns it) went out outside any transaction."""
    from app.kafka_io import partition_for

    out = kill9_mid_stream(KEYED_CONFIG, "eoskeyed", users=97)
    misplaced = [r for r in out if r.partition != partition_for(r.key, PARTITIONS, 0)]
    assert not misplaced, f"{len(misplaced)} outputs not in their key's partition, e.g. {misplaced[:3]}"
    assert all(r.key == r.json()["user_id"].encode() for r in out)
