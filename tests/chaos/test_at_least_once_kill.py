"""At-least-once through the fast consume path: kill -9 mid-stream loses nothing.

A worker copies events to ``passthrough.out``; it is killed (no shutdown, no final
commit) while a live stream is being processed; a new worker of the same app resumes from
the last committed offsets. Every input event must be in the output (duplicates are
allowed: that is at-least-once), and the commits must end at the end of the input and
never ahead of what was processed.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.integration.test_delivery_semantics import (
    FORWARD,
    PARTITIONS,
    _reached,
    check_committed_not_ahead,
    committed_offsets,
    end_offsets,
    make_events,
    produce,
    read_output,
    wait_all_processed,
)
from tests.integration.test_exactly_once import COMMITS
from tests.support import LiveStream, Worker, create_topics, run, wait_for


@pytest.mark.parametrize("commits", list(COMMITS))
def test_kill9_mid_stream_loses_nothing(workers, namespace, commits):
    app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    events = make_events(20000)
    run(create_topics([topic], partitions=PARTITIONS))
    first: Worker = workers(**FORWARD, **COMMITS[commits]).start()
    # A live stream (5,000 events/s): a pre-produced backlog of 20,000 was all processed
    # before the kill on a fast machine (CI, session 10: "killed too late").
    feeder = LiveStream(topic, events, key="user_id", per_chunk=250)

    def counted() -> int:
        status, body = first.get("/api/v1/passthrough", timeout=5)
        return body["events"] if status == 200 else 0

    run(wait_for(lambda: counted() >= 2000, timeout=120, interval=0.05, what="part of the stream processed"))
    first.kill()
    partial = run(read_output(prefix, idle=0.3))
    assert len({eid for eid, _, _ in partial}) < len(events), "killed too late to test anything"
    check_committed_not_ahead(run(committed_offsets(app_id, topic)), partial)
    feeder.wait()

    # A second wave arrives while no worker runs; then a new worker takes over.
    more = make_events(2000, start=len(events))
    run(produce(prefix, more))
    second = workers(**FORWARD, **COMMITS[commits]).start()
    output = run(wait_all_processed(prefix, events + more))
    ends = run(end_offsets(topic))
    run(wait_for(lambda: _reached(app_id, topic, ends), timeout=60, what="commits at the end"))
    check_committed_not_ahead(run(committed_offsets(app_id, topic)), output)

    ids = Counter(eid for eid, _, _ in output)
    assert set(ids) == {e["event_id"] for e in events + more}
    # What was repeated is at most what the killed worker processed past its last commit.
    repeated = sum(n - 1 for n in ids.values())
    assert repeated <= len(partial)
    assert second.get("/api/v1/passthrough")[1]["events"] > 0
