"""The at_least_once commit as a snapshot (app/commit.py ``CommitProtocol.begin_commit``,
app/transport.py ``FastConsumer._commit_snapshot``; docs/delivery.md, Z), no broker.

What must hold: batches run while a commit writes its state (they no longer wait for the
changelog's round trip); what they change lands in the *next* commit, not in the one in
flight (its values are encoded when it takes them); the offsets a commit commits are
those acked before its snapshot, committed only after the state of those batches is
written, and not at all when that write fails; a value being written stays cached (a
read meanwhile must not fall back to a store that does not hold it yet); and under
exactly_once the commit is unchanged (the transaction being committed is the one a
batch would send into): the window and pattern exactly_once kill tests cover it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import orjson
import pytest
from faust.types import TP

from app.commit import CommitProtocol, Emitter, MemoryEmitter
from app.transport import FastConsumer, commit_guard
from tables.patterns import StateCache
from tables.store import CacheSnapshot, MemoryStore, WriteBackCache

TP0 = TP("events", 0)


def value_of(store: MemoryStore, key: bytes):
    raw = store.data.get(0, {}).get(key)
    return None if raw is None else orjson.loads(raw)


class Sensors:
    def on_commit_initiated(self, consumer):
        return None

    def on_commit_completed(self, consumer, state):
        pass


class App:
    in_transaction = False
    consumer_generation_id = 1
    sensors = Sensors()


class Consumer:
    """Just what ``FastConsumer.commit`` uses; ``_commit_offsets`` records what it was
    given and what the store held at that moment."""

    commit = FastConsumer.commit
    _commit_guarded = FastConsumer._commit_guarded
    _commit_snapshot = FastConsumer._commit_snapshot
    _filter_tps_with_pending_acks = FastConsumer._filter_tps_with_pending_acks
    _filter_committable_offsets = FastConsumer._filter_committable_offsets
    _should_commit = FastConsumer._should_commit
    _new_offset = FastConsumer._new_offset
    ack_spans = FastConsumer.ack_spans

    def __init__(self, store: MemoryStore) -> None:
        self.app = App()
        self.store = store
        self._broken_section = None
        self._committed_offset: dict = defaultdict(lambda: None)
        self._acked: dict = defaultdict(list)
        self._acked_index: dict = defaultdict(set)
        self._batch_next: dict = {}
        self._n_acked = 0
        self.log = logging.getLogger("test")
        #: (offsets, the store's value of b"a" then) per offset commit
        self.commits: list[tuple[dict, object]] = []

    async def _handle_attached(self, offsets) -> None:
        pass

    async def _commit_offsets(self, offsets, start_new_transaction: bool = True) -> bool:
        self.commits.append((dict(offsets), value_of(self.store, b"a")))
        self._committed_offset.update(offsets)
        return True


@pytest.fixture
def worker(monkeypatch):
    """A consumer, the commit protocol hooked into its commits, and one cache."""
    store = MemoryStore()
    protocol = CommitProtocol(MemoryEmitter(), defer=True, guard=commit_guard)
    cache = protocol.register(WriteBackCache(store))
    monkeypatch.setattr(commit_guard, "before_commit", [])
    monkeypatch.setattr(commit_guard, "session_ok_at", None)
    monkeypatch.setattr(commit_guard, "_idle", None)
    monkeypatch.setattr(commit_guard, "_open", None)
    monkeypatch.setattr(commit_guard, "_one_commit", None)
    protocol.arm()
    return Consumer(store), protocol, cache, store


async def batch(consumer: Consumer, cache: WriteBackCache, first: int, last: int, value: dict) -> None:
    """One batch: changes key ``a`` in place (as the agents' hot loops do), acks."""
    async with commit_guard.processing():
        cached = cache.get(b"a", lambda: {})
        cached.clear()
        cached.update(value)
        cache.put(b"a", cached, 0)
        consumer.ack_spans({TP0: (first, last)})


def test_a_batch_runs_while_the_commit_writes_and_its_changes_go_to_the_next_commit(worker):
    """Without the snapshot the second batch could not start before the commit ended
    (``commit_guard.committing`` held through the write); with a snapshot taken *after*
    it (values encoded late), the first commit would write its value under offset 10."""
    consumer, _protocol, cache, store = worker

    async def main():
        await batch(consumer, cache, 0, 9, {"n": 1})
        store.hold = asyncio.Event()  # the changelog's acks are slow
        committing = asyncio.ensure_future(consumer.commit())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not committing.done() and value_of(store, b"a") is None  # the write is in flight
        await asyncio.wait_for(batch(consumer, cache, 10, 19, {"n": 2}), 1)  # not held back
        assert cache.dirty_count == 1
        store.hold.set()
        assert await committing is True
        # The first commit: offset 10 (batch 1), committed after batch 1's state was written.
        assert consumer.commits == [({TP0: 10}, {"n": 1})]
        assert value_of(store, b"a") == {"n": 1}  # not batch 2's value, changed in place meanwhile
        assert await consumer.commit() is True
        assert consumer.commits[1] == ({TP0: 20}, {"n": 2})

    asyncio.run(main())


def test_offsets_are_not_committed_when_the_snapshot_write_fails(worker):
    """The offsets taken with the snapshot commit only once its state is written; a
    failed write leaves the values unwritten (the next commit writes them) and commits
    nothing."""
    consumer, _protocol, cache, store = worker

    async def main():
        await batch(consumer, cache, 0, 9, {"n": 1})
        store.fail = True
        with pytest.raises(RuntimeError, match="unreachable"):
            await consumer.commit()
        assert consumer.commits == [] and cache.dirty_count == 1
        store.fail = False
        await batch(consumer, cache, 10, 19, {"n": 2})
        assert await consumer.commit() is True
        assert consumer.commits == [({TP0: 20}, {"n": 2})]

    asyncio.run(main())


def test_outputs_sent_before_the_snapshot_are_acknowledged_before_its_state_is_written():
    """The state that drops a closed window is never written before the result that
    reports it: the snapshot's rest waits for the sends made before it, not for later
    ones."""
    store = MemoryStore()
    emitter = Emitter()
    protocol = CommitProtocol(emitter, defer=True)
    cache = protocol.register(WriteBackCache(store))
    order: list[str] = []

    async def main():
        before, after = asyncio.Event(), asyncio.Event()

        async def send(tag, gate):
            await gate.wait()
            order.append(tag)

        emitter.sending.append(asyncio.ensure_future(send("result", before)))
        cache.put(b"a", {"n": 1}, 0)
        rest = await protocol.begin_commit()
        emitter.sending.append(asyncio.ensure_future(send("later result", after)))  # a batch meanwhile
        writing = asyncio.ensure_future(rest)
        await asyncio.sleep(0.01)
        assert value_of(store, b"a") is None  # waits for the result
        before.set()
        await writing
        order.append("state")
        assert order == ["result", "state"] and value_of(store, b"a") == {"n": 1}
        after.set()
        await emitter.flush()

    asyncio.run(main())


def test_a_state_being_written_stays_cached():
    """The pattern cache starts over when full, keeping what is unwritten; a state
    taken by a commit in flight is no longer dirty but not in the store yet, so it is
    kept too until the write is done (else a batch meanwhile read the store's older
    state, or none)."""
    store = MemoryStore()
    protocol = CommitProtocol(MemoryEmitter(), defer=True)
    cache = protocol.register(StateCache(2, store))

    async def main():
        cache.put_dirty(0, "a", {"n": 1})
        rest = await protocol.begin_commit()
        store.hold = asyncio.Event()
        writing = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        for key in ("b", "c", "d"):  # batches meanwhile fill the cache past its size
            cache.put_dirty(0, key, {"n": 1})
        assert cache.entries[(0, "a")] == {"n": 1} and value_of(store, b'"a"') is None
        store.hold.set()
        await writing
        assert value_of(store, b'"a"') == {"n": 1}
        for key in ("e", "f", "g"):
            cache.put(0, key, {"n": 1})
        assert (0, "a") not in cache.entries  # an ordinary clean entry once written

    asyncio.run(main())


def test_a_large_snapshot_is_encoded_between_batches_and_waits_for_their_outputs(worker, monkeypatch):
    """Past ``ENCODE_PART`` values a snapshot is encoded a part at a time, each part
    between two batches (no batch waits for the encoding of every changed key). A batch
    that runs between two parts may change a value encoded after it, in place: that
    value is written with the batch's change (once: no longer dirty), so the write
    waits for the batch's outputs too (a window's result before the state that dropped
    the window); the offsets committed are still those taken with the snapshot."""
    consumer, _protocol, _cache, store = worker
    emitter = Emitter()
    protocol = CommitProtocol(emitter, defer=True, guard=commit_guard)
    monkeypatch.setattr(protocol, "ENCODE_PART", 1)
    cache = protocol.register(WriteBackCache(store))
    monkeypatch.setattr(commit_guard, "before_commit", [protocol.begin_commit])
    result_sent = asyncio.Event()

    async def send_result():
        await result_sent.wait()

    async def main():
        async def next_batch():  # waits for the snapshot; runs between its parts
            async with commit_guard.processing():
                assert cache.dirty_count == 0  # after the snapshot took a and b
                cache.get(b"b", dict)["n"] = 2  # b's window closes
                cache.put(b"b", cache.get(b"b", dict), 0)
                emitter.sending.append(asyncio.ensure_future(send_result()))
                consumer.ack_spans({TP0: (10, 19)})

        first_batch_ends = asyncio.Event()

        async def first_batch():  # the commit starts while it runs
            async with commit_guard.processing():
                cache.put(b"a", {"n": 1}, 0)
                cache.put(b"b", {"n": 1}, 0)
                consumer.ack_spans({TP0: (0, 9)})
                await first_batch_ends.wait()

        first = asyncio.ensure_future(first_batch())
        await asyncio.sleep(0)
        committing = asyncio.ensure_future(consumer.commit())
        await asyncio.sleep(0)
        batch_done = asyncio.ensure_future(next_batch())
        await asyncio.sleep(0)  # waits for the commit's section
        first_batch_ends.set()
        await first
        for _ in range(20):
            await asyncio.sleep(0)
        assert batch_done.done()
        assert not committing.done() and value_of(store, b"b") is None  # waits for the result
        result_sent.set()
        assert await committing is True
        assert consumer.commits == [({TP0: 10}, {"n": 1})]
        assert value_of(store, b"b") == {"n": 2} and cache.dirty_count == 0  # written once
        await emitter.flush()

    asyncio.run(main())


def test_records_that_arrive_during_a_large_snapshot_run_between_its_parts(worker, monkeypatch):
    """Between two parts of a snapshot's encoding the commit gives the event loop a turn,
    so records fetched meanwhile reach their batch (a fetch takes several loop turns
    before its batch asks for a processing section) and that batch runs between two
    parts. Without the turn, a commit with no batch already waiting for its section
    encoded every part in one go: the loop (fetches, batches, the web server) stalled
    for the whole encoding, ~100 ms at each commit of the pattern benchmark (issue 22;
    docs/delivery.md, AE)."""
    consumer, _protocol, _cache, store = worker
    protocol = CommitProtocol(MemoryEmitter(), defer=True, guard=commit_guard)
    monkeypatch.setattr(protocol, "ENCODE_PART", 1)
    cache = protocol.register(WriteBackCache(store))
    monkeypatch.setattr(commit_guard, "before_commit", [protocol.begin_commit])
    parts: list[int] = []
    encode_some = CacheSnapshot.encode_some

    def counted(self, n):
        parts.append(n)
        return encode_some(self, n)

    monkeypatch.setattr(CacheSnapshot, "encode_some", counted)

    async def main():
        for i in range(10):
            cache.put(f"k{i}".encode(), {"n": i}, 0)
        consumer.ack_spans({TP0: (0, 9)})
        ran_after: list[int] = []

        async def fetch_then_batch():
            for _ in range(3):  # the fetch response on its way to the batch
                await asyncio.sleep(0)
            async with commit_guard.processing():
                ran_after.append(len(parts))

        committing = asyncio.ensure_future(consumer.commit())
        await asyncio.sleep(0)  # the commit begins: snapshot and first part
        batch = asyncio.ensure_future(fetch_then_batch())
        assert await committing is True
        await batch
        assert ran_after and ran_after[0] < 10, f"the batch ran after part {ran_after}"
        assert consumer.commits == [({TP0: 10}, None)]
        assert all(value_of(store, f"k{i}".encode()) == {"n": i} for i in range(10))

    asyncio.run(main())


class FillingStore(MemoryStore):
    """A ``MemoryStore`` whose prepared write fills a changelog batch with every part
    encoded, and notes when those batches are handed over (``send_full``)."""

    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order

    def prepare_partitions(self, items, str_keys=False):
        writes = self.writes = super().prepare_partitions(items, str_keys)
        order, added = self.order, writes.add
        sent = [0]

        def add(items, str_keys=False):
            added(items, str_keys)

        async def send_full():
            sent[0] = len(writes.encoded)
            order.append(f"changelog batch of {sent[0]}")

        writes.add = add
        writes.filled = lambda: len(writes.encoded) > sent[0]
        writes.send_full = send_full
        return writes


def test_changelog_batches_go_out_between_parts_only_after_the_outputs_sent_before():
    """A snapshot of more than one part is encoded only between batches. Its changelog batches are handed over as its parts fill them, between
    parts (so the producer builds each on its own, not ~10 at once at the end); each
    only after the outputs sent so far are acknowledged, as the whole write waits for
    them: a state that dropped a window never reaches the changelog before the result
    that reports it."""
    order: list[str] = []
    store = FillingStore(order)
    emitter = Emitter()
    protocol = CommitProtocol(emitter, defer=True)
    protocol.ENCODE_PART = 1
    cache = protocol.register(WriteBackCache(store))

    async def main():
        result_acked = asyncio.Event()

        async def send_result():
            await result_acked.wait()
            order.append("result acked")

        emitter.sending.append(asyncio.ensure_future(send_result()))
        for key in (b"a", b"b", b"c"):
            cache.put(key, {"n": 1}, 0)
        rest = await protocol.begin_commit()
        # Larger than a part: nothing encoded in the snapshot's own section (a batch
        # waits for that section: the first part in it held the loop 11-14 ms).
        assert store.writes.encoded == []
        writing = asyncio.ensure_future(rest)
        await asyncio.sleep(0.05)  # the parts run (1 ms apart), their hand-over waits
        assert order == []  # for the result
        result_acked.set()
        await writing
        assert order[0] == "result acked"
        # Each part encoded between batches, then what it filled handed over.
        assert [o for o in order if o.startswith("changelog")] == [
            "changelog batch of 1", "changelog batch of 2", "changelog batch of 3"]
        assert value_of(store, b"a") == {"n": 1}

    asyncio.run(main())


def test_a_snapshot_takes_keys_and_encodes_the_values_they_have_then():
    """The snapshot's section only swaps the dirty keys out (no list of ~9,000 values
    made there: that held the loop 7-10 ms per commit, issue 22); each part encodes the
    values the keys have when it runs. A value given up meanwhile (``drop_unflushed``,
    a lapsed worker's state) is not written; a snapshot given back leaves every taken
    key dirty again, with its current value."""
    store = MemoryStore()
    protocol = CommitProtocol(MemoryEmitter(), defer=True)
    protocol.ENCODE_PART = 1
    cache = protocol.register(WriteBackCache(store))

    async def main():
        for key in (b"a", b"b"):
            cache.put(key, {"n": 1}, 0)
        snapshot = await cache.snapshot()
        assert snapshot.taken == {b"a": 0, b"b": 0} and cache.dirty_count == 0
        cache.get(b"a", dict)["n"] = 2  # changed in place after the snapshot
        assert snapshot.encode_some(1) is False
        snapshot.abandon()
        assert cache.dirty_count == 2 and cache.get(b"a", dict) == {"n": 2}
        snapshot = await cache.snapshot()
        cache.drop_unflushed()
        snapshot.encode_some(2)
        await snapshot.write()
        assert value_of(store, b"a") is None and value_of(store, b"b") is None

    asyncio.run(main())


def test_a_batch_past_max_dirty_during_a_snapshot_does_not_deadlock_the_commit(worker, monkeypatch):
    """A batch between two parts of a snapshot that leaves its cache at ``max_dirty``
    does not flush it then: the flush would wait for the cache's lock, which the
    snapshot holds until it is written, while the snapshot's next part waits for the
    batch to leave its section. Found with 1,000,000 keys under at_least_once
    (tests/chaos/test_fast_restart.py): the worker stopped processing for good. The
    values wait for the next commit instead."""
    consumer, _protocol, _cache, store = worker
    protocol = CommitProtocol(MemoryEmitter(), defer=True, guard=commit_guard)
    monkeypatch.setattr(protocol, "ENCODE_PART", 1)
    cache = protocol.register(WriteBackCache(store, max_dirty=2))
    monkeypatch.setattr(commit_guard, "before_commit", [protocol.begin_commit])

    async def main():
        async with commit_guard.processing():
            for key in (b"a", b"b"):
                cache.put(key, {"n": 1}, 0)
            consumer.ack_spans({TP0: (0, 9)})
        committing = asyncio.ensure_future(consumer.commit())
        await asyncio.sleep(0)  # the snapshot (a and b) is taken; its parts follow

        async def batch_past_max_dirty():
            async with commit_guard.processing():
                for key in (b"c", b"d", b"e"):
                    cache.put(key, {"n": 2}, 0)
                consumer.ack_spans({TP0: (10, 19)})
                await protocol.end_batch(cache)

        await asyncio.wait_for(batch_past_max_dirty(), 5)
        assert await asyncio.wait_for(committing, 5) is True
        assert value_of(store, b"a") == {"n": 1}
        assert cache.dirty_count == 3  # for the next commit
        await protocol.end_batch(cache)  # no snapshot in flight: flushed now
        assert cache.dirty_count == 0 and value_of(store, b"e") == {"n": 2}

    asyncio.run(main())
