"""The one state store: per-partition RocksDB + changelog (``PartitionStore``), a
write-back cache over it (``WriteBackCache``, flushed by ``app.commit``), expiry of
timed entries that survives restarts (``Expiry``), and an in-memory twin of the store
for tests (``MemoryStore``).

Keys and values are bytes this project encodes itself (JSON through orjson, the
tables' ``RAW_SCHEMA``). Faust picks the RocksDB partition and the changelog partition
of a table write from the *current event*; the store addresses partitions explicitly
instead, which keeps a key's state in the partition its records come from
(co-partitioned with the input topic).

How values reach disk is decided by ``app.commit.emitter``: under at_least_once the
changelog records go out as pipelined record batches, acknowledged before one RocksDB
``WriteBatch`` per partition (per ``WRITE_CHUNK`` values of a large one) is written
(``StoreWrites``); under exactly_once through Faust's table API, inside the transaction
of the batch.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from faust.types import TP
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from app.commit import emitter
from app.kafka_io import kafka_io
from app.transport import as_current_event, delete_in_partition, partition_db, set_current_event
from operators.window_buffer import WriteBackBuffer

#: ``await pause(seconds)``: give the event loop time after a step that took that long.
Pause = Callable[[float], Awaitable[None]]

#: A cached value that is not there (``None`` is a value: a deleted key).
_GONE = object()

# The Faust internals the store needs (the current event, a partition's RocksDB) come
# from app.transport, the one module that touches them.
as_current = as_current_event


class AtPartition:
    """What Faust's table needs of "the current event" to pick a partition.

    ``topic``: the source topic, which Faust's ``Table.partition_for_key`` checks for
    the same partition count as the changelog whenever a value is set through the
    table (the exactly_once path). Without it every such write raised AttributeError,
    so windows could not run under exactly_once at all."""

    __slots__ = ("partition", "topic", "__weakref__")

    def __init__(self, partition: int, topic: str | None = None) -> None:
        self.partition = partition
        self.topic = topic

    @property
    def message(self) -> AtPartition:
        return self


class PartitionStore:
    """Reads and writes JSON values of a raw-bytes table in an explicit partition."""

    def __init__(self, table: Any, source_topic: str | None = None) -> None:
        self.table = table
        #: The topic whose partitions this store's partitions follow (see AtPartition).
        self.source_topic = source_topic

    def partition_db(self, partition: int) -> Any:
        """The RocksDB (rocksdict) of one partition, or None for another kind of store.

        Why: a read through ``Table.get`` costs ~10 µs (key serializer registry, two
        lookups for ``__contains__`` then ``__getitem__``, sensors); reading the
        partition's rocksdict directly costs ~1 µs. Keys and values are raw bytes
        (RAW_SCHEMA), so the bytes Faust would store are exactly these."""
        return partition_db(self.table, partition)


    def read(self, event: Any, key: bytes) -> Any:
        """The decoded value of ``key`` in ``event``'s partition, or None."""
        db = self.partition_db(event.message.partition)
        if db is not None:
            raw = db.get(key)
        else:
            with as_current(event):
                raw = self.table.get(key)
        return None if raw is None else orjson.loads(raw)

    def write(self, event: Any, key: bytes, value: Any) -> None:
        """Store ``value`` (JSON) for ``key`` in ``event``'s partition and its changelog."""
        with as_current(event):
            self.table[key] = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)

    async def write_many(self, items: list[tuple[Any, bytes, Any]]) -> None:
        """Store many (event, key, JSON value or its encoded bytes; None deletes the key).

        Batched changelog (``emitter.batches_changelog``): the changelog records go out
        as pipelined record batches, one per partition, acknowledged *before* the local
        RocksDB writes, one ``WriteBatch`` per partition (``StoreWrites``). Otherwise
        every write goes through Faust (under exactly_once inside the transaction, the
        producer buffer drained before this returns: ``emitter.table_writes_done``).
        """
        if not items:
            return
        dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
        if not emitter.batches_changelog():
            for ev, key, value in items:
                if value is None:
                    self.delete(ev, key)
                    continue
                with as_current(ev):
                    self.table[key] = value if value.__class__ is bytes else dumps(value, option=option)
            await emitter.table_writes_done()
            return
        # Explicit partitions: a key's changelog record goes to the partition it is
        # stored in (the partition of the record that changed it). A bytes value is
        # JSON the caller encoded already (bytes are not JSON values, so nothing else
        # can be meant): the pattern engine encodes its states without
        # OPT_NON_STR_KEYS, which costs about twice as much.
        writes = StoreWrites(self)
        put = writes.put
        for ev, key, value in items:
            if value is None:
                writes.delete(ev.message.partition, key)
                continue
            put(ev.message.partition, key, value if value.__class__ is bytes else dumps(value, option=option))
        await writes.store()

    async def write_partitions(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> None:
        """Store many (partition, key, JSON value): ``write_many`` addressed by partition
        number instead of by an event (what a write-back cache flushed at commit time
        knows), with the same order and guarantees. ``str_keys``: the caller expects
        every dict key in the values to be a string, so orjson's ``OPT_NON_STR_KEYS``
        (a third to a half of the encoding cost) is left out, except for a value where
        that fails; the bytes are the same. ``None`` as a value deletes the key."""
        if not items:
            return
        await emitter.ready()
        writes = self.prepare_partitions(items, str_keys)
        if writes is not None:
            await writes.store()
            return
        at = {p: self.at(p) for p in {p for p, _, _ in items}}
        deletes = [(at[p], key) for p, key, value in items if value is None]
        await self.write_many([(at[p], key, value) for p, key, value in items if value is not None])
        for ev, key in deletes:
            self.delete(ev, key)
        if deletes:
            await emitter.table_writes_done()

    def prepare_partitions(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> StoreWrites | None:
        """``write_partitions`` in two steps: the values are encoded now (into the
        changelog record batches and RocksDB write batches; more with ``add``), and
        ``store()`` of what this returns sends, awaits the acks, then writes RocksDB. So
        a caller can encode values while they may still change and write them later (the
        commit protocol, app/commit.py). None when the changelog does not go out as
        record batches (Faust's table API: ``write_partitions`` then writes through it)."""
        if not emitter.batches_changelog():
            return None
        writes = StoreWrites(self)
        writes.add(items, str_keys)
        return writes

    def at(self, partition: int) -> AtPartition:
        """A stand-in current event of ``partition`` of the source topic (or, with no
        source topic given, of the changelog, which has the same partition count)."""
        return AtPartition(partition, self.source_topic or self.table.changelog_topic.get_topic_name())

    def delete(self, event: Any, key: bytes) -> None:
        """Remove ``key`` from ``event``'s partition, and only there (a changelog
        tombstone in that partition): ``app.transport.delete_in_partition``."""
        db = self.partition_db(event.message.partition)
        with as_current(event):
            if db is not None:
                delete_in_partition(self.table, db, key)
            elif key in self.table:
                del self.table[key]

    def scan(self) -> Iterator[tuple[bytes, Any]]:
        """Every (key, decoded value) of the partitions this worker holds now."""
        for key, raw in self.table.items():
            if raw is not None:
                yield key, orjson.loads(raw)

    def scan_partition(self, partition: int, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, raw value) stored in one partition (RocksDB directly), in key
        order, from the first key at or after ``start``."""
        db = self.partition_db(partition)
        if db is None:
            return
        for key, raw in db.items(from_key=start) if start else db.items():
            if raw is not None:
                yield key, raw


class _HeldWrites(list):
    """One partition's writes to a store that is not RocksDB, held until written."""

    def put(self, key: bytes, raw: bytes | None) -> None:
        self.append((key, raw))

    def delete(self, key: bytes) -> None:
        self.append((key, None))


class StoreWrites:
    """One batched flush of a ``PartitionStore``: each encoded value goes straight into
    its partition's changelog record batch and RocksDB ``WriteBatch`` (both copy it), so
    no encoded value is held until the flush ends; ``store`` then sends the changelog,
    awaits its acks, writes RocksDB and records the changelog offsets.

    Order, as Faust's own: a crash leaves either both or only the changelog (which
    recovery replays), never a local write the changelog lacks. Why batches: Faust's
    per-record changelog path costs several times more per record, and a RocksDB put
    per key ~3 µs against ~0.7 µs in a batch. Why not hold (key, value) pairs until
    then: 0.97 against 0.32 µs to encode a dedupe entry with the copy that holding
    orjson's output needs (``app.codec.dumps_held``), plus a tuple and a list slot."""

    __slots__ = ("target", "changelog", "local", "full")

    #: A RocksDB write batch that ``add`` filled this far is closed and the next one
    #: begun; ``store`` writes them one at a time, the event loop's turn in between.
    #: Why: a commit's snapshot writes every changed state (~9,000 pattern states in
    #: the benchmark) and one write of them all held the loop 10-90 ms (issue 22).
    WRITE_CHUNK = 1000

    def __init__(self, target: PartitionStore) -> None:
        self.target = target
        self.changelog = kafka_io.record_batches()
        #: partition -> its RocksDB WriteBatch (or _HeldWrites for another store kind)
        self.local: dict[int, Any] = {}
        #: (partition, closed WriteBatch), in the order they filled (``WRITE_CHUNK``).
        self.full: list[tuple[int, Any]] = []

    def _local(self, partition: int) -> Any:
        local = self.local.get(partition)
        if local is None:
            db = self.target.partition_db(partition)
            local = self.local[partition] = _HeldWrites() if db is None else WriteBatch(raw_mode=True)
        return local

    def add(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> None:
        """Encode (partition, key, JSON value; None deletes) into the write: straight into
        the changelog batches and RocksDB write batches, no event object per item."""
        dumps, option = orjson.dumps, 0 if str_keys else orjson.OPT_NON_STR_KEYS
        put, chunk = self.put, self.WRITE_CHUNK
        for start in range(0, len(items), chunk):
            for partition, key, value in items[start:start + chunk]:
                if value is None:
                    self.delete(partition, key)
                    continue
                try:
                    raw = dumps(value, option=option)
                except TypeError:  # a non-string dict key after all (str_keys)
                    raw = dumps(value, option=orjson.OPT_NON_STR_KEYS)
                put(partition, key, raw)
            for partition, local in self.local.items():
                if local.__class__ is WriteBatch and local.len() >= chunk:
                    self.full.append((partition, local))
                    self.local[partition] = WriteBatch(raw_mode=True)

    def put(self, partition: int, key: bytes, raw: bytes) -> None:
        self.changelog.add(partition, key, raw)
        local = self.local.get(partition)
        if local is None:
            local = self._local(partition)
        local.put(key, raw)

    def delete(self, partition: int, key: bytes) -> None:
        """A tombstone: the key is gone from the changelog and RocksDB."""
        self.changelog.add(partition, key, None)
        self._local(partition).delete(key)

    def filled(self) -> bool:
        """Whether a changelog batch filled up that ``send_full`` would send."""
        return self.changelog.filled()

    async def send_full(self) -> None:
        """Send the changelog batches that filled up so far (``RecordBatches.send_full``);
        ``store`` sends the rest."""
        await self.changelog.send_full(self.target.table.changelog_topic.get_topic_name())

    def abandon(self) -> None:
        """Never stored (a commit's snapshot given back): the changelog batches sent so
        far are left to the producer (``RecordBatches.abandon``)."""
        self.changelog.abandon()

    async def store(self, pause: Pause | None = None) -> None:
        """Send the changelog, await its acks, then write RocksDB a write batch at a
        time: between two, ``pause(seconds the last one took)`` (a commit's
        ``CommitProtocol._batches_first``: the batches that wait go first), else one
        loop turn."""
        table = self.target.table
        topic = table.changelog_topic.get_topic_name()
        last = await (await self.changelog.start(topic))
        chunked = bool(self.full)
        took = 0.0
        for partition, local in [*self.full, *self.local.items()]:
            if chunked:
                if pause is None:
                    await asyncio.sleep(0)
                else:
                    await pause(took)
                t0 = time.perf_counter()
            if local.__class__ is _HeldWrites:
                with as_current(self.target.at(partition)):
                    for key, raw in local:
                        if raw is None:
                            table.data.pop(key, None)
                        else:
                            table.data[key] = raw
                continue
            # Faust's RocksDB ``Store._set`` minus the current-event lookup and its
            # key→partition LRU (a hint for reads outside a stream, which then look in
            # each partition's database instead), one write per write batch.
            self.target.partition_db(partition).write(local)
            if chunked:
                took = time.perf_counter() - t0
        for partition, offset in last.items():
            table.data.set_persisted_offset(TP(topic, partition), offset)


class MemoryStore:
    """The in-memory twin of ``PartitionStore`` (same methods, no Kafka, no RocksDB):
    ``data[partition][key]`` holds the encoded bytes, as the partition's RocksDB would.
    ``flushes`` counts batched writes; ``fail`` makes them raise (a changelog that is
    unreachable)."""

    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = {}
        self.flushes = 0
        self.fail = False
        self.str_keys: bool | None = None

    def partition_db(self, partition: int) -> dict[bytes, bytes]:
        db = self.data.get(partition)
        if db is None:
            db = self.data[partition] = {}
        return db

    def read(self, event: Any, key: bytes) -> Any:
        raw = self.data.get(event.message.partition, {}).get(key)
        return None if raw is None else orjson.loads(raw)

    def write(self, event: Any, key: bytes, value: Any) -> None:
        self.partition_db(event.message.partition)[key] = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)

    async def write_many(self, items: list[tuple[Any, bytes, Any]]) -> None:
        await self.write_partitions([(ev.message.partition, key, value) for ev, key, value in items])

    async def write_partitions(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> None:
        await self.prepare_partitions(items, str_keys).store()

    def prepare_partitions(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> _MemoryWrites:
        """As ``PartitionStore.prepare_partitions``: encoded now, stored by ``store()``
        (which waits for ``hold`` while it is set: a write in flight, for tests)."""
        self.str_keys = str_keys
        writes = _MemoryWrites(self, [])
        writes.add(items, str_keys)
        return writes

    def at(self, partition: int) -> AtPartition:
        return AtPartition(partition)

    #: While set to an unset ``asyncio.Event``, every ``store()`` waits for it.
    hold: asyncio.Event | None = None

    def delete(self, event: Any, key: bytes) -> None:
        self.data.get(event.message.partition, {}).pop(key, None)

    def scan(self) -> Iterator[tuple[bytes, Any]]:
        for db in self.data.values():
            for key, raw in db.items():
                yield key, orjson.loads(raw)

    def scan_partition(self, partition: int, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        yield from sorted(item for item in self.data.get(partition, {}).items() if item[0] >= start)


class _MemoryWrites:
    """One prepared write of a ``MemoryStore``."""

    def __init__(self, target: MemoryStore, encoded: list[tuple[int, bytes, bytes | None]]) -> None:
        self.target, self.encoded = target, encoded

    def add(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> None:
        for p, key, value in items:
            if value is None or value.__class__ is bytes:
                self.encoded.append((p, key, value))
            else:
                # As PartitionStore: without OPT_NON_STR_KEYS when told every key is a
                # string (orjson raises TypeError on any other key, so a wrong claim fails).
                self.encoded.append((p, key, orjson.dumps(value, option=0 if str_keys else orjson.OPT_NON_STR_KEYS)))

    def filled(self) -> bool:
        return False

    async def send_full(self) -> None:
        """Nothing is sent before ``store`` here."""

    def abandon(self) -> None:
        """Nothing was sent."""

    async def store(self, pause: Pause | None = None) -> None:
        target = self.target
        if target.hold is not None:
            await target.hold.wait()
        if target.fail:
            raise RuntimeError("changelog unreachable")
        target.flushes += 1
        for p, key, raw in self.encoded:
            db = target.partition_db(p)
            if raw is None:
                db.pop(key, None)
            else:
                db[key] = raw


class WriteBackCache(WriteBackBuffer):
    """Decoded values of recently used keys over a store, and the changes not written
    yet (``dirty``: cache key -> partition), written once per commit by the commit
    protocol it is registered with (``app.commit.commit_protocol.register``), or per
    batch where the guarantee wants it.

    Like Kafka Streams' caching store: any number of batches may change a key between
    two commits; it is encoded and written once. Hot loops may use ``cached`` and
    ``dirty_keys`` directly (a get and a set item instead of two method calls per record).

    ``key_bytes``: the stored key of a cache key (default: the cache key is the stored
    bytes). ``str_keys``: every dict key of the values is a string (cheaper encoding).
    After a failure that may have left a dirty value half-updated (``fail``), no flush
    (so no commit) writes anything any more, and a restart replays from the last commit.
    """

    def __init__(self, store: Any, max_entries: int = 100_000, *, str_keys: bool = False,
                 key_bytes: Callable[[Hashable], bytes] | None = None, max_dirty: int | None = None) -> None:
        super().__init__(max_entries)
        self.store = store
        self.str_keys = str_keys
        self.key_bytes = key_bytes
        #: Unwritten values that make a batch flush at once (bounds memory and the size
        #: of one commit's flush).
        self.max_dirty = max_dirty if max_dirty is not None else max(1, max_entries // 2)
        self.failed = False
        self.flushes = 0
        #: Bookkeeping values (e.g. a partition's stream time) written with the next
        #: flush, by stored key: (partition, value); not cached, not counted as dirty.
        self.side: dict[bytes, tuple[int, Any]] = {}
        self._lock = asyncio.Lock()
        #: Called after each successful flush with its seconds (metrics).
        self.on_flush: Callable[[float], None] | None = None

    async def flush(self, store: Any = None) -> None:
        """Write every dirty value once (changelog records, then RocksDB: one
        ``write_partitions``). A failed write leaves them dirty (with whatever became so
        meanwhile), so no commit covers them until a flush succeeds."""
        async with self._lock:
            self.check_failed()
            if not self.dirty_keys and not self.side:
                return
            await self._write_all(store or self.store)

    async def _write_all(self, store: Any) -> None:
        """Take every unwritten value and write it to ``store`` now (the lock held); a
        failed write gives them back, still unwritten."""
        t0 = time.perf_counter()
        taken, side, writes = self._take()
        try:
            await store.write_partitions(writes, str_keys=self.str_keys)
        except BaseException:
            self.give_back(taken, side)
            raise
        finally:
            self.written()
        self.count_flush(t0)

    def over_dirty_limit(self) -> bool:
        """Whether a batch must flush this cache now: ``max_dirty`` values unwritten, and
        no flush or commit snapshot of it under way. During a snapshot the batch's flush
        would wait for the snapshot, which waits for the batch's section to end: a
        deadlock (docs/delivery.md, AH); the values wait for the next commit instead."""
        return self.dirty_count >= self.max_dirty and not self._lock.locked()

    async def snapshot(self) -> CacheSnapshot | None:
        """The first half of a flush, for a commit that lets batches run while it writes
        (app/commit.py, ``CommitProtocol.begin_commit``): every dirty value is taken now
        (changes made after this mark them dirty again: the next flush writes them too);
        the returned ``CacheSnapshot`` encodes them (``encode_some``, a part at a time
        between batches) and writes them (``write``). Until it is done, no other flush of
        this cache starts (changelog order) and no value it writes is evicted (a read
        meanwhile would find RocksDB without it). None: nothing to write, or written
        already here (a store that cannot encode ahead: ``prepare_partitions`` None or
        missing)."""
        await self._lock.acquire()
        done = True
        try:
            self.check_failed()
            if not self.dirty_keys and not self.side:
                return None
            prepare = getattr(self.store, "prepare_partitions", None)
            prepared = None if prepare is None else prepare([], str_keys=self.str_keys)
            if prepared is None:
                await self._write_all(self.store)
                return None
            t0 = time.perf_counter()
            # The dirty keys as they are (a swap, not a list of ~9,000 values built
            # here: that held the commit's first section 7-10 ms; issue 22).
            taken, side = self._take_keys()
            done = False
            return CacheSnapshot(self, prepared, taken, side, t0)
        finally:
            if done:
                self._lock.release()

    def check_failed(self) -> None:
        if self.failed:
            raise RuntimeError("a batch failed after changing cached state: not writing it "
                               "(a restart replays from the last commit)")

    def _take(self) -> tuple[list[tuple[Hashable, Any, int]], dict[bytes, tuple[int, Any]],
                             list[tuple[int, bytes, Any]]]:
        # As ``take_dirty``, but the taken keys stay cached (``_writing``) until the write
        # is done (``written``): a read meanwhile must not find the store without them.
        dirty, side = self._take_keys()
        values = self.cached
        taken = [(key, values[key], partition) for key, partition in dirty.items()]
        return taken, side, self.items_of(taken, side)

    def _take_keys(self) -> tuple[dict[Hashable, int], dict[bytes, tuple[int, Any]]]:
        """The dirty keys (key -> partition) and side values, taken: no longer dirty,
        kept cached as being written (``_writing``) until ``written``."""
        dirty, self.dirty_keys = self.dirty_keys, {}
        self.writes += len(dirty)
        self._writing = dirty
        # The side values as they are now: a snapshot encodes them with its last part,
        # after more batches, and a bookkeeping value ahead of the offsets it commits
        # misleads the replay after a crash (a stream time that makes replayed records
        # late, a join's source offsets that skip records its buffers never got:
        # docs/delivery.md AV). Each is small (one per partition).
        side = {key: (p, copy.deepcopy(value)) for key, (p, value) in self.side.items()}
        self.side = {}
        return dirty, side

    def items_of(self, taken: list[tuple[Hashable, Any, int]],
                 side: dict[bytes, tuple[int, Any]]) -> list[tuple[int, bytes, Any]]:
        """(partition, stored key, value) of taken values and side values."""
        key_bytes = self.key_bytes
        if key_bytes is None:
            writes = [(p, key, value) for key, value, p in taken]
        else:
            writes = [(p, key_bytes(key), value) for key, value, p in taken]
        writes.extend((p, key, value) for key, (p, value) in side.items())
        return writes

    def take_current(self, part: Iterable[tuple[Hashable, int]]) -> list[tuple[Hashable, Any, int]]:
        """(key, value, partition) of taken (key, partition)s, each value as it is now:
        a key changed since it was taken is written with its change, which is then no
        longer dirty (written once, not by this commit and again by the next). A key no
        longer cached (``drop_unflushed``: a lapsed worker's state) is not written."""
        values, dirty = self.cached, self.dirty_keys
        out = []
        for key, partition in part:
            if key in dirty:
                del dirty[key]
            value = values.get(key, _GONE)
            if value is not _GONE:
                out.append((key, value, partition))
        return out

    def give_back(self, taken: list[tuple[Hashable, Any, int]], side: dict[bytes, tuple[int, Any]]) -> None:
        """Taken values not written: unwritten again (not after ``fail``, which gave
        every unwritten value up)."""
        if self.failed:
            return
        self.restore_dirty(taken)
        self.side = {**side, **self.side}

    def give_back_keys(self, taken: dict[Hashable, int], side: dict[bytes, tuple[int, Any]]) -> None:
        """``give_back`` of a snapshot's taken (key -> partition): dirty again, each
        with the value it has now (still cached: ``_writing``)."""
        if self.failed:
            return
        dirty, cached = self.dirty_keys, self.cached
        for key, partition in taken.items():
            if key in cached:  # else dropped unwritten (``drop_unflushed``)
                dirty.setdefault(key, partition)
        self.writes -= len(taken)
        self.side = {**side, **self.side}

    def written(self) -> None:
        """A write of taken values ended (stored, or given back as dirty)."""
        self._writing = {}
        self._evict()

    def end_snapshot(self) -> None:
        """A ``snapshot``'s write ended: the next flush may start."""
        self.written()
        self._lock.release()

    def count_flush(self, t0: float) -> None:
        self.flushes += 1
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - t0)

    def fail(self) -> None:
        """Forget everything after a handler failed half-way: a cached value may hold
        changes whose outputs were never sent. Unwritten values stay unwritten for good
        (``failed``), so the offsets they cover are never committed; that includes the
        values a commit's snapshot took and has not written yet (``_writing``): its
        offsets cover them too (``CacheSnapshot`` checks ``failed`` before each step)."""
        if self.dirty_keys or self.side or self._writing:
            self.failed = True
            self.dirty_keys.clear()
            self.side.clear()
        self.cached.clear()

    def pending(self) -> bool:
        """True when a flush would write something."""
        return bool(self.dirty_keys or self.side)

    def put_side(self, key: bytes, value: Any, partition: int) -> None:
        """Write ``value`` under ``key`` with the next flush (read then: later changes to
        the same object are included)."""
        self.side[key] = (partition, value)

    def drop_unflushed(self) -> None:
        """Forget every unwritten value without writing it, and the cache: a worker whose
        group session lapsed (paused, then woken) holds changes of offsets it never
        committed, while the partitions' new owners have written newer state since
        (docs/delivery.md, P). Whoever owns them now processes those records again."""
        self.dirty_keys.clear()
        self.side.clear()
        self.cached.clear()

    def moved(self) -> None:
        """Partitions moved: drop every cached value (another worker may change them)."""
        if self.side:
            raise RuntimeError(f"{len(self.side)} unwritten values would be lost; flush first")
        self.clear()


class CacheSnapshot:
    """The keys a ``WriteBackCache`` had unwritten at a commit's snapshot: ``encode_some``
    encodes their values a part at a time (each as the value is then: with any later
    change made in place, which is then no longer dirty), ``write`` stores them,
    ``abandon`` gives them back as unwritten. Either exactly once: the cache's flushes
    wait until then."""

    __slots__ = ("cache", "prepared", "taken", "side", "t0", "encoded", "_rest")

    def __init__(self, cache: WriteBackCache, prepared: Any, taken: dict[Hashable, int], side: dict,
                 t0: float) -> None:
        #: key -> partition of the values taken (the cache's dirty keys at the snapshot)
        self.cache, self.prepared, self.taken, self.side, self.t0 = cache, prepared, taken, side, t0
        #: How many of ``taken`` are encoded (then the side values, with the last part).
        self.encoded = 0
        self._rest = iter(taken.items())

    def encode_some(self, n: int) -> bool:
        """Encode the next ``n`` values into the write (the side values with the last
        part); True once all are."""
        self.cache.check_failed()
        taken = self.taken
        if self.encoded > len(taken):
            return True
        part = list(itertools.islice(self._rest, n))
        self.encoded += len(part)
        last = self.encoded >= len(taken)
        if last:
            self.encoded = len(taken) + 1
        cache = self.cache
        self.prepared.add(cache.items_of(cache.take_current(part), self.side if last else {}), cache.str_keys)
        return last

    def filled(self) -> bool:
        """Whether the parts encoded so far filled a changelog batch (``send_full``)."""
        return self.prepared.filled()

    async def send_full(self) -> None:
        """Send the changelog batches the parts encoded so far filled (``write`` sends
        the rest and waits for all of them)."""
        await self.prepared.send_full()

    async def write(self, pause: Pause | None = None) -> None:
        """Changelog records acknowledged, then RocksDB (``pause`` between its write
        batches, see ``StoreWrites.store``). A failure leaves the values unwritten
        (dirty again, unless changed since: then the newer value is)."""
        cache = self.cache
        if cache.failed:
            self.abandon()
            cache.check_failed()
        try:
            await self.prepared.store(pause)
        except BaseException:
            cache.give_back_keys(self.taken, self.side)
            raise
        finally:
            self._done()
        cache.count_flush(self.t0)

    def abandon(self) -> None:
        """Not written (the commit stopped before): unwritten again."""
        self.prepared.abandon()
        self.cache.give_back_keys(self.taken, self.side)
        self._done()

    def _done(self) -> None:
        self.cache.end_snapshot()


class ExpiryQueue:
    """One partition's expiring entries ``(at, seq, key)`` in memory, oldest first (as
    they were stored), laid out flat in one deque (at, seq, key, at, seq, key, ...): no
    container is kept per entry. For stores that are not RocksDB (``memory://``, the
    HTTP harness), whose entries are all in memory anyway; a RocksDB store's entries
    expire through an ``ExpiryIndex`` on disk.

    Why flat: a tuple is a container the garbage collector tracks until the first
    collection it survives. One kept per admitted id made the young generation fill
    with them: at 5,000 ids/s a young collection ran every 10 s and walked the 50,000
    tuples at once, 3-13 ms in which the worker did nothing else (docs/performance.md,
    "Issue 22, session 18"). Floats, ints and bytes are not tracked, and a deque is
    one object however long."""

    __slots__ = ("_flat",)
    #: Built at once (``Expiry.ensure``), never in steps.
    building_from = None

    def __init__(self, entries: Iterable[tuple[float, int, bytes]] = ()) -> None:
        self._flat: deque[float | int | bytes] = deque(itertools.chain.from_iterable(entries))

    def stored(self, values: dict[bytes, Any]) -> None:
        """Entries just stored: key -> ``(at, seq)`` or None (a delete), newest last."""
        extend = self._flat.extend
        for key, value in values.items():
            if value is not None:
                extend((value[0], value[1], key))

    def oldest(self) -> Iterator[tuple[float, int, bytes]]:
        """The entries, oldest first; ``drop`` them once this iterator is let go."""
        flat = iter(self._flat)
        for at in flat:
            yield at, next(flat), next(flat)  # type: ignore[misc]

    def drop(self, n: int) -> None:
        """Drop the ``n`` oldest entries."""
        popleft = self._flat.popleft
        for _ in range(3 * n):
            popleft()

    def close(self, keep: bool = False) -> None:
        """Drop it (``keep`` has no meaning in memory: a queue is built anew)."""
        self._flat.clear()

    def __len__(self) -> int:
        return len(self._flat) // 3


class ExpiryIndex:
    """One partition's expiring entries on local disk, in a RocksDB of their own, so a
    worker's memory does not grow with them. Two parts, read together oldest first:

    - the entries found in the store when the index was built (after an assignment:
      ``Expiry.ensure``, in steps: ``Expiry.build_some``), one RocksDB key each,
      ``REBUILT + (at, seq) + key``, so RocksDB sorts them by time;
    - the entries stored since (``stored``), in the order they were stored, packed one
      after another into chunks of ~``CHUNK_BYTES`` (``(at, seq, key length)``, then the
      key), one RocksDB value per chunk under ``LOGGED + chunk number``. Only the chunk
      being filled and the one being read are in memory.

    Why (docs/performance.md, "The dedupe expiry on disk"): the dedupe step keeps every
    admitted id for its horizon, a day by default. In memory (``ExpiryQueue``, ~133
    bytes an id) that was ~57 GB per worker at 5,000 ids/s. A RocksDB key per stored id
    would cost ~1 µs an id on the batch path (the write and its memtable insert); a
    packed entry costs ~0.24 µs, ~0.16 µs more than the in-memory queue's append.

    Local only, not changelogged. Closed with ``close(keep=True)`` (partitions moved, a
    stop), it writes out its tail and read position (``META``), and ``reopen`` goes on
    with it, a build not finished included; ``Expiry`` decides when that is safe.
    Without ``META`` (a crash) it is built anew from the table's partition. While it is
    built it gives out no entries: their order is known once every one is found. The
    stored part is in store
    order, as the in-memory queue is: an entry stored after a younger one (event time)
    waits for it. Times before 1970 sort after all others (big-endian doubles), so such
    entries are deleted late, never early."""

    #: The state of an index closed to be reopened (``close(keep=True)``); absent while
    #: it is open, so that a crash leaves nothing to reopen.
    META = b"\x00"
    REBUILT = b"\x01"
    LOGGED = b"\x02"
    SORTED = struct.Struct(">dQ")
    ENTRY = struct.Struct(">dQI")
    CHUNK_NUMBER = struct.Struct(">Q")
    #: A chunk of stored entries is written to RocksDB once it holds this many bytes.
    CHUNK_BYTES = 256 * 1024
    #: Entries per RocksDB write while building.
    REBUILD_CHUNK = 10_000

    def __init__(self, path: Path, entries: Iterable[tuple[float, int, bytes]] = (), *,
                 reopened: tuple[Rdict, dict[str, Any]] | None = None, building: bool = False) -> None:
        """Built from ``entries`` at ``path`` (anything there is deleted first), or, with
        ``reopened`` (its database and ``META``: ``reopen``), going on from there.
        ``building``: more entries are to be ``found`` (``building_from``)."""
        self.path = path
        #: While it is built: the table key the build reads from next; None once built.
        self.building_from: bytes | None = b"" if building else None
        #: Entries found at the build (their keys at or above ``_rebuilt_from``).
        self._rebuilt = 0
        self._rebuilt_from = self.REBUILT
        #: Stored entries: chunks ``_read_no`` .. ``_tail_no - 1`` in RocksDB, then the
        #: tail being filled; the oldest live one at byte ``_read_pos`` of ``_read_no``.
        self._logged = 0
        self._tail = bytearray()
        self._tail_no = self._read_no = self._read_pos = 0
        #: The one chunk read from RocksDB kept in memory (its number, its bytes).
        self._loaded: tuple[int, bytes] = (-1, b"")
        #: What the last ``oldest`` gave out, in order: a built entry's RocksDB key, or
        #: a stored entry's (chunk number, byte after it). ``drop`` deletes up to there.
        self._taken: list[bytes | tuple[int, int]] = []
        if reopened is not None:
            self.db, meta = reopened
            found = meta["rebuilt"] if "rebuilt" in meta else meta["found_so_far"]
            self._rebuilt, self._rebuilt_from = int(found), bytes.fromhex(meta["rebuilt_from"])
            self._logged, self._tail_no = int(meta["logged"]), int(meta["tail_no"])
            self._read_no, self._read_pos = int(meta["read_no"]), int(meta["read_pos"])
            building_from = meta.get("building_from")
            self.building_from = None if building_from is None else bytes.fromhex(building_from)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            Rdict.destroy(str(path))
        self.db = Rdict(str(path), _index_options())
        self.found(entries)

    def found(self, entries: Iterable[tuple[float, int, bytes]]) -> None:
        """Entries found in the table by the build."""
        pack, prefix = self.SORTED.pack, self.REBUILT
        batch = WriteBatch(raw_mode=True)
        for at, seq, key in entries:
            batch.put(prefix + pack(at, seq) + key, b"")
            self._rebuilt += 1
            if self._rebuilt % self.REBUILD_CHUNK == 0:
                self.db.write(batch)
                batch = WriteBatch(raw_mode=True)
        self.db.write(batch)

    @classmethod
    def reopen(cls, path: Path) -> ExpiryIndex | None:
        """The index that ``close(keep=True)`` left at ``path``, to go on with; None when
        there is none (never built there, or not closed so: a crash)."""
        if not (path / "CURRENT").is_file():
            return None
        db = Rdict(str(path), _index_options())
        try:
            raw = db.get(cls.META)
            index = None if raw is None else cls(path, reopened=(db, orjson.loads(raw)))
        except (KeyError, ValueError, TypeError):
            index = None
        if index is None:
            db.close()
            return None
        # Changed from now on: until the next close, a crash must leave nothing to reopen.
        db.delete(cls.META, write_opt=_synced())
        return index

    def stored(self, values: dict[bytes, Any]) -> None:
        """Entries just stored: key -> ``(at, seq)``, or None (a delete: no entry)."""
        tail, pack = self._tail, self.ENTRY.pack
        n = 0
        for key, value in values.items():
            if value is not None:
                at, seq = value
                tail += pack(at, seq, len(key))
                tail += key
                n += 1
        self._logged += n
        if len(tail) >= self.CHUNK_BYTES:
            self.db[self.LOGGED + self.CHUNK_NUMBER.pack(self._tail_no)] = bytes(tail)
            self._tail_no += 1
            self._tail = bytearray()

    def _chunk(self, number: int) -> bytes | bytearray:
        if number == self._tail_no:
            return self._tail
        if self._loaded[0] != number:
            self._loaded = (number, self.db[self.LOGGED + self.CHUNK_NUMBER.pack(number)])
        return self._loaded[1]

    def _stored_entries(self, taken: list | None = None) -> Iterator[tuple[Any, ...]]:
        """The stored entries from the oldest: ``(at, seq, key)``, each one's position
        appended to ``taken``; without ``taken``, ``(at, seq, key, position)``."""
        unpack, size = self.ENTRY.unpack_from, self.ENTRY.size
        number, pos = self._read_no, self._read_pos
        note = None if taken is None else taken.append
        while True:
            chunk = self._chunk(number)
            end = len(chunk)
            while pos < end:
                at, seq, n = unpack(chunk, pos)
                start = pos + size
                pos = start + n
                if note is None:
                    yield at, seq, bytes(chunk[start:pos]), (number, pos)
                else:
                    note((number, pos))
                    yield at, seq, bytes(chunk[start:pos])
            if number == self._tail_no:
                return
            number, pos = number + 1, 0

    def _rebuilt_entries(self) -> Iterator[tuple[float, int, bytes, bytes]]:
        if not self._rebuilt:
            return
        it = self.db.iter()
        it.seek(self._rebuilt_from)
        unpack, prefix, skip = self.SORTED.unpack_from, self.REBUILT[0], 1 + self.SORTED.size
        while it.valid():
            key = it.key()
            if key[0] != prefix:
                return
            at, seq = unpack(key, 1)
            yield at, seq, key[skip:], key
            it.next()

    def oldest(self) -> Iterator[tuple[float, int, bytes]]:
        """The entries, oldest first; ``drop`` them once this iterator is let go. None
        while it is built."""
        self._taken = taken = []
        if self.building_from is not None:
            return
        if not self._rebuilt:  # the usual case: what was found at the build has expired
            yield from self._stored_entries(taken)
            return
        built, stored = self._rebuilt_entries(), self._stored_entries()
        try:
            a, b = next(built, None), next(stored, None)
            while a is not None or b is not None:
                if b is None or (a is not None and a[0] <= b[0]):
                    taken.append(a[3])  # type: ignore[index]
                    yield a[0], a[1], a[2]  # type: ignore[index]
                    a = next(built, None)
                else:
                    taken.append(b[3])
                    yield b[0], b[1], b[2]
                    b = next(stored, None)
        finally:
            built.close()
            stored.close()

    def drop(self, n: int) -> None:
        """Delete the ``n`` oldest entries (the first ``n`` the last ``oldest`` gave)."""
        taken, self._taken = self._taken[:n], []
        built = [t for t in taken if t.__class__ is bytes]
        if built:
            batch = WriteBatch(raw_mode=True)
            for key in built:
                batch.delete(key)
            self.db.write(batch)
            self._rebuilt -= len(built)
            # Reads start after the last one deleted: RocksDB then never walks the
            # deletes' tombstones (a read from the first key would, until a compaction).
            self._rebuilt_from = built[-1] + b"\x00"  # type: ignore[operator]
        stored = len(taken) - len(built)
        if not stored:
            return
        number, pos = next(t for t in reversed(taken) if t.__class__ is tuple)  # type: ignore[misc]
        self._logged -= stored
        if number < self._tail_no and pos == len(self._chunk(number)):
            number, pos = number + 1, 0  # that chunk is read to its end
        for done in range(self._read_no, number):
            del self.db[self.LOGGED + self.CHUNK_NUMBER.pack(done)]
        if number == self._tail_no and pos == len(self._tail):
            self._tail.clear()  # everything stored is deleted: fill the tail anew
            pos = 0
        self._read_no, self._read_pos = number, pos

    def close(self, keep: bool = False) -> None:
        """Close it. ``keep``: with its tail and read position written out (``META``), for
        ``reopen``; else it is deleted (and built anew when the partition is used again)."""
        if not keep:
            self.db.close()
            Rdict.destroy(str(self.path))
            return
        if self._tail:
            self.db[self.LOGGED + self.CHUNK_NUMBER.pack(self._tail_no)] = bytes(self._tail)
            self._tail_no += 1
            self._tail = bytearray()
        meta = {"rebuilt": self._rebuilt, "rebuilt_from": self._rebuilt_from.hex(), "logged": self._logged,
                "tail_no": self._tail_no, "read_no": self._read_no, "read_pos": self._read_pos}
        if self.building_from is not None:
            # Not under "rebuilt": a version without steps would reopen a half-built
            # index as built (its missing entries never expiring); it fails on the
            # missing key and builds anew.
            meta["found_so_far"] = meta.pop("rebuilt")
            meta["building_from"] = self.building_from.hex()
        # Not synced: lost in a crash of the machine, it only makes the next use rebuild.
        self.db[self.META] = orjson.dumps(meta)
        self.db.close()

    @staticmethod
    def discard(path: Path) -> None:
        """Delete a closed index (its table partition changed without it)."""
        if path.exists():
            Rdict.destroy(str(path))

    def __len__(self) -> int:
        return self._rebuilt + self._logged


_INDEX_CACHE: Cache | None = None


def _synced() -> WriteOptions:
    """Write options of a write that must outlive a crash of the machine, not only of
    the process (the delete of an index's ``META`` when it is reopened)."""
    options = WriteOptions()
    options.sync = True
    return options


def _index_options() -> Options:
    """An expiry index's RocksDB options: small write buffers, one block cache shared by
    every index of the process (they are read from their oldest key and written at
    their newest, so little of them is ever read back)."""
    global _INDEX_CACHE
    if _INDEX_CACHE is None:
        _INDEX_CACHE = Cache(8 << 20)
    table = BlockBasedOptions()
    table.set_block_cache(_INDEX_CACHE)
    options = Options(raw_mode=True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_size(8 << 20)
    return options


class Expiry:
    """Entries with a time (``at``, epoch seconds) and a position (``seq``, the offset of
    the record that wrote them), oldest first: the pipeline's ``expire`` deletes the
    oldest few per batch once past their horizon (one ``Expiry`` per dedupe step).

    Each partition's entries are kept in the order they expire, by an ``ExpiryIndex``
    on disk under ``folder`` for a RocksDB store, else by an ``ExpiryQueue`` in memory.
    Each batch adds what it stored (``stored``). The first time a partition is used
    after an assignment (``ensure``) its index is the one closed at the last move or
    stop (``forget``), when nothing else wrote its table partition since; otherwise it
    is built from what the store holds, so that entries stored before a restart or a
    rebalance expire too: on disk in steps, one per batch (``build_some``), in memory
    at once.

    What else writes a table partition: Faust's recovery (another owner's changes, a
    wiped or discarded folder restored, a standby copy), seen one changelog record at a
    time by ``restored``, the table's ``on_changelog_event``; and a batch stored after
    its partition's index was closed (``stored``). Either discards that index. Why keep
    it: a build reads the whole partition in one batch, ~1.1 µs an entry, so ~8 minutes
    for a day of ids at 5,000/s, at every rebalance and start (docs/performance.md,
    "The dedupe expiry kept across moves"). Why in steps: a build in one batch held
    the event loop and the batch's transaction for as long (docs/delivery.md, AP).
    ``decode(raw)`` gives ``(at, seq)`` of a stored value, or None for a value that
    does not expire."""

    #: Table keys a build step reads at least (~1.1 µs each); a batch of many records
    #: reads as many keys as it may expire entries, so a backlog's large batches do
    #: not slow the build down.
    BUILD_STEP = 1_000

    def __init__(self, decode: Callable[[bytes], tuple[float, int] | None],
                 folder: Callable[[], Path | None] | None = None,
                 owns: Callable[[bytes], bool] | None = None) -> None:
        self.decode = decode
        #: Which stored keys are this expiry's (None: all): a build takes only those.
        self.owns = owns
        #: Whether an index closed to be kept may be reopened (False: always built).
        self.reopen_kept = True
        #: Where the ``ExpiryIndex`` of partition N lives (``folder()/N``); None: in memory.
        self.folder = folder
        self.queues: dict[int, ExpiryQueue | ExpiryIndex] = {}
        #: Partitions whose table was written without their index since it was closed.
        self.changed: set[int] = set()
        #: Indexes built from the store, and reopened, since the start (``describe``).
        self.built = self.reopened = 0

    def _path(self, partition: int) -> Path | None:
        folder = self.folder() if self.folder is not None else None
        return None if folder is None else folder / str(partition)

    def ensure(self, partition: int, store: Any) -> ExpiryQueue | ExpiryIndex:
        """The queue of ``partition``: open already, reopened, or built from the store."""
        queue = self.queues.get(partition)
        if queue is not None:
            return queue
        path = self._path(partition)
        if path is None:
            queue = ExpiryQueue(sorted(self._table_entries(partition, store)[0]))
            self.built += 1
        else:
            queue = None if partition in self.changed or not self.reopen_kept else ExpiryIndex.reopen(path)
            if queue is None:
                queue = ExpiryIndex(path, building=True)
                self.built += 1
            else:
                self.reopened += 1
        self.changed.discard(partition)
        self.queues[partition] = queue
        return queue

    def build_some(self, partition: int, store: Any, keys: int = 0) -> bool:
        """One step of the build of ``partition``'s open index, ``keys`` table keys read
        (at least ``BUILD_STEP``): True once it is built.

        Steps need no snapshot of the table: a key written after the step that read it
        reaches the index through ``stored``, and one written before the step that
        reaches it is read there (an entry twice is harmless: expiry deletes a key only
        while it holds the value that entry's record wrote)."""
        index = self.queues[partition]
        start = index.building_from
        if start is None:
            return True
        entries, next_start = self._table_entries(partition, store, start, max(keys, self.BUILD_STEP))
        index.found(entries)  # first: should it fail, the next step reads them again
        index.building_from = next_start
        return next_start is None

    def _table_entries(self, partition: int, store: Any, start: bytes = b"",
                       limit: int | None = None) -> tuple[list[tuple[float, int, bytes]], bytes | None]:
        """The entries of the table keys from ``start`` on, at most ``limit`` keys, and
        the key to go on from (None: the partition was read to its end)."""
        decode, owns = self.decode, self.owns
        entries: list[tuple[float, int, bytes]] = []
        for n, (key, raw) in enumerate(store.scan_partition(partition, start)):
            if n == limit:
                return entries, key
            if owns is not None and not owns(key):
                continue
            try:
                found = decode(raw)
            except (ValueError, TypeError, IndexError):
                continue
            if found is not None:
                entries.append((found[0], found[1], key))
        return entries, None

    def stored(self, partition: int, values: dict[bytes, Any]) -> None:
        """``values`` (key -> ``(at, seq)``, or None: deleted) were just stored in
        ``partition``. Its queue closed meanwhile (partitions moved): discarded, as the
        store holds more than it."""
        queue = self.queues.get(partition)
        if queue is not None:
            queue.stored(values)
        else:
            self._discard(partition)

    async def restored(self, event: Any) -> None:
        """A changelog record of ``event``'s partition is being written to the table by
        Faust's recovery: that partition's index no longer covers the table."""
        self._discard(event.message.partition)

    def _discard(self, partition: int) -> None:
        seen = partition in self.changed
        self.changed.add(partition)  # first: whatever fails below, it is not reopened
        queue = self.queues.pop(partition, None)
        if queue is not None:
            queue.close()
        elif not seen:  # once: a standby copy sees every record
            path = self._path(partition)
            if path is not None:
                ExpiryIndex.discard(path)

    def describe(self) -> dict[str, Any]:
        """Indexes built from the store and reopened since the start, the open ones
        still being built, and the entries of the open ones."""
        return {"indexes_built": self.built, "indexes_reopened": self.reopened,
                "indexes_building": sum(queue.building_from is not None for queue in self.queues.values()),
                "entries": sum(len(queue) for queue in self.queues.values())}

    def discard_all(self) -> None:
        """A store failed after entries left the open indexes: build them all again."""
        for partition in list(self.queues):
            self._discard(partition)

    def forget(self) -> None:
        """Partitions moved, or the worker stops: each index is closed to be reopened
        (``ensure``), each queue in memory dropped (built again from the store)."""
        for queue in self.queues.values():
            queue.close(keep=True)
        self.queues.clear()


class DedupeCache:
    """The write-back cache of state written per batch, not per commit: a pipeline's
    dedupe entries (agents/pipeline.py), which must reach the store once the batch's
    outputs are acknowledged and before the batch is acked, while the next batch
    already reads and changes them. Registered with the commit protocol like a
    ``WriteBackCache``; a commit has nothing of it to write (``flush``: every entry is
    written by its batch).

    Laid out for a per-record path: one dict of stored key -> value per partition
    (``values_of``: the caller writes into it directly, no call per entry), and the
    detached batches as whole layers (partition -> that dict), read newest first
    (``layers_of``) and released as a whole (``release``), never key by key.
    ``expiry``: what expires the entries (an ``Expiry``, or the pipeline's one per
    dedupe step: ``discard_all``, ``forget``), forgotten when partitions move."""

    def __init__(self, expiry: Any = None) -> None:
        self.store: Any = None
        self.expiry = expiry
        #: partition -> the current batch's changes there.
        self.current: dict[int, dict[bytes, Any]] = {}
        #: Detached batches not written yet, oldest first (``detach``).
        self.layers: list[dict[int, dict[bytes, Any]]] = []
        self.failed = False

    def values_of(self, partition: int) -> dict[bytes, Any]:
        """The current batch's changes in ``partition`` (a dict the caller may write)."""
        values = self.current.get(partition)
        if values is None:
            values = self.current[partition] = {}
        return values

    def layers_of(self, partition: int) -> list[dict[bytes, Any]]:
        """``partition``'s changes of the detached batches not written yet, newest first."""
        return [layer[partition] for layer in reversed(self.layers) if partition in layer]

    def detach(self) -> dict[int, dict[bytes, Any]]:
        """Take the current batch's changes (partition -> key -> value) for the caller to
        write; they stay readable (``layers_of``) until ``release``. Empty: none."""
        layer = {p: values for p, values in self.current.items() if values}
        self.current = {}
        if layer:
            self.layers.append(layer)
        return layer

    def release(self, layer: dict[int, dict[bytes, Any]]) -> None:
        """``layer`` (from ``detach``) is in the store now: reads go there."""
        self.layers = [other for other in self.layers if other is not layer]  # identity

    def held(self, partition: int, key: bytes) -> bool:
        """True while a detached change of ``key`` is not written yet."""
        return any(key in layer[partition] for layer in self.layers if partition in layer)

    def over_dirty_limit(self) -> bool:
        """Never: nothing waits for a commit (see ``flush``)."""
        return False

    async def flush(self) -> None:
        """Nothing waits for a commit (each batch writes its own changes); after ``fail``
        a flush (so a commit) raises, as a failed ``WriteBackCache``'s does."""
        if self.failed:
            raise RuntimeError("a batch failed half-way: not writing its dedupe entries")

    def pending(self) -> bool:
        return False

    def fail(self) -> None:
        """A batch failed half-way: its changes admitted records whose outputs were never
        sent, so they are dropped and never written; the worker replays the batch. Its
        expired entries left the expiry indexes but stay in the store: rebuilt."""
        self.failed = True
        self.current = {}
        if self.expiry is not None:
            self.expiry.discard_all()

    def drop_unflushed(self) -> None:
        """Nothing is held for a commit (see ``flush``)."""

    def moved(self) -> None:
        """Partitions moved: each partition's expiry index is closed, to be reopened or
        rebuilt the next time it is used (``Expiry``)."""
        self.close_indexes()

    def close_indexes(self, keep: bool = True) -> None:
        """Close the expiry's open indexes, kept to be reopened unless told not to, or
        unless a batch's writes are not all stored (a failed or cancelled store, a batch
        cut short): its expired entries left the indexes while their deletes were never
        written, so the indexes are built again."""
        if self.expiry is None:
            return
        if not keep or self.failed or self.layers or any(self.current.values()):
            self.expiry.discard_all()
        self.expiry.forget()


__all__ = ["AtPartition", "CacheSnapshot", "DedupeCache", "Expiry", "ExpiryIndex", "ExpiryQueue", "MemoryStore", "PartitionStore", "StoreWrites", "WriteBackCache",
           "as_current", "partition_db", "set_current_event"]
