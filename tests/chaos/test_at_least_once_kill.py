"""At-least-once through the fast consume path: kill -9 mid-stream loses nothing.

A worker copies events to ``passthrough.out``; it is killed (no shutdown, no final
commit) while the backlog is being processed; a new worker of the same app resumes from
the last committed offsets. Every input event must be in the output (duplicates are
allowed: that is at-least-once), and the commits must end at the end of the input and
never ahead of what was processed.
"""

from __future__ import annotations

from collections import Counter

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
from tests.support import Worker, create_topics, run, wait_for


def test_kill9_mid_stream_loses_nothing(workers, namespace):
    app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    events = make_events(20000)
    run(create_topics([topic], partitions=PARTITIONS))
    run(produce(prefix, events))
    first: Worker = workers(**FORWARD).start()

    def counted() -> int:
        status, body = first.get("/api/v1/passthrough", timeout=5)
        return body["events"] if status == 200 else 0

    # Kill as soon as the agent has processed something of the backlog.
    run(wait_for(counted, timeout=120, interval=0.05, what="part of the backlog processed"))
    first.kill()
    partial = run(read_output(prefix, idle=0.3))
    assert len({eid for eid, _, _ in partial}) < len(events), "killed too late to test anything"
    check_committed_not_ahead(run(committed_offsets(app_id, topic)), partial)

    # A second wave arrives while no worker runs; then a new worker takes over.
    more = make_events(2000, start=len(events))
    run(produce(prefix, more))
    second = workers(**FORWARD).start()
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
