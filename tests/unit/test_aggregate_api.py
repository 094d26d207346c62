"""The owner side of POST /api/v1/aggregate (agents/aggregate_api.py), without a broker:
a request id seen before is answered from the state and not applied again (the replay
protection the Kafka request topic's offsets gave before), and a batch of requests that
arrived together is folded in arrival order, each answer seeing the ones before it, and
stored with one write per key."""

from __future__ import annotations

import asyncio

import pytest

from agents import aggregate_api as A
from app.models.windows import AggregateRequest
from app.windows import parse_api_spec

BODY = {"window_id": "clicks", "window_size": 100, "aggregation": "sum", "value_key": "v"}


def add(v: int, window_id: str = "clicks") -> AggregateRequest:
    return AggregateRequest(op="add", window_id=window_id, spec=parse_api_spec({**BODY, "window_id": window_id}),
                            record={"v": v})


def test_a_replayed_request_id_is_answered_not_applied_again():
    reply1, state = A.handle(add(3), None, "id-1", 0)
    assert reply1["value"] == 3 and state is not None
    reply2, state = A.handle(add(4), state, "id-2", 0)
    assert reply2["value"] == 7
    # The last request again: its own answer, nothing to store.
    again, new = A.handle(add(4), state, "id-2", 0)
    assert again == reply2 and new is None
    # An older one again: the current view, nothing to store, the sum unchanged.
    older, new = A.handle(add(3), state, "id-1", 0)
    assert new is None and older["windows"][0]["aggregates"] == {"sum": 7}


def test_only_the_last_ids_are_remembered():
    state = None
    for i in range(A.KEEP_IDS + 5):
        _, state = A.handle(add(1), state, f"id-{i}", 0)
    assert len(state["ids"]) == A.KEEP_IDS and state["ids"][-1] == f"id-{A.KEEP_IDS + 4}"


class FakeStore:
    def __init__(self) -> None:
        self.data: dict[bytes, object] = {}

    def at(self, partition: int) -> int:
        return partition

    def read(self, at: int, key: bytes) -> object:
        return self.data.get(key)


@pytest.fixture
def owner(monkeypatch):
    fake = FakeStore()
    monkeypatch.setattr(A, "store", fake)
    owner = A.Owner()
    writes: list[list[tuple[bytes, dict]]] = []

    class Writer:
        """The owner's state writer (``app.commit.OwnerStateWriter``): records each write."""

        async def write(self, partition: int, items: list) -> None:
            writes.append(items)
            fake.data.update(items)

    owner.writer = Writer()
    monkeypatch.setattr(owner, "owns", lambda partition: True)
    return owner, writes


def test_a_batch_is_folded_in_order_and_stored_once_per_key(owner):
    owner, writes = owner
    batch = [(add(1), "a", None), (add(2), "b", None), (add(10, "other"), "c", None),
             (add(3), "d", None), (add(3), "d", None)]  # the last one a replay within the batch
    replies = asyncio.run(owner._apply_batch(0, batch))
    assert [r["value"] for r in replies] == [1, 3, 10, 6, 6]
    assert len(writes) == 1 and sorted(k for k, _ in writes[0]) == [b"clicks", b"other"]
    state = dict(writes[0])[b"clicks"]
    assert state["ids"] == ["a", "b", "d"] and state["last"] == replies[-1]


def test_concurrent_requests_share_batches_and_each_gets_its_answer(owner):
    owner, writes = owner

    async def go() -> list:
        return await asyncio.gather(*(owner.apply(add(v), f"id-{v}") for v in range(1, 9)))

    replies = asyncio.run(go())
    assert sorted(r["value"] for r in replies) == [sum(range(1, v + 1)) for v in range(1, 9)]
    assert replies[-1]["value"] == 36
    assert len(writes) < 8  # later arrivals were folded into one batch
