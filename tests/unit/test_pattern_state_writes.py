"""The pattern engine's state writes without a broker: under at_least_once a changed
state stays in the cache, unwritten, until ``flush_states`` (the before-commit hook),
so a key changed by several batches is written once; a failed batch blocks every later
flush (and so every commit); a failed flush keeps the states unwritten; revoke writes
them before the cache is dropped. Under exactly_once each batch writes its states."""

from __future__ import annotations

import asyncio

import orjson
import pytest

import agents.patterns as engine
from app.patterns import EngineConfig, parse_definition
from tables.patterns import StateCache

DEFS = [
    {"name": "t-big", "type": "threshold", "key_by": "card", "source": "tx", "where": "value > 90"},
    {"name": "t-burst", "type": "frequency", "key_by": "card", "source": "tx",
     "where": "value > 0", "count": 3, "within": 60},
]


class Rec:
    __slots__ = ("topic", "partition", "offset")

    def __init__(self, partition, offset):
        self.topic, self.partition, self.offset = "tx", partition, offset

    @property
    def message(self):
        return self


class Store:
    """A PartitionStore stand-in: decoded reads, encoded writes, one list per call."""

    def __init__(self):
        self.data, self.calls, self.fail = {}, [], False

    def read(self, event, key):
        raw = self.data.get((event.message.partition, key))
        return None if raw is None else orjson.loads(raw)

    def at(self, partition):
        return Rec(partition, -1)

    async def write_many(self, items):
        if self.fail:
            raise RuntimeError("changelog unreachable")
        self.calls.append([(ev.message.partition, key) for ev, key, _ in items])
        for ev, key, value in items:
            self.data[(ev.message.partition, key)] = value if isinstance(value, bytes) else orjson.dumps(value)

    async def write_partitions(self, items, str_keys=False):
        await self.write_many([(self.at(p), key, value) for p, key, value in items])


@pytest.fixture
def env(monkeypatch):
    store, counts, sent = Store(), Store(), []
    patterns = {d["name"]: parse_definition(d, EngineConfig(sources=("tx",)), "runtime") for d in DEFS}
    monkeypatch.setattr(engine.catalog, "runtime", patterns)
    monkeypatch.setattr(engine, "state_store", store)
    monkeypatch.setattr(engine, "count_store", counts)
    monkeypatch.setattr(engine, "timer_store", Store())
    monkeypatch.setattr(engine, "state_cache", StateCache(1000))
    monkeypatch.setattr(engine, "current_assignment", lambda: frozenset({"tx-0", "tx-1"}))
    monkeypatch.setattr(engine, "defers_state_writes", lambda: True)

    async def send_alerts(alerts):
        if sent is None:
            raise RuntimeError
        sent.append([orjson.loads(v)["pattern"] for _, _, v in alerts])

    monkeypatch.setattr(engine, "send_alerts", send_alerts)
    return store, sent, monkeypatch


def items(partition, offset, card, value, ts):
    rec = Rec(partition, offset)
    event = {"card": card, "value": value, "ts": ts, "event_id": f"{card}-{offset}"}
    return engine.Item(rec, f"card={card}", "card", card, "tx", "tx", offset, event, ts, event["event_id"])


def batches():
    """Three batches; cards c1 (partition 0) and c2 (partition 1) in every one."""
    return [[items(0, b * 2 + i, "c1", 10 + b + i, 100.0 + b * 2 + i) for i in range(2)]
            + [items(1, b, "c2", 95, 100.0 + b)] for b in range(3)]


def run(coro):
    return asyncio.run(coro)


def test_a_key_changed_by_several_batches_is_written_once_at_the_flush(env):
    store, sent, _ = env
    for batch in batches():
        run(engine.apply_items(batch))
    assert store.calls == []  # nothing written per batch
    assert sent[0] == ["t-big"]  # the alerts still go out with their batch
    assert len(sent) == 3 and "t-burst" in sent[1]
    run(engine.flush_states())
    keys = sorted(k for call in store.calls for k in call)
    assert keys == [(0, b'"card=c1"'), (1, b'"card=c2"')]  # once each
    assert not engine.state_cache.dirty
    run(engine.flush_states())  # nothing left: no second write
    assert len(store.calls) == 1


def test_the_flushed_states_are_those_per_batch_writes_end_with(env):
    store, _, monkeypatch = env
    for batch in batches():
        run(engine.apply_items(batch))
    run(engine.flush_states())
    deferred = dict(store.data)
    per_batch = Store()
    monkeypatch.setattr(engine, "state_store", per_batch)
    monkeypatch.setattr(engine, "state_cache", StateCache(1000))
    monkeypatch.setattr(engine, "defers_state_writes", lambda: False)  # exactly_once
    for batch in batches():
        run(engine.apply_items(batch))
    assert len(per_batch.calls) == 3  # every batch writes its keys
    assert per_batch.data == deferred
    assert orjson.loads(deferred[(0, b'"card=c1"')])["o"] == {"tx": 5}


def test_a_failed_batch_blocks_every_later_flush(env):
    store, sent, monkeypatch = env
    first, second, _ = batches()
    run(engine.apply_items(first))
    monkeypatch.setattr(engine, "send_alerts", _failing_send)
    with pytest.raises(RuntimeError, match="alerts"):
        run(engine.apply_items(second))
    # The cached states hold the failed batch's changes: neither they nor the first
    # batch's may be written, so the commit fails and a restart replays both.
    with pytest.raises(RuntimeError, match="failed"):
        run(engine.flush_states())
    assert store.calls == []


async def _failing_send(alerts):
    raise RuntimeError("alerts not acknowledged")


def test_a_failed_flush_keeps_the_states_unwritten(env):
    store, _, _ = env
    first, second, _ = batches()
    run(engine.apply_items(first))
    store.fail = True
    with pytest.raises(RuntimeError, match="unreachable"):
        run(engine.flush_states())
    run(engine.apply_items(second))
    store.fail = False
    run(engine.flush_states())
    assert sorted(store.calls[0]) == [(0, b'"card=c1"'), (1, b'"card=c2"')]
    assert orjson.loads(store.data[(0, b'"card=c1"')])["o"] == {"tx": 3}


def test_revoke_writes_the_states_before_dropping_the_cache(env):
    """The commit protocol's revoke/assign step (app.commit) writes a registered
    cache's states, then drops the cache."""
    from app.commit import CommitProtocol, MemoryEmitter

    store, _, _ = env
    run(engine.apply_items(batches()[0]))
    engine.state_cache.store = store
    protocol = CommitProtocol(MemoryEmitter())
    protocol.register(engine.state_cache)
    run(protocol.partitions_moved())
    assert len(store.calls) == 1 and not engine.state_cache.entries


def test_too_many_unwritten_states_are_flushed_in_the_batch(env):
    store, _, monkeypatch = env
    monkeypatch.setattr(engine, "state_cache", StateCache(4))  # flushes at 2 unwritten
    run(engine.apply_items(batches()[0]))
    assert len(store.calls) == 1 and not engine.state_cache.dirty


def test_the_cache_never_drops_an_unwritten_state():
    cache = StateCache(2)
    cache.put_dirty(0, b"a", {"x": 1})
    cache.put(0, b"b", {"x": 2})
    cache.put(0, b"c", {"x": 3})  # full: starts over, but keeps the unwritten one
    assert cache.entries == {(0, b"a"): {"x": 1}, (0, b"c"): {"x": 3}}
    with pytest.raises(RuntimeError, match="unwritten"):
        cache.clear()
    with pytest.raises(RuntimeError, match="unwritten"):
        cache.check(frozenset({"other"}))
    cache.fail()
    assert cache.failed and not cache.entries and not cache.dirty


def test_the_flush_hook_is_registered_with_the_first_unwritten_state_and_once(env):
    """The one commit hook (the commit protocol's, which flushes the pattern cache with
    every other registered one) is hooked with the first unwritten state, once."""
    from app.commit import commit_protocol
    from app.transport import commit_guard

    _, _, monkeypatch = env
    monkeypatch.setattr(commit_guard, "before_commit", [])  # a worker whose engine matched nothing yet
    run(engine.apply_items(batches()[0]))
    assert commit_guard.before_commit == [commit_protocol.begin_commit]  # before the batch's ack
    run(engine.apply_items(batches()[1]))
    assert commit_guard.before_commit == [commit_protocol.begin_commit]


def test_a_worker_whose_session_lapsed_does_not_write_its_cached_states_at_revocation(env):
    """Issue 23 (docs/delivery.md, P): a worker woken after its session lapsed wrote
    the states it had cached before the pause over the new owner's newer ones. Now
    they are dropped: their offsets were never committed."""
    from app.commit import CommitProtocol, MemoryEmitter

    class Lapsed:
        before_commit: list = []

        def session_lapsed(self) -> bool:
            return True

    store, _, _ = env
    run(engine.apply_items(batches()[0]))
    engine.state_cache.store = store
    protocol = CommitProtocol(MemoryEmitter(), guard=Lapsed())
    protocol.register(engine.state_cache)
    run(protocol.partitions_moved())
    assert store.calls == [] and not engine.state_cache.entries and not engine.state_cache.dirty
