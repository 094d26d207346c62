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

import pytest

from tests.integration.test_pipelines import write_config
from tests.support import (
    LiveStream,
    Worker,
    assert_each_once,
    create_topics,
    read_topic,
    run,
    unique,
    wait_for,
)

PARTITIONS = 4
CONFIG = {"pipelines": [{
    "name": "eos", "source": "events", "sink": "events.clean",
    "steps": [{"op": "deduplicate", "horizon_seconds": 3600}, "normalize"],
}]}


def kill9_mid_stream(config: dict, users: int, wipe: bool = True, others: int = 0) -> list:
    """Run ``config``'s pipeline under exactly_once over 8,000 distinct events, each sent
    twice (the copy 1,000 events later: duplicates keyed alike, by event_id, meet in one
    partition, often in another batch, and some across the kill), produced as a live
    stream. Kill -9 the worker once some of its outputs are committed, wipe its local
    state if ``wipe`` (the dedupe memory must come back from the committed changelog),
    and restart it on the same data directory. Kept, its RocksDB also holds the dedupe
    writes of the transaction the kill aborted: they must not count, or the replayed
    records are dropped as duplicates of themselves. ``others`` more workers of the same
    app run throughout (they hold the other partitions, and take the killed worker's
    over until it is back). Asserts every distinct event is in the ``read_committed``
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

    first = Worker(app_id=name, topic_prefix=prefix, env=env)
    rest = [Worker(app_id=name, topic_prefix=prefix, env=env) for _ in range(others)]
    try:
        for worker in [first, *rest]:
            worker.start(timeout=120)
        # 1,250 records/s (16,000 in ~13 s): at 5,000/s a worker that started late took
        # the whole stream as a backlog in a batch or two, so its first commit already
        # covered every event and there was no "mid-stream" left to kill in.
        feeder = LiveStream(source, sent, key="event_id", per_chunk=250, pause=0.2)

        async def some_committed() -> bool:
            got = await read_topic(sink, timeout=2, idle=0.2, isolation_level="read_committed")
            return len(got) >= 500

        # Before, the kill came once the worker had *read* 4,000 records: on a fast
        # machine that was inside its first batch, before any commit, so the restart
        # only ever started from nothing.
        run(wait_for(some_committed, timeout=120, interval=0.05, what="some outputs committed"))
        first.kill()
        if wipe:
            first.wipe_state()
        before = run(read_topic(sink, isolation_level="read_committed", idle=1.0))
        assert 0 < len(before) < len(distinct), f"{len(before)} committed at the kill: not mid-stream"
        assert all(n == 1 for n in Counter(r.json()["event_id"] for r in before).values())

        first.start(timeout=120)
        feeder.wait()
        out = run(read_topic(sink, expect=len(distinct), timeout=180, idle=3.0, isolation_level="read_committed"))
        assert_each_once((r.json()["event_id"] for r in out), distinct)
        return out
    finally:
        for worker in [first, *rest]:
            worker.kill()


@pytest.mark.parametrize("wipe", [False, True], ids=["rocksdb-kept", "rocksdb-wiped"])
def test_kill9_mid_stream_every_distinct_event_exactly_once(kafka, wipe):
    kill9_mid_stream(CONFIG, users=50, wipe=wipe)


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

    out = kill9_mid_stream(KEYED_CONFIG, users=97)
    misplaced = [r for r in out if r.partition != partition_for(r.key, PARTITIONS, 0)]
    assert not misplaced, f"{len(misplaced)} outputs not in their key's partition, e.g. {misplaced[:3]}"
    assert all(r.key == r.json()["user_id"].encode() for r in out)


def test_two_workers_one_killed_and_restarted_every_distinct_event_exactly_once(kafka):
    """The other worker keeps its partitions (and takes the killed one's until the
    group drops it); the killed one comes back on its own data directory. Before every
    table's local state was restored under exactly_once, a worker started like this
    crashed in Faust's recovery (ConsistencyError: a persisted changelog offset above
    the highwater it read). With only that fixed, it read highwater -1 (Faust's
    never-fetched LSO), restored nothing and let 889 duplicates through
    (``FastConsumerThread._highwaters``)."""
    kill9_mid_stream(CONFIG, users=50, wipe=False, others=1)


@pytest.mark.parametrize("leaves", ["first", "second"])
def test_graceful_leave_hands_the_dedupe_memory_over(kafka, leaves):
    """Issue 23, finding 2 (and the mechanism of finding 1, Run A): B joins mid-stream,
    then one worker leaves gracefully, and the other takes its partitions over. It must
    restore the leaver's committed dedupe entries before it processes them: copies of
    events the leaver admitted arrive after the leave. Before the fix, the fetch loop
    of the worker that stayed had a fetch pending from the generation before the
    rebalance; Recovery resumed flow to restore the partitions, that fetch returned the
    first changelog records and was dropped as overtaken, and only the source
    partitions were sought back (changelogs have no committed offsets). Recovery never
    got those records (under exactly_once it stopped waiting for them, "Aborted tx
    until highwater") and the copies were admitted (A leaving: 16 repeated;
    docs/delivery.md, I).

    B leaving hands B's partitions back to A, which had them before: A's transactional
    producers of those partitions had been fenced by B's, and A crashed at its first
    send (4,517 events missing; docs/delivery.md, M)."""
    name = unique("peosl")
    prefix = f"{name}."
    env = {"STREAMETL_PIPELINES_FILE": write_config(CONFIG), "STREAMETL_PROCESSING_GUARANTEE": "exactly_once",
           "STREAMETL_COMMIT_INTERVAL": "0.2"}
    source, sink = prefix + "events", prefix + "events.clean"
    run(create_topics([source, sink], partitions=PARTITIONS))
    distinct = [{"event_id": f"e{i}", "user_id": f"u{i % 50}", "value": i} for i in range(16000)]
    sent = []
    for i in range(0, len(distinct), 1000):
        sent += distinct[i:i + 1000] + distinct[max(0, i - 1000):i]
    sent += distinct[-1000:]
    a = Worker(app_id=name, topic_prefix=prefix, env=env)
    b = Worker(app_id=name, topic_prefix=prefix, env=env)
    try:
        a.start(timeout=120)
        feeder = LiveStream(source, sent, key="event_id", per_chunk=50)  # ~1,000/s for 30 s

        async def committed_at_least(n: int):
            got = await read_topic(sink, timeout=2, idle=0.2, isolation_level="read_committed")
            return len(got) >= n and len(got)

        run(wait_for(lambda: committed_at_least(1000), timeout=120, interval=0.1, what="A's outputs committed"))
        b.start(timeout=120)  # joins mid-stream: B takes partitions, its fetch loop runs
        before = run(committed_at_least(1))
        run(wait_for(lambda: committed_at_least(before + 1500), timeout=120, interval=0.1,
                     what="more outputs committed with both in the group"))
        (a if leaves == "first" else b).stop()  # SIGTERM: commits and leaves; the other takes over
        assert len(feeder.sent) < len(sent) - 2000, "the stream ended before the leave: not mid-stream"
        feeder.wait(timeout=180)
        out = run(read_topic(sink, expect=len(distinct), timeout=180, idle=5.0, isolation_level="read_committed"))
        assert_each_once((r.json()["event_id"] for r in out), distinct)
    finally:
        a.kill()
        b.kill()
