"""A per-key write-back cache for window state, flushed before each offset commit.

Writing one RocksDB put and one changelog record per event per window is what makes
naive windowed aggregation slow. Like Kafka Streams' record cache, this buffer keeps
each key's decoded state in memory, lets any number of events update it, and hands
back each *dirty* key once when the caller flushes (the window agent: before each
offset commit, or per batch under exactly_once; so a commit never covers an unflushed
update). Clean entries stay cached for the next batch up to ``max_entries``; the caller
must ``clear()`` it whenever partitions move (another worker may change that state).

Pure: the loader and the writer are callables given by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any


class WriteBackBuffer:
    """Cached state per key, with a dirty set and the partition each key belongs to."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.cached: dict[Hashable, Any] = {}
        self.dirty_keys: dict[Hashable, int] = {}  # key -> partition it must be written to
        #: Keys whose values a write in flight is storing (taken from ``dirty_keys``, with
        #: their partitions): kept cached until it is done, since the store does not
        #: hold them yet.
        self._writing: dict[Hashable, int] = {}
        self.loads = 0
        self.writes = 0
        self.updates = 0

    def __len__(self) -> int:
        return len(self.cached)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.cached

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The cached value of ``key``, loading it with ``load()`` on a miss."""
        try:
            return self.cached[key]
        except KeyError:
            self.loads += 1
            value = self.cached[key] = load()
            return value

    def put(self, key: Hashable, value: Any, partition: int) -> None:
        """Set (or mark as changed in place) the value of ``key``, owned by ``partition``."""
        self.cached[key] = value
        self.dirty_keys[key] = partition
        self.updates += 1

    @property
    def dirty_count(self) -> int:
        """How many keys a flush would write now."""
        return len(self.dirty_keys)

    def drain(self) -> Iterator[tuple[Hashable, Any, int]]:
        """Yield (key, value, partition) once per dirty key, marking each clean."""
        dirty, self.dirty_keys = self.dirty_keys, {}
        for key, partition in dirty.items():
            self.writes += 1
            yield key, self.cached[key], partition
        self._evict()

    def take_dirty(self) -> list[tuple[Hashable, Any, int]]:
        """Every dirty (key, value, partition), marking them clean: a flush that writes
        them asynchronously; ``restore_dirty`` them if that write fails."""
        dirty, self.dirty_keys = self.dirty_keys, {}
        values = self.cached
        taken = [(key, values[key], partition) for key, partition in dirty.items()]
        self.writes += len(taken)
        self._evict()
        return taken

    def restore_dirty(self, taken: list[tuple[Hashable, Any, int]]) -> None:
        """Mark what ``take_dirty`` returned dirty again (the write did not happen).
        A key updated meanwhile keeps its newer value (and stays dirty)."""
        for key, value, partition in taken:
            self.cached.setdefault(key, value)
            self.dirty_keys.setdefault(key, partition)
            self.writes -= 1

    def flush(self, write: Callable[[Hashable, Any, int], None]) -> int:
        """Write every dirty key once with ``write(key, value, partition)``; returns how many."""
        n = 0
        for key, value, partition in self.drain():
            write(key, value, partition)
            n += 1
        return n

    def _evict(self) -> None:
        # Oldest-inserted clean entries go first; dirty ones never (they are not written
        # yet), nor those a write in flight is storing.
        excess = len(self.cached) - self.max_entries
        if excess <= 0:
            return
        writing = self._writing
        for key in list(self.cached):
            if excess <= 0:
                break
            if key not in self.dirty_keys and key not in writing:
                del self.cached[key]
                excess -= 1

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` from the cache (not from the store)."""
        self.cached.pop(key, None)
        self.dirty_keys.pop(key, None)

    def clear(self) -> None:
        """Drop every cached value but those a write in flight is storing (the store
        lacks them until it ends; ``moved`` clears again after it); dirty ones must have
        been flushed first."""
        if self.dirty_keys:
            raise RuntimeError(f"{len(self.dirty_keys)} unwritten (dirty) keys would be lost; flush first")
        writing = self._writing
        if not writing:
            self.cached.clear()
            return
        for key in [key for key in self.cached if key not in writing]:
            del self.cached[key]
