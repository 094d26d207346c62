"""CPU per record of turning one fetch response into records, without a broker.

``python -m bench.fetch_micro [records] [rounds]`` builds a fetch response of
``records`` (default 5,000) click events of ~300 bytes in record batches of 500, then
iterates it the way aiokafka's ``FetchResult.getall`` does, ``rounds`` times (default
40), with aiokafka's ``PartitionRecords`` (a ``ConsumerRecord`` per record; what topics
without batch agents get) and with ``RawPartitionRecords`` (app/transport.py: aiokafka's
parsed record objects; what batch-agent topics get), read_committed as the worker's
consumer reads (``WORKER_ISOLATION_LEVEL``). Reports ``time.process_time`` µs per record
for each, alternating, twice.
"""

from __future__ import annotations

import random
import struct
import sys
import time

import orjson
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from app.transport import _AIOKAFKA_PARTITION_RECORDS, RawPartitionRecords
from bench.events import make_event

PER_BATCH = 500


def fetch_response(n: int) -> bytes:
    rng = random.Random(1)
    now_ms = int(time.time() * 1000)
    out = []
    for base in range(0, n, PER_BATCH):
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=1 << 24)
        for i in range(min(PER_BATCH, n - base)):
            event = make_event(base + i, 10_000, rng, ts=now_ms / 1000)
            builder.append(i, timestamp=now_ms, key=str(event["user_id"]).encode(), value=orjson.dumps(event),
                           headers=[])
        data = bytearray(builder.build())
        data[0:8] = struct.pack(">q", base)  # base offset (appends are offset deltas)
        out.append(bytes(data))
    return b"".join(out)


def per_record_us(cls: type, data: bytes, rounds: int) -> float:
    tp = TopicPartition("clicks", 0)
    n = 0
    start = time.process_time()
    for _ in range(rounds):
        records = cls(tp, MemoryRecords(data), [], 0, None, None, False, aiokafka_fetcher.READ_COMMITTED)
        taken = []
        for record in records:  # FetchResult.getall's loop
            taken.append(record)
        n += len(taken)
    return (time.process_time() - start) / n * 1e6


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 5_000
    rounds = int(argv[1]) if len(argv) > 1 else 40
    data = fetch_response(n)
    for _ in range(2):
        for name, cls in (("aiokafka PartitionRecords", _AIOKAFKA_PARTITION_RECORDS),
                          ("RawPartitionRecords", RawPartitionRecords)):
            print(f"{name}: {per_record_us(cls, data, rounds):.2f} µs/record ({n} records x {rounds})")


if __name__ == "__main__":
    main(sys.argv[1:])
