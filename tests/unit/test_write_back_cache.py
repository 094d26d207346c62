"""tables.store.WriteBackCache's detached changes (what a pipeline's dedupe entries use,
agents/pipeline.py): a batch's changes taken by ``detach`` stay readable and are never
evicted until ``written``, even when a commit's flush evicts clean entries meanwhile;
an evicted detached entry would let the next batch admit a duplicate."""

from __future__ import annotations

import asyncio

from tables.store import MemoryStore, WriteBackCache


def test_detached_changes_stay_cached_until_written():
    store = MemoryStore()
    cache = WriteBackCache(store, max_entries=0)
    cache.put(b"a", [1, 0], 0)
    layer = cache.detach()
    assert layer == [(b"a", [1, 0], 0)] and cache.dirty_count == 0 and cache.held(b"a")
    assert cache.layers == [layer] and cache.detach() == []
    cache.put(b"b", [2, 1], 1)
    asyncio.run(cache.flush())  # a commit: writes b, then evicts clean entries
    assert store.data == {1: {b"b": b"[2,1]"}}
    assert cache.peek(b"a") == [1, 0] and cache.peek(b"b") is None
    cache.written(layer)
    assert cache.peek(b"a") is None and cache.layers == [] and not cache.held(b"a")


def test_a_key_detached_twice_stays_until_both_are_written():
    cache = WriteBackCache(MemoryStore(), max_entries=0)
    cache.put(b"a", 1, 0)
    first = cache.detach()
    cache.put(b"a", 2, 0)
    second = cache.detach()
    assert first == [(b"a", 1, 0)] and second == [(b"a", 2, 0)]
    cache.written(first)
    assert cache.peek(b"a") == 2 and cache.held(b"a")
    cache.written(second)
    assert cache.peek(b"a") is None
