"""Delivery semantics of the fast consume path (app/transport.py) on the real broker.

The worker runs the passthrough agent in ``forward`` mode: every processed event is
copied to ``passthrough.out`` with its source ``partition:offset`` in header ``src``.
So "processed" is observable, and we can check the consumer group's committed offsets
against it. The helpers here are shared by the chaos and exactly-once tests.
"""

from __future__ import annotations

from collections import Counter

from aiokafka import TopicPartition

from tests import support
from tests.support import create_topics, produce_json, read_topic, run, wait_for

FORWARD = {
    "STREAMETL_PASSTHROUGH_ENABLED": "true",
    "STREAMETL_PASSTHROUGH_MODE": "forward",
    # Frequent commits: more commits to catch ahead of processing, if one ever is.
    "STREAMETL_COMMIT_INTERVAL": "0.2",
    "STREAMETL_BATCH_MAX": "500",
}
PARTITIONS = 4


def make_events(n: int, start: int = 0) -> list[dict]:
    """``n`` distinct events, keyed over 97 users."""
    return [{"event_id": f"e{i:07d}", "user_id": f"u{i % 97:02d}", "value": i} for i in range(start, start + n)]


async def produce(prefix: str, events: list[dict]) -> None:
    """Send events to the passthrough input topic, keyed by user_id."""
    await produce_json(f"{prefix}passthrough", events, key="user_id")


async def read_output(prefix: str, isolation_level: str = "read_uncommitted", idle: float = 0.5,
                      expect: int | None = None, timeout: float = 60.0):
    """What the agent wrote: list of (event_id, src partition, src offset)."""
    records = await read_topic(f"{prefix}passthrough.out", idle=idle, expect=expect, timeout=timeout,
                               isolation_level=isolation_level)
    out = []
    for r in records:
        part, off = r.headers["src"].decode().split(":")
        out.append((r.json()["event_id"], int(part), int(off)))
    return out


async def committed_offsets(group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (absent = none yet)."""
    return {tp.partition: offset for tp, offset in (await support.committed_offsets(group)).items()
            if tp.topic == topic}


async def end_offsets(topic: str) -> dict[int, int]:
    """The log-end offset of each partition of ``topic``."""
    ends = await support.end_offsets(TopicPartition(topic, p) for p in range(PARTITIONS))
    return {tp.partition: offset for tp, offset in ends.items()}


async def wait_all_processed(prefix: str, events: list[dict], timeout: float = 180.0,
                             isolation_level: str = "read_uncommitted"):
    """Wait until every input event_id is in the output; returns the output."""
    want = {e["event_id"] for e in events}
    seen: dict[str, list] = {}

    async def done():
        seen["out"] = await read_output(prefix, isolation_level)
        return want <= {eid for eid, _, _ in seen["out"]}

    await wait_for(done, timeout=timeout, interval=0.5, what=f"all {len(want)} events in the output")
    return seen["out"]


def check_committed_not_ahead(committed: dict[int, int], output) -> None:
    """A committed offset ``c`` on partition p says "everything below c was processed":
    the output (read *after* the offsets) must hold every offset below c of p."""
    processed: dict[int, set[int]] = {}
    for _eid, part, off in output:
        processed.setdefault(part, set()).add(off)
    for part, c in committed.items():
        missing = set(range(c)) - processed.get(part, set())
        assert not missing, f"partition {part} committed {c} but offsets {sorted(missing)[:10]} were not processed"


def test_commits_never_ahead_of_processing_and_nothing_lost(workers, namespace):
    app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    run(create_topics([topic], partitions=PARTITIONS))
    worker = workers(**FORWARD).start()
    events = make_events(8000)

    async def scenario():
        samples = []
        # Feed in chunks; after each, sample (committed offsets, then output) while the
        # agent is still working through the input.
        for i in range(0, len(events), 1000):
            await produce(prefix, events[i:i + 1000])
            committed = await committed_offsets(app_id, topic)
            output = await read_output(prefix, idle=0.2)
            check_committed_not_ahead(committed, output)
            samples.append(sum(committed.values()))
        output = await wait_all_processed(prefix, events)
        # In the end the commits reach the end of the input, and are still not ahead.
        ends = await end_offsets(topic)
        await wait_for(lambda: _reached(app_id, topic, ends), timeout=60, what="commits at the end of the input")
        check_committed_not_ahead(await committed_offsets(app_id, topic), output)
        return samples, output

    samples, output = run(scenario())
    assert len(samples) == 8
    ids = Counter(eid for eid, _, _ in output)
    assert set(ids) == {e["event_id"] for e in events}  # nothing lost, nothing invented
    # One worker, no failure: at-least-once has no reason to repeat anything here.
    assert all(n == 1 for n in ids.values())
    status, body = worker.get("/api/v1/passthrough")
    assert status == 200 and body["events"] == len(events)


async def _reached(app_id: str, topic: str, ends: dict[int, int]) -> bool:
    return await committed_offsets(app_id, topic) == ends
