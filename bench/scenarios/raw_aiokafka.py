"""The baseline: a plain aiokafka producer, then a plain aiokafka consumer group.

Every other scenario runs this first in the same run, on the same broker, so its
numbers are read as a ratio to what the bare client reaches on this machine.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.events import make_payloads
from bench.harness import Context, Result, self_cpu_seconds
from tests.support import create_topics, kafka_options

NAME = "raw-aiokafka"
DESCRIPTION = "plain aiokafka producer (acks=all) and consumer group (getmany 5000)"


async def produce_raw(ctx: Context, topic: str, payloads: list[bytes], keys: list[bytes]) -> Result:
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all", linger_ms=5, **kafka_options(),
                                max_batch_size=512 * 1024)
    await producer.start()
    latencies: list[float] = []
    try:
        cpu0, t0 = self_cpu_seconds(), time.perf_counter()
        futures = []
        for key, value in zip(keys, payloads, strict=True):
            sent = time.perf_counter()
            fut = await producer.send(topic, value, key=key)
            fut.add_done_callback(lambda _f, sent=sent: latencies.append((time.perf_counter() - sent) * 1000))
            futures.append(fut)
        await asyncio.gather(*futures)
        seconds, cpu = time.perf_counter() - t0, self_cpu_seconds() - cpu0
    finally:
        await producer.stop()
    return Result("raw-aiokafka-produce", len(payloads), seconds, latencies, cpu,
                  settings={"acks": "all", "linger_ms": 5}, compare_with=None)


async def consume_raw(ctx: Context, topic: str, expected: int) -> Result:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=ctx.bootstrap, group_id=ctx.topic("raw-group"), **kafka_options(),
                                auto_offset_reset="earliest", max_poll_records=5000,
                                fetch_max_bytes=50 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        count, t0, cpu0 = 0, None, 0.0
        while count < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for msgs in batch.values():
                if t0 is None and msgs:
                    t0, cpu0 = time.perf_counter(), self_cpu_seconds()
                count += len(msgs)
        seconds, cpu = time.perf_counter() - t0, self_cpu_seconds() - cpu0
        await consumer.commit()
    finally:
        await consumer.stop()
    return Result("raw-aiokafka", count, seconds, [], cpu,
                  settings={"max_poll_records": 5000, "group": True},
                  notes=["consume rate from the first record received; no parsing"], compare_with=None)


async def run(ctx: Context) -> list[Result]:
    topic = ctx.topic("raw")
    await create_topics([topic], partitions=4)
    events = make_payloads(ctx.events, ctx.keys)
    payloads = [orjson.dumps(e) for e in events]
    keys = [e["user_id"].encode() for e in events]
    produced = await produce_raw(ctx, topic, payloads, keys)
    consumed = await consume_raw(ctx, topic, len(payloads))
    return [produced, consumed]
