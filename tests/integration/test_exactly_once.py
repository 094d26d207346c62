"""exactly_once through the fast consume path: transactions are committed, and a
kill -9 mid-transaction neither exposes uncommitted output nor loses or repeats any.

The passthrough agent (forward mode) copies each event to ``passthrough.out`` on the
same partition number, so each output record belongs to the transaction of its input
partition. A ``read_committed`` reader must see every input event exactly once (the
fold of the input: the set of event ids, each with count 1).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.integration.test_delivery_semantics import (
    FORWARD,
    PARTITIONS,
    _reached,
    committed_offsets,
    end_offsets,
    make_events,
    produce,
    read_output,
    wait_all_processed,
)
from tests.support import LiveStream, assert_each_once, create_topics, run, wait_for

EXACTLY_ONCE = {**FORWARD, "STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}


def exactly_each_once(output, events) -> None:
    assert_each_once((eid for eid, _, _ in output), events)


def test_transactions_commit_output_and_offsets(workers, namespace):
    app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    run(create_topics([topic], partitions=PARTITIONS))
    workers(**EXACTLY_ONCE).start()
    events = make_events(3000)
    run(produce(prefix, events))
    # Only committed transactions are visible to read_committed: seeing it all proves
    # the agent's transactions were committed.
    output = run(wait_all_processed(prefix, events, isolation_level="read_committed"))
    exactly_each_once(output, events)
    ends = run(end_offsets(topic))
    run(wait_for(lambda: _reached(app_id, topic, ends), timeout=60, what="offsets committed in transactions"))
    # The outputs were written in transactions: each output partition holds commit
    # markers besides its records (end offset > record count). Faust used to send them
    # through the plain producer, with no marker at all (docs/delivery.md).
    out_ends = run(end_offsets(f"{prefix}passthrough.out"))
    per_partition = Counter(partition for _, partition, _ in output)
    assert all(out_ends[p] > n for p, n in per_partition.items()), (out_ends, per_partition)


#: Commits every 3 s (the default), or also after every 500 acked records, which start
#: beside the fetch loop (``FastConsumer.commit_by_count``) while batches go on.
COMMITS = {"by time": {}, "by count": {"STREAMETL_COMMIT_EVERY": "500"}}


@pytest.mark.parametrize("commits", list(COMMITS))
def test_kill9_mid_transaction_no_uncommitted_output_no_loss_no_duplicates(workers, namespace, commits):
    app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    events = make_events(20000)
    run(create_topics([topic], partitions=PARTITIONS))
    first = workers(**EXACTLY_ONCE, **COMMITS[commits]).start()
    # A live stream, and the kill once some transactions have committed: killed at its
    # first processed record (as before), a fast worker died inside its first
    # transaction, so nothing committed was ever in play.
    feeder = LiveStream(topic, events, key="user_id", per_chunk=250)

    async def some_committed() -> bool:
        return len(await read_output(prefix, "read_committed", idle=0.2, timeout=2)) >= 500

    run(wait_for(some_committed, timeout=120, interval=0.05, what="some outputs committed"))
    first.kill()
    before = run(read_output(prefix, "read_committed", idle=0.3))
    assert 0 < len(before) < len(events), f"{len(before)} committed at the kill: not mid-stream"
    # Whatever is committed so far is already exactly-once.
    assert all(n == 1 for n in Counter(eid for eid, _, _ in before).values())

    workers(**EXACTLY_ONCE, **COMMITS[commits]).start()
    feeder.wait()
    output = run(wait_all_processed(prefix, events, isolation_level="read_committed"))
    exactly_each_once(output, events)
    ends = run(end_offsets(topic))
    run(wait_for(lambda: _reached(app_id, topic, ends), timeout=60, what="offsets committed in transactions"))
    # The killed worker's open transaction was aborted, not committed: a read_uncommitted
    # reader may see its records, a read_committed one (above) does not.
    raw = run(read_output(prefix, "read_uncommitted", idle=0.3))
    assert len(raw) >= len(output)
    assert run(committed_offsets(app_id, topic)) == ends
