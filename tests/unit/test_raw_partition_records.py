"""Raw records for batch-agent topics (app/transport.py: RawPartitionRecords): the same
records, offsets and fetch position as aiokafka's own iteration, without the
ConsumerRecord copies; topics without batch agents keep aiokafka's ConsumerRecord."""

from __future__ import annotations

import struct

import pytest
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from app import transport
from app.batches import BATCH_AGENTS

READ_COMMITTED = 1
ABORTING_PRODUCER = 7


def batch(base: int, n: int, *, producer_id: int = -1, control: bool = False) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=int(producer_id >= 0),
                                        producer_id=producer_id, producer_epoch=0 if producer_id >= 0 else -1,
                                        base_sequence=-1, batch_size=1 << 20)
    for i in range(n):
        if control:  # an ABORT marker: key = version 0, type 0
            builder.append(i, timestamp=1_000, key=struct.pack(">hh", 0, 0), value=b"", headers=[])
        else:
            builder.append(i, timestamp=1_000 + i, key=f"k{base + i}".encode(),
                           value=f"v{base + i}".encode(), headers=[("h", b"%d" % (base + i))])
    data = bytearray(builder.build())
    data[0:8] = struct.pack(">q", base)  # the batch's base offset (appends are offset deltas)
    if control:
        data[22] |= 0x20  # the batch attributes' control flag (int16 at byte 21; CRC not checked)
    return bytes(data)


# 0-2 committed, 3-4 from a transaction that was aborted, 5 its abort marker, 6-8 committed
FETCH = batch(0, 3) + batch(3, 2, producer_id=ABORTING_PRODUCER) + \
    batch(5, 1, producer_id=ABORTING_PRODUCER, control=True) + batch(6, 3)
ABORTED = [(ABORTING_PRODUCER, 3)]


def iterate(cls, topic: str, max_records: int | None = None) -> tuple[list, list, int]:
    tp = TopicPartition(topic, 2)
    records = cls(tp, MemoryRecords(FETCH), list(ABORTED), 0, None, None, False, READ_COMMITTED)
    if max_records is None:  # (aiokafka's own class may not be iterated once exhausted)
        return list(records), [], records.next_fetch_offset
    first = [next(iter(records)) for _ in range(max_records)]
    return first, list(records), records.next_fetch_offset


def fields(r) -> tuple:
    return r.offset, r.timestamp, r.key, r.value, list(r.headers)


def test_raw_records_are_aiokafkas_records_without_the_copy():
    want, _, want_position = iterate(transport._AIOKAFKA_PARTITION_RECORDS, "t")
    got, _, position = iterate(transport.RawPartitionRecords, "t")
    assert [r.offset for r in got] == [0, 1, 2, 6, 7, 8]  # aborted records and markers skipped
    assert [fields(r) for r in got] == [fields(r) for r in want]
    assert position == want_position == 9
    assert all(isinstance(r, ConsumerRecord) for r in want)
    assert not any(isinstance(r, ConsumerRecord) for r in got)


def test_a_partly_taken_fetch_continues_where_it_stopped():
    """FetchResult.getall stops at max_records and iterates the same object again later."""
    first, rest, position = iterate(transport.RawPartitionRecords, "t", max_records=4)
    assert [r.offset for r in first] == [0, 1, 2, 6]
    assert [r.offset for r in rest] == [7, 8]
    assert position == 9


def test_fetcher_builds_raw_records_only_for_batch_agent_topics(monkeypatch):
    monkeypatch.setattr(aiokafka_fetcher, "PartitionRecords", aiokafka_fetcher.PartitionRecords)
    monkeypatch.setitem(BATCH_AGENTS, "batched", [])
    transport.use_raw_records_for_batch_topics()
    make = aiokafka_fetcher.PartitionRecords  # what aiokafka's fetcher now calls
    raw = make(TopicPartition("batched", 0), MemoryRecords(FETCH), [], 0, None, None, False, READ_COMMITTED)
    plain = make(TopicPartition("other", 0), MemoryRecords(FETCH), [], 0, None, None, False, READ_COMMITTED)
    assert type(raw) is transport.RawPartitionRecords
    assert type(plain) is transport._AIOKAFKA_PARTITION_RECORDS
    assert all(isinstance(r, ConsumerRecord) and r.topic == "other" for r in plain)


@pytest.mark.parametrize("max_records", [None, 2])
def test_aiokafkas_fetch_result_takes_raw_records(max_records):
    tp = TopicPartition("t", 0)
    records = transport.RawPartitionRecords(tp, MemoryRecords(FETCH), list(ABORTED), 0, None, None, False,
                                            READ_COMMITTED)

    class Assignment:
        active = True
        paused = False
        position = 0

        def state_value(self, tp):
            return self

        def consumed_to(self, offset):
            self.position = offset

    assignment = Assignment()
    result = FetchResult(tp, assignment=assignment, partition_records=records, backoff=0)
    taken = []
    while result.has_more():
        got = result.getall(max_records)
        assert got or not result.has_more()
        taken += got
    assert [r.offset for r in taken] == [0, 1, 2, 6, 7, 8]
    assert assignment.position == 9
