"""Fetch positions after a dropped fetch, on a real aiokafka consumer and broker.

Issue 23, finding 3 (a worker stuck in table recovery after a rebalance): a fetch that
a rebalance overtook is dropped, and its changelog partitions must go back to the
first dropped record, or Recovery never gets those records. ``FastConsumerThread.rewind``
does that through aiokafka's own partition state; this checks it against aiokafka as
installed: back to the first dropped record (those records come again), never forward,
nothing for a partition that is not assigned.
"""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP

from app.transport import FastConsumerThread
from tests.support import BOOTSTRAP, create_topics, produce_json, run, unique


async def offsets_fetched(consumer: AIOKafkaConsumer, tp: TopicPartition) -> list[int]:
    for _ in range(50):
        got = await consumer.getmany(tp, timeout_ms=200)
        if got.get(tp):
            return [m.offset for m in got[tp]]
    raise AssertionError("nothing fetched")


def test_rewind_moves_a_partition_back_to_the_first_dropped_record_and_never_forward(kafka):
    topic = unique("rewind-changelog")
    run(create_topics([topic], partitions=1))
    run(produce_json(topic, [{"i": i} for i in range(20)]))

    async def scenario() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            dropped = await offsets_fetched(consumer, tp)
            assert await consumer.position(tp) > dropped[0]
            thread = SimpleNamespace(_ensure_consumer=lambda: consumer)  # all _rewind uses

            # Faust's TP, as FastConsumer passes it.
            assert FastConsumerThread._rewind(thread, TP(topic, 0), dropped[0]) is True
            assert await consumer.position(tp) == dropped[0]
            again = await offsets_fetched(consumer, tp)
            assert again[0] == dropped[0]

            position = await consumer.position(tp)
            assert FastConsumerThread._rewind(thread, TP(topic, 0), position + 5) is False
            assert FastConsumerThread._rewind(thread, TP(topic, 0), position) is False
            assert await consumer.position(tp) == position
            assert FastConsumerThread._rewind(thread, TP(topic, 7), 0) is False  # not assigned
        finally:
            await consumer.stop()

    run(scenario())
