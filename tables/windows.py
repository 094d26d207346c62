"""Window state tables: one changelog-backed RocksDB table per configured window, and
one for the aggregate API.

Why a plain table and not Faust's windowed tables: Faust's ``.tumbling()`` /
``.hopping()`` cannot express sessions, count windows, merging or late-record routing.
Here each key's value is the JSON of all its open windows (``operators.windows``), so
every window type is stored the same way, and one put per key covers all its windows.

Writes happen once per key per batch (the agent's write-back buffer), not per event,
so a write is not inside the event that caused it. Faust picks the RocksDB partition
and the changelog partition from the *current event*; ``PartitionStore`` makes the
event of the right partition current for each read/write, which keeps a key's state
in the partition its records come from (co-partitioned with the input topic).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust
import orjson
from faust.types import TP
from rocksdict import WriteBatch

from app import app, settings
from app.kafka_io import kafka_io
from app.startup import config
from app.transport import as_current_event as as_current
from app.transport import partition_db
from app.windows import WindowDef

#: Per-partition bookkeeping (stream time, late count) lives under this key prefix,
#: which no record key can produce (keys are UTF-8 text of a JSON scalar).
META_PREFIX = b"\x00meta:"


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

    def _partition_db(self, partition: int) -> Any:
        """The RocksDB (rocksdict) of one partition, or None for another kind of store.

        Why: a read through ``Table.get`` costs ~10 µs (key serializer registry, two
        lookups for ``__contains__`` then ``__getitem__``, sensors); reading the
        partition's rocksdict directly costs ~1 µs. Keys and values are raw bytes
        (RAW_SCHEMA), so the bytes Faust would store are exactly these."""
        return partition_db(self.table, partition)

    def read(self, event: Any, key: bytes) -> Any:
        """The decoded value of ``key`` in ``event``'s partition, or None."""
        db = self._partition_db(event.message.partition)
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
        """Store many (event, key, JSON value or its encoded bytes): the flush of a
        write-back buffer.

        Under at_least_once the changelog records go out as pipelined record batches,
        one per partition, acknowledged *before* the local RocksDB writes, one
        ``WriteBatch`` per partition (``StoreWrites``). Under exactly_once every write
        goes through Faust, inside the transaction, and Faust's producer buffer is
        drained before this returns.
        """
        if not items:
            return
        dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
        if settings.processing_guarantee != "at_least_once" or not kafka_io.ready.is_set():
            for ev, key, value in items:
                with as_current(ev):
                    self.table[key] = value if value.__class__ is bytes else dumps(value, option=option)
            if app.in_transaction:
                # Faust's table writes only enter its producer buffer (send_soon), and
                # its transactional commit does not flush that buffer (its at_least_once
                # commit does): a commit right after this batch could commit its offsets
                # while these writes went into the *next* transaction, which a kill -9
                # aborts (found by the windows' exactly_once kill test; docs/windows.md).
                # Drained here, inside the batch, they join this batch's transaction.
                await app.producer.flush()
            return
        # Explicit partitions: a key's changelog record goes to the partition it is
        # stored in (the partition of the record that changed it). A bytes value is
        # JSON the caller encoded already (bytes are not JSON values, so nothing else
        # can be meant): the pattern engine encodes its states without
        # OPT_NON_STR_KEYS, which costs about twice as much.
        writes = StoreWrites(self)
        put = writes.put
        for ev, key, value in items:
            put(ev.message.partition, key, value if value.__class__ is bytes else dumps(value, option=option))
        await writes.store()

    async def write_partitions(self, items: list[tuple[int, bytes, Any]], str_keys: bool = False) -> None:
        """Store many (partition, key, JSON value): ``write_many`` addressed by partition
        number instead of by an event (what a write-back buffer flushed at commit time
        knows), with the same order and guarantees. ``str_keys``: the caller expects
        every dict key in the values to be a string, so orjson's ``OPT_NON_STR_KEYS``
        (a third to a half of the encoding cost) is left out, except for a value where
        that fails; the bytes are the same."""
        if not items:
            return
        if (settings.processing_guarantee == "at_least_once" and not kafka_io.ready.is_set()
                and not kafka_io.should_stop):
            # Starting up: wait for the batch producer rather than take Faust's
            # per-record path (several times the cost); while stopping, Faust's path.
            await kafka_io.ready.wait()
        if settings.processing_guarantee == "at_least_once" and kafka_io.ready.is_set():
            # Encoded straight into the changelog batches and RocksDB write batches
            # (StoreWrites), no event object per item.
            dumps, option = orjson.dumps, 0 if str_keys else orjson.OPT_NON_STR_KEYS
            writes = StoreWrites(self)
            put = writes.put
            for partition, key, value in items:
                try:
                    raw = dumps(value, option=option)
                except TypeError:  # a non-string dict key after all (str_keys)
                    raw = dumps(value, option=orjson.OPT_NON_STR_KEYS)
                put(partition, key, raw)
            await writes.store()
            return
        at = {p: self.at(p) for p in {p for p, _, _ in items}}
        await self.write_many([(at[p], key, value) for p, key, value in items])

    def at(self, partition: int) -> AtPartition:
        """A stand-in current event of ``partition`` of the source topic (or, with no
        source topic given, of the changelog, which has the same partition count)."""
        return AtPartition(partition, self.source_topic or self.table.changelog_topic.get_topic_name())

    def delete(self, event: Any, key: bytes) -> None:
        """Remove ``key`` (a changelog tombstone)."""
        with as_current(event):
            if key in self.table:
                del self.table[key]

    def scan(self) -> Iterator[tuple[bytes, Any]]:
        """Every (key, decoded value) of the partitions this worker holds now."""
        for key, raw in self.table.items():
            if raw is not None:
                yield key, orjson.loads(raw)


class _HeldWrites(list):
    """One partition's writes to a store that is not RocksDB, held until written."""

    def put(self, key: bytes, raw: bytes) -> None:
        self.append((key, raw))


class StoreWrites:
    """One at_least_once flush of a ``PartitionStore``: each encoded value goes straight
    into its partition's changelog record batch and RocksDB ``WriteBatch`` (both copy
    it), so no encoded value is held until the flush ends; ``store`` then sends the
    changelog, awaits its acks, writes RocksDB and records the changelog offsets.

    Order, as Faust's own: a crash leaves either both or only the changelog (which
    recovery replays), never a local write the changelog lacks. Why batches: Faust's
    per-record changelog path costs several times more per record, and a RocksDB put
    per key ~3 µs against ~0.7 µs in a batch. Why not hold (key, value) pairs until
    then: 0.97 against 0.32 µs to encode a dedupe entry with the copy that holding
    orjson's output needs (``app.codec.dumps_held``), plus a tuple and a list slot."""

    __slots__ = ("target", "changelog", "local")

    def __init__(self, target: PartitionStore) -> None:
        self.target = target
        self.changelog = kafka_io.record_batches()
        #: partition -> its RocksDB WriteBatch (or _HeldWrites for another store kind)
        self.local: dict[int, Any] = {}

    def put(self, partition: int, key: bytes, raw: bytes) -> None:
        self.changelog.add(partition, key, raw)
        local = self.local.get(partition)
        if local is None:
            db = self.target._partition_db(partition)
            local = self.local[partition] = _HeldWrites() if db is None else WriteBatch(raw_mode=True)
        local.put(key, raw)

    async def store(self) -> None:
        table = self.target.table
        topic = table.changelog_topic.get_topic_name()
        last = await (await self.changelog.start(topic))
        for partition, local in self.local.items():
            if local.__class__ is _HeldWrites:
                with as_current(self.target.at(partition)):
                    for key, raw in local:
                        table.data[key] = raw
                continue
            # Faust's RocksDB ``Store._set`` minus the current-event lookup and its
            # key→partition LRU (a hint for reads outside a stream, which then look in
            # each partition's database instead), one write for the whole batch.
            self.target._partition_db(partition).write(local)
        for partition, offset in last.items():
            table.data.set_persisted_offset(TP(topic, partition), offset)


def meta_key(partition: int) -> bytes:
    """The key of one partition's bookkeeping value."""
    return META_PREFIX + str(partition).encode()


#: Keys and values are bytes we encode ourselves (orjson), never Faust's codecs.
RAW_SCHEMA = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw")


def _table(name: str) -> Any:
    return app.Table(
        name,
        default=None,
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        schema=RAW_SCHEMA,
        help=f"window state: {name}",
    )


#: Every configured window (read and checked at start-up: app/startup.py).
WINDOW_DEFS: list[WindowDef] = list(config().windows)

#: name -> table holding that window's per-key state.
window_tables: dict[str, Any] = {d.name: _table(f"window-{d.name}") for d in WINDOW_DEFS}

#: window_id -> {"spec", "state", "st", "closed", "o"} of the aggregate API.
api_windows = _table("aggregate-api")

__all__ = ["META_PREFIX", "AtPartition", "PartitionStore", "WINDOW_DEFS", "api_windows", "as_current",
           "meta_key", "window_tables"]
