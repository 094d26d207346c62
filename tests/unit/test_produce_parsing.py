"""The produce body parser: what it accepts and how it names what it refuses."""

from __future__ import annotations

import orjson
import pytest

from app.kafka_io import partition_for
from web.common import ApiError
from web.produce import parse_produce


def test_messages_are_encoded_with_keys_and_headers():
    req = parse_produce({"topic": "events", "key_field": "user_id", "headers": {"src": "api"},
                         "messages": [{"user_id": 7, "v": 1}, {"user_id": "a", "v": 2}]})
    assert req.topic == "events"
    assert [m.key for m in req.messages] == [b"7", b"a"]
    assert orjson.loads(req.messages[0].value) == {"user_id": 7, "v": 1}
    assert req.messages[0].headers == (("src", b"api"),)


@pytest.mark.parametrize(
    "body,status,field",
    [
        ({"messages": [{}]}, 422, "topic"),
        ({"topic": "a b", "messages": [{}]}, 422, "topic"),
        ({"topic": "..", "messages": [{}]}, 422, "topic"),
        ({"topic": "t"}, 422, "messages"),
        ({"topic": "t", "messages": {}}, 422, "messages"),
        ({"topic": "t", "messages": [{}], "headers": []}, 422, "headers"),
        ({"topic": "t", "messages": [{}], "key_field": 3}, 422, "key_field"),
    ],
)
def test_invalid_bodies_name_the_field(body, status, field):
    with pytest.raises(ApiError) as info:
        parse_produce(body)
    assert info.value.status == status
    assert info.value.details["field"] == field


def test_the_refused_message_index_is_reported():
    with pytest.raises(ApiError) as info:
        parse_produce({"topic": "t", "messages": [{}, {}, "x"]})
    assert info.value.details == {"index": 2}


def test_unknown_fields_are_refused():
    with pytest.raises(ApiError) as info:
        parse_produce({"topic": "t", "messages": [{}], "partition": 3})
    assert info.value.details == {"fields": ["partition"]}


def test_partitioner_matches_the_java_clients_default_partitioner():
    # aiokafka's DefaultPartitioner is a port of the Java client's (murmur2, positive).
    from aiokafka.partitioner import DefaultPartitioner

    java_like = DefaultPartitioner()
    for i in range(1000):
        key = f"u{i}".encode()
        assert partition_for(key, 4, 0) == java_like(key, [0, 1, 2, 3], [0, 1, 2, 3])
    assert partition_for(None, 4, 6) == 2


def test_records_appended_to_a_record_batch_are_counted_and_a_full_batch_refuses_more():
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.record.default_records import DefaultRecordBatch

    from app.kafka_io import append_record, finished

    batch = BatchBuilder(1024, 0)
    count = 0
    while append_record(batch, count, f"k{count}".encode(), b"v" * 100, [("h", b"1")] if count == 0 else []):
        count += 1
    assert 3 <= count < 10  # ~120 bytes a record in 1 KiB
    built = finished(batch, count)
    assert built.record_count() == count and built.closed()
    records = list(DefaultRecordBatch(bytearray(built._build())))
    assert [r.offset for r in records] == list(range(count))
    assert [r.key for r in records] == [f"k{i}".encode() for i in range(count)]
    assert records[0].headers == [("h", b"1")]


class RecordingProducer:
    """What ``RecordBatches`` uses of aiokafka's producer: small record batches, and
    ``send_batch`` answering with the offsets a broker would give (per partition)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []
        self.next_offset: dict[int, int] = {}

    def create_batch(self):
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, batch, topic, *, partition):
        import asyncio
        from types import SimpleNamespace

        from aiokafka.record.default_records import DefaultRecordBatch

        records = [(r.key, r.value) for r in DefaultRecordBatch(bytearray(batch._build()))]
        assert batch.record_count() == len(records)
        self.sent.append((topic, partition, records))
        base = self.next_offset.get(partition, 0)
        self.next_offset[partition] = base + len(records)
        future = asyncio.get_running_loop().create_future()
        future.set_result(SimpleNamespace(partition=partition, offset=base))
        return future


def test_record_batches_keep_each_partitions_order_across_full_batches():
    import asyncio

    from app.kafka_io import RecordBatches

    async def scenario():
        producer = RecordingProducer(batch_size=1024)
        batches = RecordBatches(producer)
        expected: dict[int, list[tuple[bytes, bytes]]] = {0: [], 1: []}
        for i in range(40):  # ~120 bytes a record: several full batches per partition
            partition = 0 if i % 3 else 1
            record = (f"k{i}".encode(), b"v" * 100)
            batches.add(partition, *record)
            expected[partition].append(record)
        assert batches.count == 40
        acked = await batches.start("sink")
        assert batches.count == 0  # emptied: the next batch starts afresh
        last = await acked
        got: dict[int, list[tuple[bytes, bytes]]] = {0: [], 1: []}
        for topic, partition, records in producer.sent:
            assert topic == "sink"
            got[partition].extend(records)
        assert got == expected
        assert len(producer.sent) > 2  # full batches were sent, not one giant batch
        assert last == {0: len(expected[0]) - 1, 1: len(expected[1]) - 1}

    asyncio.run(scenario())


def test_record_batches_add_all_makes_the_batches_add_makes():
    """``RecordBatches.add_all`` (a partition's records in one call: a window end's
    results, ``KafkaIO.start_partitioned``) fills the same record batches, in the same
    order, as ``add`` per record, across full batches and mixed with ``add``, and
    counts every record."""
    import asyncio

    from app.kafka_io import RecordBatches

    records = [(f"k{i}".encode(), b"v" * (100 + i % 7)) for i in range(45)]

    async def sent(fill):
        producer = RecordingProducer(batch_size=1024)
        batches = RecordBatches(producer)
        fill(batches)
        count = batches.count
        await (await batches.start("sink"))
        return count, producer.sent

    def one_by_one(batches):
        for i, record in enumerate(records):
            batches.add(i % 2, *record)

    def together(batches):
        batches.add(0, *records[0])  # an open batch already holds a record
        batches.add_all(0, [r for i, r in enumerate(records) if i % 2 == 0][1:])
        batches.add_all(1, [r for i, r in enumerate(records) if i % 2 == 1])
        batches.add_all(1, [])

    want = asyncio.run(sent(one_by_one))
    assert want[0] == len(records) and len(want[1]) > 2  # several full batches
    count, got = asyncio.run(sent(together))
    assert count == len(records)
    for partition in (0, 1):
        assert ([r for _, p, rs in got if p == partition for r in rs]
                == [r for _, p, rs in want[1] if p == partition for r in rs])
        assert ([len(rs) for _, p, rs in got if p == partition]
                == [len(rs) for _, p, rs in want[1] if p == partition])


def test_a_record_larger_than_a_batch_goes_alone_in_order():
    import asyncio

    from app.kafka_io import RecordBatches

    async def scenario():
        producer = RecordingProducer(batch_size=256)
        batches = RecordBatches(producer)
        for key, value in ((b"a", b"x" * 10), (b"big", b"v" * 4096), (b"c", b"y" * 10)):
            batches.add(0, key, value)
        await (await batches.start("sink"))
        return [[key for key, _ in records] for _, _, records in producer.sent]

    # aiokafka's builder always takes a batch's first record (the broker judges its size).
    assert asyncio.run(scenario()) == [[b"a"], [b"big"], [b"c"]]
