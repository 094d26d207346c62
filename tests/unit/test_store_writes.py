"""How a large ``StoreWrites`` reaches RocksDB (tables/store.py), no broker.

A commit's snapshot writes every state changed since the last commit in one
``StoreWrites``: ~9,000 pattern states in the pattern benchmark, whose one RocksDB write
held the worker's event loop 10-90 ms (issue 22; docs/delivery.md, AE). Past
``WRITE_CHUNK`` values a partition's writes go in several write batches, in the order
they were made, and the event loop runs between two of them; a small write (a batch's
own) is still one write per partition, with no extra loop turn.
"""

from __future__ import annotations

import asyncio

import pytest
from rocksdict import WriteBatch

import tables.store as store_module
from tables.store import StoreWrites


class Changelog:
    """``kafka_io.RecordBatches`` stand-in: records what was added, acks at once."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes, bytes | None]] = []

    def add(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.records.append((partition, key, value))

    async def start(self, topic: str) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        last: dict[int, int] = {}
        for partition, _key, _value in self.records:
            last[partition] = last.get(partition, -1) + 1
        done.set_result(last)
        return done


class KafkaIO:
    def record_batches(self) -> Changelog:
        return Changelog()


class DB:
    """A partition's RocksDB stand-in: each write's count, and when it came."""

    def __init__(self, log: list) -> None:
        self.log = log

    def write(self, batch: WriteBatch) -> None:
        assert batch.__class__ is WriteBatch
        self.log.append(("write", batch.len()))


class Table:
    name = "t"

    class changelog_topic:  # noqa: N801 - Faust's attribute name
        @staticmethod
        def get_topic_name() -> str:
            return "t-changelog"

    class data:  # noqa: N801
        persisted: dict = {}

        @classmethod
        def set_persisted_offset(cls, tp, offset) -> None:
            cls.persisted[tp] = offset


class Target:
    def __init__(self, log: list) -> None:
        self.table = Table()
        self.db = DB(log)

    def partition_db(self, partition: int) -> DB:
        return self.db


@pytest.fixture
def log(monkeypatch):
    monkeypatch.setattr(store_module, "kafka_io", KafkaIO())
    return []


async def write_with_a_bystander(log: list, items: list) -> None:
    """``StoreWrites.add(items)`` then ``store()``, while another task notes each loop
    turn it gets."""
    writes = StoreWrites(Target(log))
    writes.add(items, str_keys=True)
    stop = False

    async def bystander() -> None:
        while not stop:
            log.append(("turn",))
            await asyncio.sleep(0)

    task = asyncio.ensure_future(bystander())
    await asyncio.sleep(0)
    log.clear()
    await writes.store()
    stop = True
    await task


def test_a_large_write_goes_to_rocksdb_in_chunks_with_the_loop_running_in_between(log):
    """2,500 values of one partition: three writes (1,000, 1,000, 500) and a loop turn
    before each, not one write that holds the loop for all of them."""
    items = [(0, f"k{i:05d}".encode(), {"n": i}) for i in range(2500)]
    asyncio.run(write_with_a_bystander(log, items))
    writes = [entry for entry in log if entry[0] == "write"]
    assert writes == [("write", 1000), ("write", 1000), ("write", 500)]
    between = [i for i, entry in enumerate(log) if entry[0] == "write"]
    assert all(("turn",) in log[a:b] for a, b in zip([0, *between], between, strict=False))


def test_a_small_write_is_one_write_per_partition(log):
    """A batch's own writes (below ``WRITE_CHUNK``): one write per partition, as before."""
    items = [(p, f"k{i}".encode(), {"n": i}) for i in range(20) for p in (0, 1)]
    asyncio.run(write_with_a_bystander(log, items))
    assert [entry for entry in log if entry[0] == "write"] == [("write", 20), ("write", 20)]


def test_a_commit_pauses_between_write_batches_as_long_as_the_last_one_took(log):
    """A commit's snapshot hands ``store`` its pause (``CommitProtocol._batches_first``):
    before every write batch but the first, ``pause`` is awaited with the time the
    previous write took, instead of the one loop turn that let no waiting batch in
    (a fetch needs several turns to reach its batch; docs/delivery.md, AE)."""
    items = [(0, f"k{i:05d}".encode(), {"n": i}) for i in range(2500)]
    paused: list[float] = []

    async def pause(took: float) -> None:
        paused.append(took)
        log.append(("pause",))

    async def run() -> None:
        writes = StoreWrites(Target(log))
        writes.add(items, str_keys=True)
        await writes.store(pause)

    asyncio.run(run())
    assert [entry[0] for entry in log] == ["pause", "write", "pause", "write", "pause", "write"]
    assert paused[0] == 0.0 and all(took > 0 for took in paused[1:])
