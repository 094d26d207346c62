"""The reference data reader outlives a broker that does not answer (issue 23: a worker
started while the broker was away crashed after 40 s on this reader's end offsets)."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from tables.reference import ReferenceStore


class SlowBroker:
    def __init__(self) -> None:
        self.calls = 0

    async def end_offsets(self, tps):
        self.calls += 1
        if self.calls < 3:
            raise KafkaTimeoutError("Failed to get offsets by times in 40000 ms")
        return {tp: 7 for tp in tps}


def test_end_offsets_are_asked_again_until_the_broker_answers(monkeypatch):
    store = ReferenceStore()

    async def no_wait(seconds):
        return None

    monkeypatch.setattr(store, "sleep", no_wait)
    broker = SlowBroker()
    tps = [TopicPartition("reference", 0), TopicPartition("reference", 1)]
    assert asyncio.run(store._end_offsets(broker, tps)) == {tp: 7 for tp in tps}
    assert broker.calls == 3
