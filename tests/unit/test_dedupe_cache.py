"""tables.store.DedupeCache, where a pipeline's dedupe entries wait to be stored
(agents/pipeline.py): a batch's changes taken by ``detach`` stay readable, newest
first, until ``release``; a key changed again by a later batch reads as the later
value until both are stored. A released layer too early, or layers read oldest first,
would let the next batch admit a duplicate (or judge an id by a stale time)."""

from __future__ import annotations

import asyncio

import pytest

from tables.store import DedupeCache


def test_detached_changes_stay_readable_until_released():
    cache = DedupeCache()
    cache.values_of(0)[b"a"] = [1, 0]
    cache.values_of(1)  # a partition with no change is not part of the layer
    layer = cache.detach()
    assert layer == {0: {b"a": [1, 0]}} and cache.layers == [layer] and cache.detach() == {}
    assert cache.held(0, b"a") and not cache.held(1, b"a")
    assert cache.layers_of(0) == [{b"a": [1, 0]}] and cache.layers_of(1) == []
    cache.release(layer)
    assert cache.layers == [] and not cache.held(0, b"a") and cache.layers_of(0) == []


def test_a_key_detached_twice_reads_newest_first_until_both_are_released():
    cache = DedupeCache()
    cache.values_of(0)[b"a"] = 1
    first = cache.detach()
    cache.values_of(0)[b"a"] = 2
    second = cache.detach()
    assert [values[b"a"] for values in cache.layers_of(0)] == [2, 1]
    cache.release(first)
    assert cache.layers_of(0) == [{b"a": 2}] and cache.held(0, b"a")
    cache.release(second)
    assert not cache.held(0, b"a")


def test_a_failed_cache_drops_the_batch_and_refuses_to_flush():
    cache = DedupeCache()
    asyncio.run(cache.flush())  # nothing waits for a commit
    cache.values_of(0)[b"a"] = 1
    cache.fail()
    assert cache.detach() == {}
    with pytest.raises(RuntimeError, match="not writing"):
        asyncio.run(cache.flush())
