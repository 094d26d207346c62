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
