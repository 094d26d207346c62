"""The one reader of global topics (app/global_topics.py), which reference data, the
pattern catalog and the alert history share: every partition from the beginning,
``caught_up`` at the start's end offsets, read-your-writes waits, and after a failure a
fresh pass that goes on from what was read (nothing applied twice, nothing skipped)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

import app.global_topics as gt


class FakeConsumer:
    """An aiokafka consumer over in-memory logs: {topic: {partition: [(key, value)]}}.
    ``fail_after``: getmany raises once that many records were returned (a broker
    failure in the middle of a pass)."""

    def __init__(self, logs, fail_after=None):
        self.logs, self.fail_after, self.returned = logs, fail_after, 0
        self.pos: dict[TopicPartition, int] = {}
        self.sought: dict[TopicPartition, int] = {}
        self.stopped = False
        self._client = SimpleNamespace(force_metadata_update=self._no_news)

    async def _no_news(self):
        pass

    async def start(self):
        pass

    async def stop(self):
        self.stopped = True

    def partitions_for_topic(self, topic):
        return set(self.logs.get(topic, {})) or None

    def assign(self, tps):
        self.assigned = list(tps)

    def seek(self, tp, offset):
        self.pos[tp] = self.sought[tp] = offset

    async def seek_to_beginning(self, *tps):
        for tp in tps:
            self.pos[tp] = self.sought[tp] = 0

    async def end_offsets(self, tps):
        return {tp: len(self.logs[tp.topic][tp.partition]) for tp in tps}

    async def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    async def position(self, tp):
        return self.pos[tp]

    async def getmany(self, *tps, timeout_ms=0, max_records=None):
        if self.fail_after is not None and self.returned >= self.fail_after:
            raise ConnectionError("broker went away")
        out = {}
        for tp in tps or self.assigned:
            log = self.logs[tp.topic][tp.partition]
            start = self.pos[tp]
            take = log[start:start + 2]  # small fetches: several polls per partition
            if take:
                out[tp] = [SimpleNamespace(offset=start + i, key=k, value=v) for i, (k, v) in enumerate(take)]
                self.pos[tp] = start + len(take)
                self.returned += len(take)
        if not out:
            await asyncio.sleep(0)
        return out


class Reader(gt.GlobalTopicReader):
    def __init__(self, topics):
        super().__init__()
        self._topics = topics
        self.applied: list[tuple[str, bytes, bytes]] = []

    def topics(self):
        return self._topics

    def apply(self, topic, key, value):
        self.applied.append((topic, key, value))


LOGS = {"defs": {0: [(b"a", b"1"), (b"b", b"2"), (b"a", None)], 1: [(b"c", b"3")]},
        "counts": {0: [(b"x", b"7")]}}


def run_until(reader, consumers, condition):
    async def go():
        made = iter(consumers)
        reader.sleep = lambda seconds: asyncio.sleep(0)
        original = gt.new_consumer
        gt.new_consumer = lambda: next(made)
        task = asyncio.ensure_future(reader.read_forever())
        try:
            for _ in range(1000):
                if condition():
                    break
                await asyncio.sleep(0)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gt.new_consumer = original

    asyncio.run(go())


def test_every_partition_is_read_in_order_and_caught_up_is_set_at_the_ends():
    reader = Reader(["defs", "counts"])
    run_until(reader, [FakeConsumer(LOGS)], reader.caught_up.is_set)
    assert reader.caught_up.is_set()
    by_partition = {}
    for topic, key, value in reader.applied:
        by_partition.setdefault(topic, []).append((key, value))
    assert sorted(reader.applied, key=repr) == sorted(
        ((t, k, v) for t, parts in LOGS.items() for log in parts.values() for k, v in log), key=repr)
    assert [kv for kv in by_partition["defs"] if kv[0] in (b"a", b"b")] == LOGS["defs"][0]
    assert reader.positions == {TopicPartition("defs", 0): 3, TopicPartition("defs", 1): 1,
                                TopicPartition("counts", 0): 1}


def test_a_failed_pass_goes_on_from_what_was_read():
    reader = Reader(["defs"])
    first = FakeConsumer(LOGS, fail_after=2)
    second = FakeConsumer(LOGS)
    run_until(reader, [first, second], reader.caught_up.is_set)
    assert first.stopped and reader.caught_up.is_set()
    assert sorted(reader.applied, key=repr) == sorted(
        (("defs", k, v) for log in LOGS["defs"].values() for k, v in log), key=repr)
    # The first pass read two records of partition 0 and the one of partition 1; the
    # second went on from there.
    assert second.sought == {TopicPartition("defs", 0): 2, TopicPartition("defs", 1): 1}


def test_an_empty_topic_is_caught_up_at_once_and_offsets_can_be_awaited():
    reader = Reader(["empty"])
    run_until(reader, [FakeConsumer({"empty": {0: [], 1: []}})], reader.caught_up.is_set)
    assert reader.caught_up.is_set() and reader.applied == []

    async def waits():
        reader.positions[TopicPartition("t", 0)] = 5
        assert await reader.wait_for_offsets("t", {0: 4}, timeout=0.01)
        assert not await reader.wait_for_offsets("t", {0: 5}, timeout=0.01)

    asyncio.run(waits())


def test_read_recent_hands_over_the_last_records_of_the_chosen_partition(monkeypatch):
    logs = {"alerts": {0: [(b"k", f"{i}".encode()) for i in range(5)], 1: [(b"j", b"x")]}}
    monkeypatch.setattr(gt, "new_consumer", lambda: FakeConsumer(logs))
    got = []
    asyncio.run(gt.read_recent("alerts", 3, lambda m: got.append(m.value)))
    assert sorted(got) == [b"2", b"3", b"4", b"x"]
    got.clear()
    asyncio.run(gt.read_recent("alerts", 2, lambda m: got.append(m.value), lambda count: 0))
    assert got == [b"3", b"4"]
    got.clear()
    asyncio.run(gt.read_recent("missing", 2, got.append))
    assert got == []
