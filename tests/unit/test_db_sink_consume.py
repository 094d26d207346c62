"""A database sink's consume loop without Kafka (``DbSink._write`` over the SQLite
target, a stand-in consumer): records the database refuses go to the dead-letter topic
and the rest are written, records the database already holds are not written again, a
partition the rebalance could not position is positioned when met, and a revoke waits
for the batch being written."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass

import asyncpg
import orjson
import pytest
from aiokafka import TopicPartition

from agents import db_sink
from agents.db_sink import DbSink, _Rebalance
from app.db_sinks import OffsetConflict, parse_sink, refused_by_database
from tests.unit.test_db_sinks import rows


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class Consumer:
    """What the sink asks of its aiokafka consumer here."""

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, None))

    def __init__(self, topic: str) -> None:
        self.seeks: list[tuple[int, int | None]] = []
        self.assigned = {TopicPartition(topic, p) for p in range(4)}

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.log_end

    log_end: int | None = None


class Producer:
    """Records each dead letter with the offsets the database held when it was sent."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.sent: list[tuple[int, str, dict]] = []

    async def send_and_wait(self, topic, value, key=None, headers=None):
        h = dict(headers)
        self.sent.append((int(h["dlq.offset"]), h["dlq.reason"].decode(), sink_offsets(self.tmp_path)))


@pytest.fixture
def make_sink(tmp_path, monkeypatch):
    producer = Producer(tmp_path)
    monkeypatch.setattr(db_sink.kafka_io, "producer", producer, raising=False)

    def make(**extra) -> DbSink:
        raw = {"name": "replica", "source": "amounts", "type": "sqlite", "path": str(tmp_path / "r.db"),
               "table": "amounts", "key": ["id"], "mode": "upsert", **extra}
        sink = DbSink(parse_sink(raw, "sinks[0]"))
        sink.consumer = Consumer(sink.topic)
        sink.dead = producer.sent
        return sink

    return make


def records(sink, rows, partition=0, first=0):
    return {TopicPartition(sink.topic, partition): [
        Record(sink.topic, partition, first + i, None, row if isinstance(row, bytes) else _json(row))
        for i, row in enumerate(rows)]}


def _json(row) -> bytes:
    return orjson.dumps(row)


def table(tmp_path, name="amounts"):
    return rows(tmp_path, name)


def sink_offsets(tmp_path):
    try:
        return {p: n for _, _, p, n in table(tmp_path, "streametl_sink_offsets")}
    except sqlite3.OperationalError:
        return {}


def audit(tmp_path):
    return [(p, first, last) for _, _, p, first, last, _, _ in table(tmp_path, "streametl_sink_batches")]


async def opened(sink: DbSink) -> DbSink:
    await sink.target.open()
    sink.expected[0] = None
    return sink


def test_records_the_database_refuses_are_dead_lettered_first_and_the_rest_written(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink(columns={"id": "INTEGER", "amount": "INTEGER NOT NULL"}))
        rows = [{"id": i, "amount": i} for i in range(10)]
        rows[6] = {"id": 6}  # NOT NULL refused
        rows[8] = b"not json"  # no change at all: refused before the database
        written = await sink._write(records(sink, rows))
        assert [(b.first_offset, b.last_offset) for b in written] == [(0, 9)]
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert table(tmp_path) == [(i, i) for i in range(10) if i not in (6, 8)]
    # Each dead letter went out while the stored offset was still before its record.
    assert [(offset, reason) for offset, reason, _ in sink.dead] == [(8, "invalid_json"), (6, "refused_by_database")]
    assert all(stored.get(0, 0) <= offset for offset, _, stored in sink.dead)
    assert sink_offsets(tmp_path) == {0: 10} and sink.expected == {0: 10}
    spans = audit(tmp_path)
    assert spans[0][1] == 0 and spans[-1][2] == 9
    assert all(b[1] == a[2] + 1 for a, b in zip(spans, spans[1:], strict=False)), spans  # no gap, no overlap
    assert sink.counters["refused_by_database"] == 1 and sink.counters["applied"] == 8


def test_records_the_database_already_holds_are_not_written_again(tmp_path, make_sink):
    """After a rebalance the consumer restarts from the group's commit, which can be
    behind the offset the database stored: those records are skipped."""
    async def main():
        sink = await opened(make_sink(mode="append", key=[]))
        await sink._write(records(sink, [{"id": i} for i in range(5)]))
        await sink._write(records(sink, [{"id": i} for i in range(2, 8)], first=2))
        await sink.target.close()

    asyncio.run(main())
    assert table(tmp_path) == [(i,) for i in range(8)]
    assert audit(tmp_path) == [(0, 0, 4), (0, 5, 7)]


def test_a_partition_the_rebalance_could_not_position_is_positioned_when_met(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink())
        await sink._write(records(sink, [{"id": 1, "amount": 1}]))
        sink.expected.clear()  # the assignment's offset read failed (the database away)
        written = await sink._write(records(sink, [{"id": 9, "amount": 9}], first=40))
        await sink.target.close()
        return sink, written

    sink, written = asyncio.run(main())
    assert written == [] and table(tmp_path) == [(1, 1)]
    assert sink.consumer.seeks == [(0, 1)] and sink.expected == {0: 1}


def test_a_revoke_waits_for_the_batch_being_written(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink())
        gate, inside = asyncio.Event(), asyncio.Event()
        apply = sink.target.apply

        async def slow_apply(batches):
            inside.set()
            await gate.wait()
            await apply(batches)

        sink.target.apply = slow_apply
        writing = asyncio.create_task(sink._write(records(sink, [{"id": 1, "amount": 1}])))
        await inside.wait()
        revoking = asyncio.create_task(_Rebalance(sink).on_partitions_revoked([TopicPartition(sink.topic, 0)]))
        await asyncio.sleep(0.05)
        assert not revoking.done()
        gate.set()
        await writing
        await revoking
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert sink.expected == {}  # revoked after the batch, not re-added by it
    assert table(tmp_path) == [(1, 1)]


def test_the_database_away_is_retried_not_dead_lettered(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink())

        async def locked(batches):
            raise sqlite3.OperationalError("database is locked")

        sink.target.apply = locked
        with pytest.raises(sqlite3.OperationalError):
            await sink._write(records(sink, [{"id": 1, "amount": 1}]))
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert sink.dead == [] and sink.expected == {0: None}


def test_a_consumer_that_failed_to_start_is_not_kept(tmp_path, make_sink, monkeypatch):
    stopped = []

    class Failing:
        def __init__(self, **kwargs):
            pass

        async def start(self):
            raise ConnectionError("no broker")

        async def stop(self):
            stopped.append(True)

    monkeypatch.setattr(db_sink, "AIOKafkaConsumer", Failing)
    sink = make_sink()
    sink.consumer = None
    with pytest.raises(ConnectionError):
        asyncio.run(sink._start_consumer())
    assert sink.consumer is None and stopped == [True]


def test_a_field_name_with_a_double_quote_is_a_column_like_any_other(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink(evolve=True))
        await sink._write(records(sink, [{"id": 1, "amount": 1}, {"id": 2, 'we"ird': "x", "amount": 2}]))
        await sink.target.close()

    asyncio.run(main())
    assert table(tmp_path) == [(1, 1, None), (2, 2, "x")]


def test_a_declared_column_no_row_carries_does_not_stop_an_existing_table(tmp_path, make_sink):
    async def main():
        first = await opened(make_sink())
        await first._write(records(first, [{"id": 1, "amount": 1}]))
        await first.target.close()
        declared = await opened(make_sink(columns={"note": "TEXT"}))
        declared.expected[0] = 1
        await declared._write(records(declared, [{"id": 2, "amount": 2}, {"id": 3, "amount": 3, "note": "n"}],
                                           first=1))
        await declared.target.close()
        return declared

    declared = asyncio.run(main())
    assert table(tmp_path) == [(1, 1), (2, 2)]
    assert [(offset, reason) for offset, reason, _ in declared.dead] == [(2, "unknown_column")]


@pytest.mark.parametrize("exc,refused", [
    (ValueError("invalid literal for int()"), True),
    (asyncpg.exceptions.NotNullViolationError("null value"), True),
    (asyncpg.exceptions.InvalidDatetimeFormatError("bad date"), True),
    (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), False),
    (asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), False),
    (asyncpg.exceptions.DeadlockDetectedError("deadlock"), False),
    (sqlite3.IntegrityError("NOT NULL"), True),
    (sqlite3.OperationalError("database is locked"), False),
    (OffsetConflict("moved"), False),
    (TimeoutError(), False),
    (OSError("connection refused"), False),
])
def test_what_counts_as_refused_by_the_database(exc, refused):
    assert refused_by_database(exc) is refused


def test_a_dead_letter_is_not_sent_again_when_a_retry_reads_its_record_again(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink())
        apply, failures = sink.target.apply, [sqlite3.OperationalError("database is locked")] * 2

        async def locked_twice(batches):
            if failures:
                raise failures.pop()
            await apply(batches)

        sink.target.apply = locked_twice
        fetched = records(sink, [{"id": 1, "amount": 1}, b"not json", {"id": 3, "amount": 3}])
        for _ in range(2):  # the retries read the same records again
            with pytest.raises(sqlite3.OperationalError):
                await sink._write(fetched)
        await sink._write(fetched)
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert [(offset, reason) for offset, reason, _ in sink.dead] == [(1, "invalid_json")]
    assert table(tmp_path) == [(1, 1), (3, 3)] and sink.dead_lettered == set()


def test_halving_a_batch_that_creates_the_table_keeps_every_column_of_the_batch(tmp_path, make_sink):
    """The first half would otherwise create the table without the later half's fields,
    and their records would be refused for an unknown column (evolve off)."""
    async def main():
        sink = await opened(make_sink(columns={"id": "INTEGER", "amount": "INTEGER NOT NULL"}))
        await sink._write(records(sink, [{"id": 0, "amount": 0}, {"id": 1, "amount": 1}, {"id": 2},
                                         {"id": 3, "amount": 3, "note": "n"}]))
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert table(tmp_path) == [(0, 0, None), (1, 1, None), (3, 3, "n")]
    assert [(offset, reason) for offset, reason, _ in sink.dead] == [(2, "refused_by_database")]


def test_a_field_name_that_cannot_be_a_column_is_dead_lettered_not_retried_for_ever(tmp_path, make_sink):
    """SQLite's names ignore case: "Amount" beside "amount" failed the table's change,
    which was retried for ever (a database error, not the record's)."""
    async def main():
        sink = await opened(make_sink(evolve=True))
        await sink._write(records(sink, [{"id": 1, "amount": 1}, {"id": 2, "Amount": 2}, {"id": 3, "amount": 3}]))
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert table(tmp_path) == [(1, 1), (3, 3)]
    assert [(offset, reason) for offset, reason, _ in sink.dead] == [(1, "bad_column_name")]


def test_records_of_a_topic_made_again_are_written_though_below_the_stored_offset(tmp_path, make_sink):
    async def main():
        sink = await opened(make_sink())
        await sink._write(records(sink, [{"id": i, "amount": i} for i in range(5)], first=95))  # up to 100
        sink.consumer.log_end = 3  # the topic was deleted and made again: its log ends at 3
        await sink._write(records(sink, [{"id": i, "amount": -i} for i in range(3)]))
        await sink.target.close()
        return sink

    sink = asyncio.run(main())
    assert table(tmp_path) == sorted([(0, 0), (1, -1), (2, -2), (3, 3), (4, 4)])
    assert sink.expected == {0: 3} and sink.counters["stored_offset_past_log_end"] == 1
