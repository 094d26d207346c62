"""A worker whose group session lapsed never registers a transactional producer
(issue 23, docs/delivery.md AC): registration (InitProducerId) fences the id's current
holder, the partition's new owner. The check sits in aiokafka's sender, right before the
request, so a worker paused in the middle of a registration cannot send it when woken."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from aiokafka.producer.sender import Sender
from aiokafka.producer.transaction_manager import TransactionManager

from app.transport import ZombieRestart, commit_guard, install


class FakeClient:
    _client_id = "test"

    def __init__(self) -> None:
        self.requests: list = []

    async def send(self, node_id, request, group=None):
        self.requests.append(request)
        return SimpleNamespace(error_code=0, producer_id=7, producer_epoch=3)


def register(transactional_id: str | None) -> tuple[SimpleNamespace, object]:
    """A sender (what ``_do_init_pid`` reads of one) and the result of its registration
    (or the exception it raised)."""
    async def run() -> tuple[SimpleNamespace, object]:
        s = SimpleNamespace(_txn_manager=TransactionManager(transactional_id, 60_000),
                            _retry_backoff=0.1, client=FakeClient())
        try:
            return s, await Sender._do_init_pid(s, 1)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return s, exc
    return asyncio.run(run())


@pytest.fixture
def session(monkeypatch):
    install()
    monkeypatch.setattr(commit_guard, "session_timeout", 10.0)

    def set_last_ok(seconds_ago: float) -> None:
        monkeypatch.setattr(commit_guard, "session_ok_at", time.monotonic() - seconds_ago)
    return set_last_ok


def test_a_lapsed_session_refuses_to_register_a_transactional_producer(session):
    session(70.0)  # paused 70 s with a 10 s session
    s, result = register("app-1-3")
    assert isinstance(result, ZombieRestart)
    assert s.client.requests == []  # nothing reached the broker: nobody fenced
    assert not s._txn_manager.has_pid()


def test_a_live_session_registers(session):
    session(1.0)
    s, result = register("app-1-3")
    assert result is True
    assert len(s.client.requests) == 1 and s._txn_manager.producer_id == 7


def test_an_idempotent_producer_registers_whatever_the_session(session):
    """KafkaIO's producer (idempotent, no transactional id) fences nobody."""
    session(70.0)
    _, result = register(None)
    assert result is True


def test_a_coordinator_lookup_that_lost_its_connection_is_tried_again():
    """Issue 23 (docs/delivery.md AD): aiokafka's sender retried the transaction
    coordinator lookup only for three errors; a closed connection (a broker restart
    during an exactly_once commit) ended the sender and the worker. Now a retriable
    cause is looked up again; a non-retriable one still ends it."""
    from aiokafka.client import CoordinationType
    from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

    install()

    class Client:
        def __init__(self, errors):
            self.errors, self.lookups, self.refreshes = list(errors), 0, 0

        async def coordinator_lookup(self, coordinator_type, key):
            self.lookups += 1
            if self.errors:
                raise self.errors.pop(0)
            return 1

        async def force_metadata_update(self):
            self.refreshes += 1
            return True

        async def ready(self, node_id, group=None):
            return True

    async def lookup(errors):
        s = SimpleNamespace(_txn_manager=TransactionManager("app-1-0", 60_000), _retry_backoff=0.0,
                            _coordinators={}, client=Client(errors))
        try:
            return s.client, await Sender._find_coordinator(s, CoordinationType.TRANSACTION, "app-1-0")
        except KafkaError as exc:
            return s.client, exc

    client, node = asyncio.run(lookup([KafkaConnectionError("closed"), KafkaConnectionError("closed")]))
    assert node == 1 and client.lookups == 3 and client.refreshes == 2
    client, result = asyncio.run(lookup([TopicAuthorizationFailedError()]))
    assert isinstance(result, KafkaError) and client.lookups == 1
