"""The live pipeline's dedupe memory across batches (agents/pipeline.py ``LiveContext``),
no broker: a batch's writes are stored after its outputs were acked, possibly while the
next batch runs (``Batch.finish_later``), so until then the next batch must read them
from memory, or it would admit a duplicate."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from agents.pipeline import LiveContext
from app.pipelines import parse_pipelines
from operators.steps import run_record


class Record:
    """The fields of a batch record that ``LiveContext`` reads."""

    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset
        self.message = self


class FakeStore:
    """A partition's RocksDB as a dict; ``write_many`` waits for the test to let it."""

    def __init__(self) -> None:
        self.dbs: dict[int, dict[bytes, list]] = {}
        self.gate: asyncio.Event | None = None
        self.deleted: list[bytes] = []
        #: Every write in store order: ("put" or "delete", key).
        self.ops: list[tuple[str, bytes]] = []

    def partition_db(self, partition: int) -> FakeDB:
        return FakeDB(self.dbs.setdefault(partition, {}))

    def scan_partition(self, partition: int, start: bytes = b""):
        """(key, stored bytes) of one partition in key order from ``start`` (the expiry
        queue is rebuilt from them)."""
        import orjson

        return [(key, orjson.dumps(value)) for key, value in sorted(self.dbs.get(partition, {}).items())
                if key >= start]

    def delete(self, event, key: bytes) -> None:
        self.dbs.get(event.message.partition, {}).pop(key, None)
        self.deleted.append(key)

    async def write_many(self, items) -> None:
        """As ``PartitionStore.write_many``: None deletes the key (an expired entry)."""
        assert self.gate is not None
        await self.gate.wait()
        for event, key, value in items:
            db = self.dbs.setdefault(event.message.partition, {})
            if value is None:
                db.pop(key, None)
                self.deleted.append(key)
            else:
                db[key] = value
            self.ops.append(("put" if value is not None else "delete", key))


class FakeDB:
    def __init__(self, data: dict) -> None:
        self.data = data

    def get(self, key: bytes):
        import orjson

        value = self.data.get(key)
        return None if value is None else orjson.dumps(value)


def context(dedupe: dict | None = None, folder: Path | None = None) -> tuple[LiveContext, list, FakeStore]:
    """A live context over a ``FakeStore``; its expiry on disk under ``folder`` (an
    ``ExpiryIndex`` per partition) when given, else in memory (``ExpiryQueue``)."""
    (spec,) = parse_pipelines([{"name": "p", "source": "in", "sink": "out",
                                "steps": [dedupe or {"op": "deduplicate", "horizon_seconds": 60}]}])
    ctx = LiveContext(spec, table=None, expiry_folder=None if folder is None else lambda: folder)
    store = ctx.store = FakeStore()
    return ctx, spec.steps, store


def admitted(ctx: LiveContext, steps: list, events: list[tuple[Record, str]]) -> list[str]:
    ctx.begin_batch()
    out = []
    for event, event_id in events:
        if event.partition != ctx.partition:
            ctx.enter_partition(event)
        ctx.at_offset(event.offset)
        if run_record(steps, {"event_id": event_id}, ctx).record is not None:
            out.append(event_id)
    return out


def test_the_next_batch_sees_writes_still_being_stored_and_then_the_store():
    ctx, steps, store = context()

    async def run() -> None:
        store.gate = asyncio.Event()
        assert admitted(ctx, steps, [(Record(0, 0), "a"), (Record(1, 0), "b")]) == ["a", "b"]
        storing = asyncio.ensure_future(ctx.store_after(None, ctx.detach_writes()))
        await asyncio.sleep(0)
        assert not storing.done() and store.dbs.get(0, {}) == {}
        # The first batch is not stored yet: its ids are still duplicates.
        assert admitted(ctx, steps, [(Record(0, 1), "a"), (Record(0, 2), "c"), (Record(1, 1), "b")]) == ["c"]
        second = asyncio.ensure_future(ctx.store_after(None, ctx.detach_writes()))
        store.gate.set()
        await asyncio.gather(storing, second)
        assert ctx.storing == []
        assert sorted(store.dbs[0]) == [b"0|id:a", b"0|id:c"] and sorted(store.dbs[1]) == [b"0|id:b"]
        # Stored: now read from the partition's database.
        assert admitted(ctx, steps, [(Record(0, 3), "a"), (Record(0, 4), "c"), (Record(0, 5), "d")]) == ["d"]

    asyncio.run(run())


def test_a_store_waits_for_the_outputs_to_be_acked():
    ctx, steps, store = context()

    async def run() -> None:
        store.gate = asyncio.Event()
        store.gate.set()
        admitted(ctx, steps, [(Record(0, 0), "a")])
        acked = asyncio.get_running_loop().create_future()
        storing = asyncio.ensure_future(ctx.store_after(acked, ctx.detach_writes()))
        await asyncio.sleep(0.01)
        assert store.dbs.get(0, {}) == {} and len(ctx.storing) == 1
        acked.set_result({0: 10})
        await storing
        assert list(store.dbs[0]) == [b"0|id:a"] and ctx.storing == []

    asyncio.run(run())


@pytest.fixture(params=["memory", "disk"])
def expiry_folder(request, tmp_path) -> Path | None:
    """Where the expiry of a test's context lives: in memory, or on disk."""
    return None if request.param == "memory" else tmp_path / "expiry"


def test_expired_keys_are_deleted_once_stored_and_at_most_a_few_per_record(expiry_folder):
    ctx, steps, store = context({"op": "deduplicate", "horizon_count": 3}, expiry_folder)

    async def run() -> None:
        store.gate = asyncio.Event()
        admitted(ctx, steps, [(Record(0, o), f"id{o}") for o in range(6)])
        storing = asyncio.ensure_future(ctx.store_after(None, ctx.detach_writes()))
        admitted(ctx, steps, [(Record(0, 6), "id6")])
        # ids 0-2 are more than 3 records behind offset 6, but their batch is still
        # being stored: a delete now would be undone by that store.
        ctx.expire(100)
        assert store.deleted == []
        store.gate.set()
        await storing
        await ctx.store_after(None, ctx.detach_writes())
        admitted(ctx, steps, [(Record(0, 7), "id7")])
        ctx.expire(1)  # a budget: one at most
        assert store.deleted == [], "deleted with the batch's writes, not before"
        await ctx.store_after(None, ctx.detach_writes())
        assert store.deleted == [b"0|id:id0"]
        admitted(ctx, steps, [(Record(0, 8), "id8")])
        ctx.expire(100)  # offsets 0-4 are more than 3 records behind 8
        await ctx.store_after(None, ctx.detach_writes())
        assert store.deleted == [b"0|id:id0", b"0|id:id1", b"0|id:id2", b"0|id:id3", b"0|id:id4"]
        assert sorted(store.dbs[0]) == [b"0|id:id5", b"0|id:id6", b"0|id:id7", b"0|id:id8"]

    asyncio.run(run())


def test_an_expired_id_is_deleted_in_order_with_the_writes_around_it():
    """An expired entry is deleted with its batch's writes (one changelog record batch),
    not through Faust's own producer: a tombstone sent apart could reach the changelog
    after the value of the same key admitted again in the next batch, and a restore
    then forgot that newer entry (docs/transformations.md, known gaps before session
    22). Until the delete is stored, the expired value is read, and is no duplicate."""
    ctx, steps, store = context({"op": "deduplicate", "horizon_count": 2})

    async def run() -> None:
        store.gate = asyncio.Event()
        store.gate.set()
        admitted(ctx, steps, [(Record(0, 0), "a")])
        await ctx.store_after(None, ctx.detach_writes())
        store.gate.clear()
        assert admitted(ctx, steps, [(Record(0, 1), "b"), (Record(0, 3), "c")]) == ["b", "c"]
        ctx.expire(100)  # a (offset 0) is more than 2 records behind 3
        expiring = asyncio.ensure_future(ctx.store_after(None, ctx.detach_writes()))
        await asyncio.sleep(0)
        # Its delete is not stored yet: a is past its horizon, so admitted again.
        assert admitted(ctx, steps, [(Record(0, 4), "a")]) == ["a"]
        readmitted = ctx.detach_writes()
        store.gate.set()
        await expiring  # batches are stored in order (``Batch.finish_later``)
        await ctx.store_after(None, readmitted)
        key = b"0|id:a"
        assert [op for op in store.ops if op[1] == key] == [("put", key), ("delete", key), ("put", key)]
        assert store.dbs[0][key][1] == 4, "the newer entry was lost"
        assert admitted(ctx, steps, [(Record(0, 5), "a")]) == [], "a within its horizon again"

    asyncio.run(run())


def test_no_partition_database_is_held_after_a_batch():
    """Faust closes a revoked partition's RocksDB (and frees its lock) by dropping its
    reference; one held by the pipeline's context kept it open, and reopening the
    partition at a later rebalance crashed the worker ("lock hold by current process",
    found by the chaos verifier, issue 23)."""
    import gc
    import weakref

    ctx, steps, store = context()
    opened: list = []
    original = store.partition_db

    def tracked(partition):
        db = original(partition)
        opened.append(weakref.ref(db))
        return db

    store.partition_db = tracked
    admitted(ctx, steps, [(Record(2, 0), "a"), (Record(3, 0), "b")])
    ctx.release_stores()
    gc.collect()
    assert opened and all(ref() is None for ref in opened)


def test_keys_stored_before_a_restart_expire_and_recent_ones_are_still_refused(expiry_folder):
    """Issue 18: expiry lives in the store. A restarted worker (a new context over the
    same stored entries) rebuilds a partition's expiry queue from the store, so ids
    admitted before the restart are deleted once past the horizon, while recent ids are
    still refused. Before, the queue was only in memory and such ids were never deleted."""
    ctx, steps, store = context({"op": "deduplicate", "horizon_count": 3}, expiry_folder)

    async def first_run() -> None:
        store.gate = asyncio.Event()
        store.gate.set()
        admitted(ctx, steps, [(Record(0, o), f"id{o}") for o in range(3)])
        await ctx.store_after(None, ctx.detach_writes())

    asyncio.run(first_run())
    ctx.expiry.forget()  # the old context's indexes closed, as at a stop
    restarted, steps, _ = context({"op": "deduplicate", "horizon_count": 3}, expiry_folder)
    restarted.store = store
    # id2 (offset 2) is within 3 records of offset 4: a duplicate still.
    assert admitted(restarted, steps, [(Record(0, 4), "id2"), (Record(0, 5), "id5")]) == ["id5"]
    restarted.expire(100)  # offsets 0 and 1 are more than 3 records behind 5
    asyncio.run(restarted.store_after(None, restarted.detach_writes()))
    assert store.deleted == [b"0|id:id0", b"0|id:id1"]
    assert admitted(restarted, steps, [(Record(0, 6), "id5")]) == []  # recent: still refused


def test_the_expiry_queue_holds_no_tracked_container_per_admitted_id():
    """A memory store's expiry queue keeps every stored id for the whole horizon. As a
    tuple per id it filled the collector's young generation: at 5,000 ids/s a young
    collection every 10 s walked 50,000 of them at once, a 3-13 ms stall of the worker
    (docs/performance.md, "Issue 22, session 18"). What the queue holds must not be one
    tracked container per id."""
    import gc

    from tables.store import ExpiryQueue

    n = 5_000
    queue = ExpiryQueue()
    gc.disable()  # a collection would untrack tuples of atoms, and hide them
    try:
        queue.stored({f"0|id:{o}".encode(): (1.0 + o, o) for o in range(n)})
        assert len(queue) == n
        tracked, level = 0, [queue]
        for _ in range(3):
            level = [o for o in gc.get_referents(*level) if gc.is_tracked(o) and not isinstance(o, type)]
            tracked += len(level)
    finally:
        gc.enable()
    assert tracked < 10, f"{tracked} tracked objects held by the expiry queue of {n} ids"


def oldest(queue, n: int = 100) -> list:
    entries = queue.oldest()
    try:
        return list(itertools.islice(entries, n))
    finally:
        entries.close()


def test_the_expiry_queue_is_oldest_first():
    from tables.store import ExpiryQueue

    queue = ExpiryQueue([(1.0, 1, b"a"), (2.0, 2, b"b")])
    queue.stored({b"c": (3.0, 3)})
    assert len(queue) == 3 and oldest(queue) == [(1.0, 1, b"a"), (2.0, 2, b"b"), (3.0, 3, b"c")]
    oldest(queue, 1)
    queue.drop(1)
    assert oldest(queue) == [(2.0, 2, b"b"), (3.0, 3, b"c")]
    queue.drop(2)
    assert len(queue) == 0 and not queue


def test_the_expiry_index_reads_built_and_stored_entries_oldest_first(tmp_path):
    """The entries found at the build are sorted by time (RocksDB keys); those stored
    since are read in store order; the two are read together, the older head first."""
    from tables.store import ExpiryIndex

    index = ExpiryIndex(tmp_path / "0", [(5.0, 5, b"e"), (1.0, 1, b"a"), (3.0, 3, b"c")])
    index.stored({b"b": (2.0, 7), b"d": (4.0, 8)})
    assert len(index) == 5
    assert oldest(index) == [(1.0, 1, b"a"), (2.0, 7, b"b"), (3.0, 3, b"c"), (4.0, 8, b"d"), (5.0, 5, b"e")]
    oldest(index, 2)
    index.drop(2)
    assert oldest(index) == [(3.0, 3, b"c"), (4.0, 8, b"d"), (5.0, 5, b"e")] and len(index) == 3
    oldest(index, 3)
    index.drop(3)
    assert oldest(index) == [] and len(index) == 0
    index.stored({b"f": (6.0, 9)})  # the tail was emptied: it fills anew
    assert oldest(index) == [(6.0, 9, b"f")] and len(index) == 1
    index.close()
    assert not (tmp_path / "0").exists(), "a closed index is deleted: it is built anew"
    # Built again (after an assignment), it holds only what it is given.
    again = ExpiryIndex(tmp_path / "0", [(7.0, 7, b"g")])
    assert oldest(again) == [(7.0, 7, b"g")] and len(again) == 1
    again.close()


def test_the_expiry_index_writes_full_chunks_to_disk_and_deletes_them_once_read(tmp_path, monkeypatch):
    from tables.store import ExpiryIndex

    monkeypatch.setattr(ExpiryIndex, "CHUNK_BYTES", 100)  # ~3 entries a chunk
    index = ExpiryIndex(tmp_path / "0")
    keys = [f"0|id:{i:04}".encode() for i in range(20)]
    for i in range(0, 20, 2):
        index.stored({keys[i]: (float(i), i), keys[i + 1]: (float(i + 1), i + 1)})
    chunks = lambda: [k for k in index.db.keys() if k[:1] == ExpiryIndex.LOGGED]  # noqa: E731
    assert len(chunks()) >= 4 and len(index) == 20
    assert [key for _, _, key in oldest(index)] == keys
    for n in (1, 4, 2, 6):  # dropped across chunk ends
        first = oldest(index)
        index.drop(n)
        assert oldest(index) == first[n:]
    assert len(index) == 7 and [key for _, _, key in oldest(index)] == keys[13:]
    assert len(chunks()) <= 3, "chunks read to their end are deleted"
    oldest(index)
    index.drop(7)
    assert oldest(index) == [] and chunks() == [] and len(index) == 0
    index.close()


def test_a_disk_expiry_holds_at_most_two_chunks_in_memory(tmp_path):
    """Issue 22, session 19: in memory the expiry of a day's ids at 5,000 ids/s took
    ~57 GB per worker. On disk, the index keeps the chunk being filled and the chunk
    being read in memory, however many entries it holds."""
    from tables.store import ExpiryIndex

    index = ExpiryIndex(tmp_path / "0")
    n = 100_000
    for start in range(0, n, 5_000):
        index.stored({f"0|id:{o}".encode(): (1.0 + o, o) for o in range(start, start + 5_000)})
    for _ in range(3):
        oldest(index, 1_000)
        index.drop(1_000)
    assert len(index) == n - 3_000
    assert oldest(index, 1)[0][2] == b"0|id:3000"
    held = len(index._tail) + len(index._loaded[1]) + len(index._taken)
    assert held <= 2 * ExpiryIndex.CHUNK_BYTES, f"{held} bytes held in memory for {n} entries"
    index.close()


def test_an_expiry_index_closed_to_be_kept_reopens_where_it_was(tmp_path, monkeypatch):
    """``close(keep=True)`` writes out the tail and the read position; ``reopen`` goes on
    with the same entries in the same order, across chunk ends, built and stored ones
    alike. An index left open (a crash) or deleted leaves nothing to reopen."""
    from tables.store import ExpiryIndex

    monkeypatch.setattr(ExpiryIndex, "CHUNK_BYTES", 100)  # ~3 entries a chunk
    path = tmp_path / "0"
    index = ExpiryIndex(path, [(float(i), i, f"b{i:02}".encode()) for i in range(0, 40, 4)])
    for i in range(1, 40, 4):
        index.stored({f"s{i:02}".encode(): (float(i), i)})
    oldest(index, 5)
    index.drop(5)  # part of the built entries and of the first chunk
    expected, size = oldest(index), len(index)
    index.close(keep=True)

    again = ExpiryIndex.reopen(path)
    assert again is not None and len(again) == size and oldest(again) == expected
    again.stored({b"s99": (99.0, 99)})
    oldest(again, 3)
    again.drop(3)
    expected = expected[3:] + [(99.0, 99, b"s99")]
    assert oldest(again) == expected
    # Reopened, it is open: a crash now must not leave it to be reopened.
    assert ExpiryIndex.META not in list(again.db.keys())
    again.close(keep=True)
    third = ExpiryIndex.reopen(path)
    assert third is not None and oldest(third, 100) == expected
    third.db.close()  # as a crash leaves it: never closed to be kept
    assert ExpiryIndex.reopen(path) is None
    assert ExpiryIndex.reopen(tmp_path / "never") is None


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.scans = 0

    def scan_partition(self, partition: int, start: bytes = b""):
        self.scans += start == b""  # builds begun
        return super().scan_partition(partition, start)


def test_the_expiry_index_is_kept_across_a_move_unless_its_table_partition_changed(tmp_path):
    """A dedupe expiry index used to be built from the whole table partition at each
    assignment and each start (~1.5 µs an entry: ~10 minutes for a day of ids at
    5,000/s, in one batch). Closed at the move (``forget``), it is reopened unless
    the table partition was written without it meanwhile: by Faust's recovery
    (``restored``, the table's changelog-event callback), or by a batch stored after
    the close. Then it is built again, and entries stored before still expire."""
    from types import SimpleNamespace

    ctx, steps, _ = context({"op": "deduplicate", "horizon_count": 2}, tmp_path / "expiry")
    store = ctx.store = CountingStore()

    async def batch(events: list[tuple[Record, str]]) -> list[str]:
        out = admitted(ctx, steps, events)
        for p in {e.partition for e, _ in events}:
            ctx.enter_partition(Record(p, 0))
            ctx.expire(100)
        await ctx.store_after(None, ctx.detach_writes())
        return out

    async def run() -> None:
        store.gate = asyncio.Event()
        store.gate.set()
        await batch([(Record(0, 0), "a"), (Record(1, 0), "b")])
        assert store.scans == 2 and ctx.expiry.built == 2
        ctx.expiry.forget()  # a rebalance: partition 0 comes back unchanged
        await batch([(Record(0, 1), "c"), (Record(0, 2), "d")])
        assert store.scans == 2 and ctx.expiry.reopened == 1, "rebuilt although nothing changed"
        await batch([(Record(0, 5), "e")])  # a (stored before the move), c, d: > 2 behind
        assert store.deleted == [b"0|id:a", b"0|id:c", b"0|id:d"]

        # Recovery writes partition 1 (another owner's changes) while it is away.
        ctx.expiry.forget()
        store.dbs[1][b"0|id:x"] = [1.0, 3]
        await ctx.expiry.restored(SimpleNamespace(message=SimpleNamespace(partition=1)))
        await batch([(Record(1, 9), "f")])
        assert store.scans == 3, "not rebuilt after the table partition was restored into"
        assert sorted(store.deleted)[1:4] == [b"0|id:b", b"0|id:c", b"0|id:d"] and b"0|id:x" in store.deleted

        # A batch stored after the close (it was still finishing at the move).
        admitted(ctx, steps, [(Record(0, 6), "g")])
        late = ctx.detach_writes()
        ctx.expiry.forget()
        await ctx.store_after(None, late)
        await batch([(Record(0, 10), "h")])
        assert store.scans == 4, "not rebuilt after a batch was stored without the index"
        assert b"0|id:g" in store.deleted, "an entry stored after the close never expired"

    asyncio.run(run())


class ReadCountingStore(FakeStore):
    """Counts the table keys a build reads."""

    def __init__(self) -> None:
        super().__init__()
        self.keys_read = 0

    def scan_partition(self, partition: int, start: bytes = b""):
        for item in super().scan_partition(partition, start):
            self.keys_read += 1
            yield item


def test_an_expiry_index_is_built_a_few_keys_a_batch_and_across_a_move(tmp_path, monkeypatch):
    """Built in one batch, the index of a day of ids at 5,000/s (~430 million) held the
    event loop and the batch's transaction for ~8 minutes, past the transaction
    timeout: under exactly_once the worker was fenced, restarted, and built it again.
    Now each batch reads ``max(BUILD_STEP, at_most)`` table keys. Nothing expires until
    the index is built; entries stored meanwhile, before or after the build's
    position, expire once it is; a move keeps the build's position."""
    from tables.store import Expiry

    monkeypatch.setattr(Expiry, "BUILD_STEP", 4)
    ctx, steps, _ = context({"op": "deduplicate", "horizon_count": 3}, tmp_path / "expiry")
    store = ctx.store = ReadCountingStore()
    store.gate = asyncio.Event()
    store.gate.set()
    # What a worker before a crash stored in partition 0: ids k00..k19 at offsets 0..19.
    store.dbs[0] = {f"0|id:k{o:02}".encode(): [1.0, o] for o in range(20)}

    def batch(offset: int, event_id: str, at_most: int = 2) -> None:
        admitted(ctx, steps, [(Record(0, offset), event_id)])
        ctx.expire(at_most)
        asyncio.run(ctx.store_after(None, ctx.detach_writes()))

    def index():
        return ctx.expiry.lanes[0].expiry.queues[0]

    # Each step reads one key more than it takes: the one the next step begins at.
    batch(100, "a0")  # k00-k03; a0 sorts before the build's position
    assert store.keys_read == 5 and store.deleted == [], "a batch read more than one step, or expired mid-build"
    assert ctx.expiry.describe()["indexes_building"] == 1
    batch(101, "z1")  # k04-k07; z1 sorts after the position
    batch(102, "k05")  # k08-k11; k05 again: read by the last step, stored anew
    assert store.keys_read == 15 and store.deleted == []
    ctx.expiry.forget()  # a move: partition 0 comes back unchanged
    batch(103, "a1", at_most=6)  # k12-k17: a step of at_most keys, on from where it was
    assert store.keys_read == 22 and store.deleted == []
    assert ctx.expiry.reopened == 1 and ctx.expiry.built == 1, "the move began the build again"
    batch(104, "a2")  # k18, k19, z1: built
    assert store.keys_read == 25 and ctx.expiry.describe()["indexes_building"] == 0
    # Built: everything more than 3 records behind expires, whenever it was stored.
    for n in range(12):
        batch(200 + n, f"late{n}", at_most=100)
    deleted = set(store.deleted)
    expected = {f"0|id:k{o:02}".encode() for o in range(20)} | {b"0|id:a0", b"0|id:z1", b"0|id:a1", b"0|id:a2"}
    assert expected <= deleted, sorted(expected - deleted)
    assert store.dbs[0].get(b"0|id:late11") is not None and store.keys_read == 25


def test_an_expiry_index_is_built_in_steps_over_rocksdb_and_begins_again_after_a_restore(tmp_path, monkeypatch):
    """The steps read the table's RocksDB from where the last one stopped
    (``items(from_key=...)``, raw mode as Faust opens it), with batches stored between
    them; a restore into the partition mid-build discards the index, and the next build
    begins again. Kept across a move, a half-built index is not one a version without
    steps would take for built (its META lacks ``rebuilt``)."""
    from types import SimpleNamespace

    import orjson
    from rocksdict import Options, Rdict

    from agents.pipeline import _seen_at
    from tables.store import Expiry, ExpiryIndex, PartitionStore

    monkeypatch.setattr(Expiry, "BUILD_STEP", 3)
    db = Rdict(str(tmp_path / "table"), Options(raw_mode=True))
    for o in range(10):
        db[f"0|id:k{o:02}".encode()] = orjson.dumps([1.0, o])
    db[b"__faust\x00offset__"] = b"42"  # Faust's own key: no entry
    store = PartitionStore(SimpleNamespace(data=SimpleNamespace(_db_for_partition=lambda p: db)))
    expiry = Expiry(_seen_at, lambda: tmp_path / "expiry")

    def build(writes: bool) -> int:
        steps = 1
        while not expiry.build_some(0, store):
            steps += 1
            assert steps < 50, "the build does not move on"
            if writes:  # a batch stored between two steps
                key = f"0|id:n{steps}".encode()
                db[key] = orjson.dumps([2.0, 100 + steps])
                expiry.stored(0, {key: (2.0, 100 + steps)})
        return steps

    def indexed() -> set[bytes]:
        return {key for _, _, key in expiry.queues[0].oldest()}

    def table_keys() -> set[bytes]:
        return {key for key in db.keys() if key.startswith(b"0|id:")}

    expiry.ensure(0, store)
    assert build(writes=True) >= 4 and indexed() == table_keys()

    # Half built, closed at a move: kept, but not under the key an older version reads.
    expiry.discard_all()
    expiry.ensure(0, store)
    expiry.build_some(0, store)
    expiry.forget()
    reopened = ExpiryIndex.reopen(tmp_path / "expiry" / "0")
    assert reopened is not None and reopened.building_from is not None
    reopened.close(keep=True)
    check = Rdict(str(tmp_path / "expiry" / "0"), Options(raw_mode=True))
    meta = orjson.loads(check[ExpiryIndex.META])
    check.close()
    assert "rebuilt" not in meta and meta["building_from"]

    # A restore into the partition mid-build: built again from the first key.
    expiry.ensure(0, store)
    expiry.build_some(0, store)
    asyncio.run(expiry.restored(SimpleNamespace(message=SimpleNamespace(partition=0))))
    db[b"0|id:r"] = orjson.dumps([3.0, 300])  # what the restore wrote
    built = expiry.built
    expiry.ensure(0, store)
    assert expiry.built == built + 1
    build(writes=False)
    assert indexed() == table_keys()
    expiry.forget()
    db.close()


def test_every_dedupe_steps_index_is_built_alongside_the_others(tmp_path, monkeypatch):
    """One index per dedupe step: a step whose index is still being built holds back
    neither the other steps' builds nor their expiry."""
    from tables.store import Expiry

    monkeypatch.setattr(Expiry, "BUILD_STEP", 4)
    (spec,) = parse_pipelines([{"name": "p", "source": "in", "sink": "out", "steps": [
        {"op": "deduplicate", "horizon_count": 2},
        {"op": "deduplicate", "fields": ["order_id"], "horizon_count": 2}]}])
    ctx = LiveContext(spec, table=None, expiry_folder=lambda: tmp_path / "expiry")
    store = ctx.store = FakeStore()
    store.gate = asyncio.Event()
    store.gate.set()
    # The first step's ids fill the first keys of the table; the second step's come after.
    store.dbs[0] = {f"0|id:k{o:02}".encode(): [1.0, o] for o in range(12)}
    store.dbs[0][b"1|x"] = [1.0, 0]
    ctx.begin_batch()
    ctx.enter_partition(Record(0, 50))
    ctx.at_offset(50)
    ctx.expire(1)
    assert ctx.expiry.describe()["indexes_building"] == 2
    for offset in range(51, 70):
        ctx.begin_batch()
        ctx.enter_partition(Record(0, offset))
        ctx.at_offset(offset)
        ctx.expire(3)
        asyncio.run(ctx.store_after(None, ctx.detach_writes()))
    assert ctx.expiry.describe()["indexes_building"] == 0
    assert b"1|x" in store.deleted, "the second step's entry never expired"


@pytest.mark.parametrize("how", ["outputs not acked", "store cut short", "batch cut short", "unclean stop"])
def test_expired_entries_never_stored_make_the_indexes_be_built_again(tmp_path, how):
    """``expire`` takes expired entries out of the index at once, and their deletes are
    written with the batch (``store_after``). When that write never happens (the
    outputs' acks fail, a store is cancelled at a stop, a batch ends half-way, an
    unclean stop), a kept index would lack entries still in the table, which would then
    never expire. So the indexes are built again at the next start (found by a review:
    an index kept after a failed ack; the entry outlived 1,000 offsets of a count
    horizon of 2)."""
    folder = tmp_path / "expiry"
    ctx, steps, store = context({"op": "deduplicate", "horizon_count": 2}, folder)

    async def first_run() -> None:
        store.gate = asyncio.Event()
        store.gate.set()
        admitted(ctx, steps, [(Record(0, 0), "a")])
        ctx.expire(100)
        await ctx.store_after(None, ctx.detach_writes())
        admitted(ctx, steps, [(Record(0, 5), "b")])
        ctx.expire(100)  # a left the index; its delete is in this batch's writes
        if how == "batch cut short":
            return  # never detached: the stop finds it in the cache
        layer = ctx.detach_writes()
        if how == "outputs not acked":
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(RuntimeError("sink unreachable"))
            with pytest.raises(RuntimeError):
                await ctx.store_after(failed, layer)
        elif how == "store cut short":
            store.gate.clear()
            storing = asyncio.ensure_future(ctx.store_after(None, layer))
            await asyncio.sleep(0)
            storing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await storing
        else:
            await ctx.store_after(None, layer)

    asyncio.run(first_run())
    ctx.cache.close_indexes(keep=how != "unclean stop")  # the stop (keep_expiry_indexes)
    if how != "unclean stop":
        assert b"0|id:a" in store.dbs[0], "the delete was never stored"
    restarted, steps, _ = context({"op": "deduplicate", "horizon_count": 2}, folder)
    restarted.store = store

    async def second_run() -> None:
        store.gate.set()
        admitted(restarted, steps, [(Record(0, 10), "c")])
        restarted.expire(100)
        await restarted.store_after(None, restarted.detach_writes())

    asyncio.run(second_run())
    assert restarted.expiry.built == 1 and restarted.expiry.reopened == 0
    assert b"0|id:a" not in store.dbs[0], "an expired entry outlived its index"


def timed_batch(ctx: LiveContext, steps: list, records: list[tuple[int, str, float]]) -> list[str]:
    """One whole batch of partition 0: ``(offset, event_id, ts)`` records through the
    steps (``n`` = the offset, for a second dedupe step), then its expiry and its store;
    returns the ids admitted."""
    ctx.begin_batch()
    out = []
    for offset, event_id, ts in records:
        if ctx.partition != 0:
            ctx.enter_partition(Record(0, offset))
        ctx.at_offset(offset)
        if run_record(steps, {"event_id": event_id, "ts": ts, "n": offset}, ctx).record is not None:
            out.append(event_id)
    ctx.expire(100)
    asyncio.run(ctx.store_after(None, ctx.detach_writes()))
    return out


def test_an_event_time_horizon_expires_by_the_partitions_event_time_not_the_clock():
    """With ``time_field`` an entry's time is its record's event time, and a duplicate is
    judged by event time. Expiry compared that time with the wall clock, so a backfill
    of last week's events (a day's horizon) deleted every entry at the next batch, and
    duplicates a few records apart were admitted. It now compares with the partition's
    event time: the latest event time it admitted."""
    ctx, steps, store = context({"op": "deduplicate", "horizon_seconds": 60, "time_field": "ts"})
    week_ago = time.time() - 7 * 86400

    def batch(records: list[tuple[int, str, float]]) -> list[str]:
        return timed_batch(ctx, steps, records)

    store.gate = asyncio.Event()
    store.gate.set()
    assert batch([(0, "a", week_ago), (1, "b", week_ago + 10)]) == ["a", "b"]
    assert batch([(2, "c", week_ago + 20)]) == ["c"]
    assert store.deleted == [], "deleted by the wall clock: a week is past a 60 s horizon"
    assert batch([(3, "a", week_ago + 30)]) == [], "a duplicate 30 s of event time apart"
    # 70 s of event time later, a is past its horizon: deleted, then admitted again.
    assert batch([(4, "d", week_ago + 70)]) == ["d"]
    assert store.deleted == [b"0|id:a"]
    assert batch([(5, "a", week_ago + 75)]) == ["a"]


def test_an_event_time_from_a_clock_far_ahead_expires_nothing_early():
    """The event-time clock of an expiry never runs ahead of the wall clock: one record
    from a producer a year ahead made every entry of the partition expire, and retries
    of events within their horizon were admitted again (found by a review). A second
    dedupe step without ``time_field`` (wall-clock times) does not move it either."""
    (spec,) = parse_pipelines([{"name": "p", "source": "in", "sink": "out", "steps": [
        {"op": "deduplicate", "horizon_seconds": 3600, "time_field": "ts"},
        {"op": "deduplicate", "fields": ["n"], "horizon_seconds": 3600}]}])
    ctx = LiveContext(spec, table=None)
    store = ctx.store = FakeStore()
    steps = spec.steps
    now = time.time()

    def batch(records: list[tuple[int, str, float]]) -> list[str]:
        return timed_batch(ctx, steps, records)

    store.gate = asyncio.Event()
    store.gate.set()
    week_ago = now - 7 * 86400
    assert batch([(0, "old", week_ago), (1, "a", now - 60), (2, "b", now - 30)]) == ["old", "a", "b"]
    assert batch([(3, "future", now + 365 * 86400)]) == ["future"]
    assert batch([(4, "c", now)]) == ["c"]
    assert b"0|id:old" in store.deleted, "a week old by the wall clock: past its horizon"
    assert not {b"0|id:a", b"0|id:b"} & set(store.deleted), "expired by a clock a year ahead"
    assert batch([(5, "a", now - 59), (6, "b", now - 29)]) == [], "retries within the horizon admitted"
    # The second step's times (the wall clock) never become the first step's clock.
    clock = ctx.expiry.lane_of[b"0|"].horizon.clock
    del clock[0]  # as after a restart
    assert batch([(7, "d", week_ago + 100)]) == ["d"]
    assert clock[0] == pytest.approx(week_ago + 100, abs=0.001)
    assert ctx.expiry.lane_of[b"1|"].horizon.clock is None


def run_batch(ctx: LiveContext, steps: list, records: list[dict], first_offset: int,
              at_most: int = 10_000) -> list[int]:
    """One whole batch of partition 0 (offsets from ``first_offset``), then its expiry
    and its store; returns the offsets of the records admitted."""
    ctx.begin_batch()
    out = []
    for offset, record in enumerate(records, first_offset):
        if ctx.partition != 0:
            ctx.enter_partition(Record(0, offset))
        ctx.at_offset(offset)
        if run_record(steps, record, ctx).record is not None:
            out.append(offset)
    ctx.expire(at_most)
    asyncio.run(ctx.store_after(None, ctx.detach_writes()))
    return out


def two_step_context(steps: list[dict], folder: Path | None = None,
                     store: FakeStore | None = None) -> tuple[LiveContext, list, FakeStore]:
    """A live context of a pipeline of ``steps`` over ``store`` (a new one by default),
    its expiry on disk under ``folder`` when given."""
    (spec,) = parse_pipelines([{"name": "p", "source": "in", "sink": "out", "steps": steps}])
    ctx = LiveContext(spec, table=None, expiry_folder=None if folder is None else lambda: folder)
    if store is None:
        store = FakeStore()
        store.gate = asyncio.Event()
        store.gate.set()
    ctx.store = store
    return ctx, spec.steps, store


def test_each_dedupe_step_expires_its_entries_by_its_own_horizon(expiry_folder):
    """A second dedupe step with a longer horizon keeps its entries that long: the
    expiry followed the first step's horizon for all of them, and the second step then
    admitted a repeat within its own horizon."""
    ctx, steps, store = two_step_context([{"op": "deduplicate", "horizon_count": 2},
                                          {"op": "deduplicate", "fields": ["u"], "horizon_count": 100}],
                                         expiry_folder)

    def batch(first: int, *pairs: tuple[str, str]) -> list[str]:
        admitted = run_batch(ctx, steps, [{"event_id": e, "u": u} for e, u in pairs], first)
        return [pairs[o - first][0] for o in admitted]

    assert batch(0, ("a", "x"), ("b", "y"), ("c", "z"), ("d", "w")) == ["a", "b", "c", "d"]
    assert batch(4, ("e", "v")) == ["e"]
    assert b"0|id:a" in store.deleted, "past the first step's count horizon of 2"
    assert b'1|f:["x"]' not in store.deleted, "expired by the first step's horizon"
    assert batch(5, ("f", "x")) == [], "the second step admitted a repeat within its horizon"
    assert batch(100, ("g", "x")) == [], "100 records after x: still within its horizon"
    assert b'1|f:["x"]' not in store.deleted
    assert batch(101, ("h", "t")) == ["h"]
    assert b'1|f:["x"]' in store.deleted, "past the second step's own horizon"
    assert batch(102, ("i", "x")) == ["i"]


def test_a_longer_horizon_or_a_stopped_clock_holds_back_no_other_steps_entries(expiry_folder):
    """Each step's entries have an index of their own: the first step's entries (a
    count horizon of 10) expire on time behind a second step's entry of an hour, or of
    an event-time step whose clock stopped (no record reaches it). One index for all
    kept 999 of them (a review's script)."""
    for n, second in enumerate(({"op": "deduplicate", "fields": ["u"], "horizon_seconds": 3600},
                                {"op": "deduplicate", "fields": ["u"], "horizon_seconds": 60, "time_field": "ts"})):
        folder = None if expiry_folder is None else expiry_folder / str(n)
        ctx, steps, store = two_step_context([{"op": "deduplicate", "horizon_count": 10},
                                              {"op": "filter", "where": "n == 0"}, second], folder)
        now = time.time()
        for b in range(100):
            run_batch(ctx, steps, [{"event_id": f"e{b * 10 + i}", "n": b * 10 + i, "u": "x", "ts": now}
                                   for i in range(10)], b * 10)
        kept = [key for key in store.dbs[0] if key.startswith(b"0|")]
        assert len(kept) <= 30, f"{len(kept)} entries of the first step kept (count horizon 10)"
        assert b'2|f:["x"]' in store.dbs[0]


def test_entries_of_a_step_no_longer_configured_expire_by_the_first_steps_horizon():
    """The pipeline's steps changed: entries of a prefix no dedupe step has now are
    built into the first step's index and expire by its horizon (nothing else would
    ever delete them)."""
    ctx, steps, store = two_step_context([{"op": "deduplicate", "horizon_count": 2}])
    store.dbs[0] = {b"5|id:old": [time.time() - 10, 0], b"0|id:kept": [time.time(), 50]}
    assert run_batch(ctx, steps, [{"event_id": "a"}], 51) == [51]
    assert b"5|id:old" in store.deleted and b"0|id:kept" not in store.deleted


def test_an_index_kept_from_before_the_lanes_leaves_the_other_steps_entries_alone(tmp_path):
    """A two-step pipeline's index kept from before each step had its own (one index of
    the whole partition, at the first step's place) is reopened for the first step:
    the second step's entries in it are passed over, not deleted by the first step's
    horizon; the second step's own index, built from the table, has them."""
    from tables.store import ExpiryIndex

    now = time.time()
    table = {b"0|id:a": [now - 100, 0], b'1|f:["x"]': [now - 100, 0], b"0|id:b": [now - 50, 1]}
    legacy = ExpiryIndex(tmp_path / "0", sorted((v[0], v[1], k) for k, v in table.items()))
    legacy.close(keep=True)
    ctx, steps, store = two_step_context([{"op": "deduplicate", "horizon_seconds": 10},
                                          {"op": "deduplicate", "fields": ["u"], "horizon_seconds": 3600}],
                                         tmp_path)
    store.dbs[0] = dict(table)
    assert run_batch(ctx, steps, [{"event_id": "c", "u": "y"}], 2) == [2]
    assert ctx.expiry.reopened == 1 and ctx.expiry.built == 1  # the first reopened, the second built
    assert sorted(store.deleted) == [b"0|id:a", b"0|id:b"], "the second step's entry deleted by the first's horizon"
    assert run_batch(ctx, steps, [{"event_id": "d", "u": "x"}], 3) == [], "x is still within the second step's hour"


def test_indexes_kept_for_other_dedupe_steps_are_built_again_when_the_steps_changed(tmp_path):
    """Across a clean restart the pipeline's dedupe steps change: the indexes kept are
    not reopened (the first lane's lacked a removed step's entries, which it owns now:
    they were never deleted), but built again from the table (a review's script)."""
    two = [{"op": "deduplicate", "horizon_count": 2}, {"op": "deduplicate", "fields": ["u"], "horizon_count": 2}]
    ctx, steps, store = two_step_context(two, tmp_path)
    run_batch(ctx, steps, [{"event_id": "a", "u": "x"}], 0)
    ctx.cache.close_indexes(keep=True)  # a clean stop
    ctx, steps, store = two_step_context(two[:1], tmp_path, store)  # the second step removed
    for offset in range(1, 20):
        run_batch(ctx, steps, [{"event_id": f"e{offset}"}], offset)
    assert ctx.expiry.reopened == 0 and ctx.expiry.built == 1
    assert not [key for key in store.dbs[0] if key.startswith(b"1|")], "the removed step's entries never expire"
    ctx.cache.close_indexes(keep=True)
    ctx, steps, store = two_step_context(two[:1], tmp_path, store)  # the same steps: reopened
    run_batch(ctx, steps, [{"event_id": "z"}], 20)
    assert ctx.expiry.reopened == 1 and ctx.expiry.built == 0
    # Lanes of an unknown set of steps (no ``lanes`` file): built again too.
    ctx.cache.close_indexes(keep=True)
    ctx, steps, store = two_step_context(two, tmp_path, store)
    run_batch(ctx, steps, [{"event_id": "y", "u": "w"}], 21)
    ctx.cache.close_indexes(keep=True)
    (tmp_path / "lanes").unlink()
    ctx, steps, store = two_step_context(two[:1], tmp_path, store)
    for offset in range(22, 30):
        run_batch(ctx, steps, [{"event_id": f"e{offset}"}], offset)
    assert ctx.expiry.reopened == 0 and ctx.expiry.built == 1
    assert not [key for key in store.dbs[0] if key.startswith(b"1|")], "the removed step's entries never expire"


def test_a_lane_with_nothing_to_spend_keeps_its_index(tmp_path):
    """The batch's expiry budget spent by the first step's lane: the second lane's
    index kept by a clean stop is still opened, not discarded by the batch's store and
    built again (a review's script: a full build, minutes for a day of ids)."""
    two = [{"op": "deduplicate", "horizon_seconds": 1},
           {"op": "deduplicate", "fields": ["u"], "horizon_seconds": 3600}]
    ctx, steps, store = two_step_context(two, tmp_path)
    run_batch(ctx, steps, [{"event_id": f"a{i}", "u": f"x{i}"} for i in range(50)], 0)
    time.sleep(1.2)  # the first step's 50 entries are past its horizon now
    ctx.cache.close_indexes(keep=True)
    ctx, steps, store = two_step_context(two, tmp_path, store)
    run_batch(ctx, steps, [{"event_id": "b", "u": "y"}], 100, at_most=8)
    run_batch(ctx, steps, [{"event_id": f"c{i}", "u": f"z{i}"} for i in range(10)], 101)
    assert [lane.expiry.built for lane in ctx.expiry.lanes] == [0, 0]
    assert [lane.expiry.reopened for lane in ctx.expiry.lanes] == [1, 1]
