"""The fast delivery path of app/transport.py, without a broker.

What must hold: a delivery that does not suspend completes inline (no task); one that
suspends is finished by the same coroutine, not restarted (no message delivered twice);
a suspended flow interrupts a blocked delivery and cancels it; errors propagate.
"""

from __future__ import annotations

import asyncio

import pytest
from mode import Service

from app.batches import PROCESSING_TOPIC, from_partition
from app.transport import (
    SCHEME,
    FastConsumer,
    TransactionManager,
    Transport,
    await_topics_in_metadata,
    broker_url,
    install,
    start_inline,
)


class DeliveryHost(Service):
    """Just what ``FastConsumer.deliver`` uses: ``suspend_flow`` and ``wait_first``."""

    deliver = FastConsumer.deliver

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = asyncio.Event()


def run(coro):
    return asyncio.run(coro)


def test_non_suspending_delivery_completes_inline_without_a_task():
    seen = []

    async def callback(message):
        seen.append((message, asyncio.current_task()))
        return "done"

    async def main():
        me = asyncio.current_task()
        finished, result = start_inline(callback(1))
        assert finished and result == "done"
        # ran in the caller's own task: nothing was scheduled
        assert seen == [(1, me)]

    run(main())


def test_suspending_delivery_is_resumed_not_restarted():
    steps = []

    async def callback(message):
        steps.append("start")
        await asyncio.sleep(0)  # bare yield
        steps.append("after-yield")
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, fut.set_result, 41)
        value = await fut  # a real future
        steps.append("end")
        return value + 1

    async def main():
        finished, rest = start_inline(callback("m"))
        assert not finished and steps == ["start"]
        assert await asyncio.ensure_future(rest) == 42

    run(main())
    assert steps == ["start", "after-yield", "end"]  # each step once


def test_errors_propagate_inline_and_after_suspension():
    async def fails_now(_m):
        raise ValueError("now")

    async def fails_later(_m):
        await asyncio.sleep(0)
        raise KeyError("later")

    async def main():
        with pytest.raises(ValueError):
            start_inline(fails_now(None))
        finished, rest = start_inline(fails_later(None))
        assert not finished
        with pytest.raises(KeyError):
            await rest

    run(main())


def test_deliver_fast_path_and_blocked_delivery_interrupted_by_suspend_flow():
    delivered, cancelled = [], []
    gate: dict[str, asyncio.Future] = {}

    async def callback(message):
        if message == "blocks":
            gate["f"] = asyncio.get_running_loop().create_future()
            try:
                await gate["f"]  # like a put into a full stream buffer
            except asyncio.CancelledError:
                cancelled.append(message)
                raise
        delivered.append(message)

    async def main():
        host = DeliveryHost()
        await host.deliver(callback, "a")
        assert delivered == ["a"]
        blocked = asyncio.ensure_future(host.deliver(callback, "blocks"))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # still waiting for room
        host.suspend_flow.set()  # rebalance: flow suspended
        await asyncio.wait_for(blocked, 5)
        assert cancelled == ["blocks"] and delivered == ["a"]
        # while suspended, Faust's own path is used; a non-blocking delivery still lands
        await host.deliver(callback, "b")
        assert delivered == ["a", "b"]

    run(main())


def test_blocked_delivery_completes_when_room_appears():
    delivered = []
    gate: dict[str, asyncio.Future] = {}

    async def callback(message):
        gate["f"] = asyncio.get_running_loop().create_future()
        await gate["f"]
        delivered.append(message)

    async def main():
        host = DeliveryHost()
        task = asyncio.ensure_future(host.deliver(callback, "x"))
        await asyncio.sleep(0.01)
        gate["f"].set_result(None)
        await asyncio.wait_for(task, 5)
        assert delivered == ["x"]

    run(main())


def test_broker_url_and_registry():
    install()
    assert broker_url("kafka://a:9092") == f"{SCHEME}://a:9092"
    assert broker_url("kafka://a:1;kafka://b:2") == f"{SCHEME}://a:1;{SCHEME}://b:2"
    assert broker_url("a:9092") == f"{SCHEME}://a:9092"
    assert broker_url("kafka://a:9092", fast=False) == "kafka://a:9092"
    from faust.transport import by_url

    assert by_url(f"{SCHEME}://a:9092") is Transport
    assert Transport.Consumer is FastConsumer


def test_app_uses_the_fast_transport():
    from app import app

    assert isinstance(app.transport, Transport)


def test_commit_guard_keeps_commits_between_processing_sections():
    from app.transport import CommitGuard

    guard = CommitGuard()
    log: list[str] = []

    async def agent_batch(name: str, steps: int):
        async with guard.processing():
            log.append(f"{name}:start")
            for _ in range(steps):
                await asyncio.sleep(0)
            log.append(f"{name}:end")

    async def commit():
        async with guard.committing():
            log.append("commit")
            await asyncio.sleep(0)
            log.append("commit:end")

    async def main():
        first = asyncio.ensure_future(agent_batch("a", 5))
        await asyncio.sleep(0)  # a is inside its section
        committing = asyncio.ensure_future(commit())
        await asyncio.sleep(0)
        later = asyncio.ensure_future(agent_batch("b", 1))  # arrives while a commit waits
        await asyncio.gather(first, committing, later)

    run(main())
    # the commit waited for a; b waited for the commit; nothing interleaved
    assert log == ["a:start", "a:end", "commit", "commit:end", "b:start", "b:end"]



class FakeTxnApp:
    class conf:  # noqa: N801 - mirrors app.conf
        id = "g"

    class assignor:  # noqa: N801
        _topic_groups = {"src": 1, "src-changelog": 1}


class FakeTxnConsumer:
    """Consumer metadata that learns a topic only once it is tracked (as aiokafka's)."""

    def __init__(self, known=("src",)):
        self.known = set(known)
        self.tracked = []

    def key_partition(self, topic, key, partition=None):
        if topic not in self.known:
            return None
        return partition if partition is not None else 2

    async def track_topic_metadata(self, topic):
        self.tracked.append(topic)
        self.known.add(topic)


class FakeTxnProducer:
    def __init__(self, owned=(0, 1, 2, 3)):
        self._transaction_producers = {f"g-1-{p}": object() for p in owned}
        self.sent = []

    async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id=None):
        self.sent.append((topic, partition, transactional_id))


class TxnHost:
    """Just what ``TransactionManager.send`` uses."""

    send = TransactionManager.send
    _partition_with_metadata = TransactionManager._partition_with_metadata
    metadata_timeout = 1.0

    def __init__(self, consumer=None, producer=None):
        import logging

        self.app = FakeTxnApp()
        self.consumer = consumer or FakeTxnConsumer()
        self.producer = producer or FakeTxnProducer()
        self._warned = set()
        self.log = logging.getLogger("test")


def test_outputs_to_a_sink_the_consumer_does_not_read_join_the_input_transaction():
    # Faust sent these with transactional_id=None (the consumer's metadata lacks the
    # sink): visible to read_committed at once, repeated after a kill -9.
    host = TxnHost()

    async def main():
        token = PROCESSING_TOPIC.set("src")
        try:
            await host.send("sink", b"k", b"v", 3, None, None)  # the input's partition number
            await host.send("sink", b"k", b"v", None, None, None)  # keyed: needs metadata
        finally:
            PROCESSING_TOPIC.reset(token)

    run(main())
    assert host.producer.sent == [("sink", 3, "g-1-3"), ("sink", 2, "g-1-2")]
    assert host.consumer.tracked == ["sink"]


def test_sends_outside_processing_and_to_unowned_partitions_stay_plain():
    host = TxnHost(producer=FakeTxnProducer(owned=(0,)))

    async def main():
        await host.send("sink", b"k", b"v", 0, None, None)  # e.g. an HTTP handler: no input
        await host.send("src-changelog", b"k", b"v", 0, None, None)  # a known group
        token = PROCESSING_TOPIC.set("src")
        try:
            await host.send("sink", b"k", b"v", 3, None, None)  # partition 3 not owned here
        finally:
            PROCESSING_TOPIC.reset(token)

    run(main())
    assert host.producer.sent == [("sink", 0, None), ("src-changelog", 0, "g-1-0"), ("sink", 3, None)]
    assert host._warned == {("sink", 3)}


def test_outputs_join_the_transaction_of_the_input_partition_they_come_from():
    # Worker owns input partition 0 only: an output of a record of partition 0 keyed to
    # partition 3 (another worker's) joins transaction g-1-0, which commits that record's
    # offset; without from_partition it had no transaction to join (plain send).
    host = TxnHost(producer=FakeTxnProducer(owned=(0,)))

    async def main():
        token = PROCESSING_TOPIC.set("src")
        try:
            with from_partition(0):
                await host.send("sink", b"k", b"v", 3, None, None)
                await host.send("sink", b"k", b"v", None, None, None)  # by key, left to the producer
            with from_partition(1):  # not owned (revoked meanwhile): as before, plain
                await host.send("sink", b"k", b"v", 3, None, None)
        finally:
            PROCESSING_TOPIC.reset(token)
        with from_partition(0):  # not processing input: nothing to join
            await host.send("sink", b"k", b"v", 3, None, None)

    run(main())
    assert host.producer.sent == [("sink", 3, "g-1-0"), ("sink", None, "g-1-0"), ("sink", 3, None),
                                  ("sink", 3, None)]


def test_transport_uses_the_transaction_manager():
    assert Transport.TransactionManager is TransactionManager


class LaggingMetadataClient:
    """An aiokafka client whose metadata lists a topic only from the ``appears_at``-th
    refresh on, as a broker whose metadata cache lags a topic creation."""

    def __init__(self, appears_at: dict[str, int]) -> None:
        self.appears_at = appears_at
        self.tracked: set[str] = set()
        self.refreshes = 0
        self.cluster = self

    def add_topic(self, topic: str) -> None:
        self.tracked.add(topic)

    async def force_metadata_update(self) -> bool:
        self.refreshes += 1
        return True

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        if topic in self.tracked and self.refreshes >= self.appears_at[topic]:
            return {0, 1, 2, 3}
        return None


def test_subscription_waits_until_the_metadata_lists_every_topic():
    client = LaggingMetadataClient({"events": 1, "app.patterns-repartition": 3})
    missing = run(await_topics_in_metadata(client, {"events", "app.patterns-repartition"}, timeout=10))
    assert missing == set()
    assert client.refreshes == 3  # stopped as soon as the late topic appeared
    assert client.tracked == {"events", "app.patterns-repartition"}


def test_subscription_wait_is_bounded_and_names_what_is_missing():
    client = LaggingMetadataClient({"events": 1, "never-created": 10**9})
    missing = run(await_topics_in_metadata(client, {"events", "never-created"}, timeout=0.2))
    assert missing == {"never-created"}
    assert 2 <= client.refreshes <= 5  # backed off, not a busy loop


def test_the_consumer_runs_in_the_workers_event_loop(monkeypatch):
    """``Settings.consumer_in_loop``: the aiokafka consumer gets no thread (or loop) of
    its own, and Faust's calls into it are plain awaits in the worker's loop."""
    from app import app
    from app.transport import FastConsumerThread

    loop = asyncio.new_event_loop()
    try:
        consumer_thread = FastConsumerThread(app.consumer, loop=loop)
        assert consumer_thread.in_loop
        assert consumer_thread.thread_loop is loop and consumer_thread.parent_loop is loop
        seen = []

        def sync_call(x: int) -> int:
            seen.append(asyncio.get_running_loop())
            return x + 1

        async def async_call(x: int) -> int:
            seen.append(asyncio.get_running_loop())
            return x * 2

        async def calls() -> tuple[int, int]:
            return (await consumer_thread.call_thread(sync_call, 1),
                    await consumer_thread.call_thread(async_call, x=5))

        assert loop.run_until_complete(calls()) == (2, 10)
        assert seen == [loop, loop]  # run at once, in this loop: no method queue
        assert consumer_thread._method_queue is None

        # STREAMETL_CONSUMER_IN_LOOP=false: Faust's thread with a loop of its own.
        import dataclasses

        import app as app_package

        monkeypatch.setattr(app_package, "settings",
                            dataclasses.replace(app_package.settings, consumer_in_loop=False))
        threaded = FastConsumerThread(app.consumer, loop=loop)
        assert not threaded.in_loop and threaded.thread_loop is not loop
        threaded.thread_loop.close()
    finally:
        loop.close()


def test_recovery_highwaters_come_from_the_broker_under_exactly_once_too():
    """Faust's own answer in a transaction is the LSO of the last fetch response: None
    (-1, an empty changelog to recovery) for a partition not fetched yet."""
    from types import SimpleNamespace

    from faust.types import TP

    from app.transport import FastConsumerThread

    class NeverFetched:
        def last_stable_offset(self, tp):
            return None

        async def end_offsets(self, tps):
            return {tp: 2050 for tp in tps}

    thread = FastConsumerThread.__new__(FastConsumerThread)
    thread._ensure_consumer = NeverFetched
    thread.consumer = SimpleNamespace(in_transaction=True)
    tp = TP("app-pipeline-x-dedupe-changelog", 0)
    assert asyncio.run(thread._highwaters([tp])) == {tp: 2050}


def test_a_rebalance_stops_the_producers_of_partitions_that_became_standbys():
    """Issue 23 (docs/delivery.md, I): Faust stops the transactional producers of
    revoked partitions only if they are not standbys in the new assignment, and a
    source partition that moves to another worker usually becomes this worker's
    standby. Its producer stayed (fenced by the new owner's); when the partition came
    back, beginning a transaction on it failed and the first send crashed the worker
    with ProducerFenced. Every producer of a partition no longer active here stops."""
    from faust.types import TP

    class Assignor:
        standbys = {TP("src", 0), TP("src", 1)}

        def group_for_topic(self, topic):
            return 1

        def is_standby(self, tp):
            return tp in self.standbys

    class App:
        class conf:  # noqa: N801 - mirrors app.conf
            id = "g"

        assignor = Assignor()

    class Producer:
        def __init__(self):
            self._transaction_producers = {f"g-1-{p}": object() for p in range(4)}
            self.stopped, self.begun = [], []

        async def stop_transaction(self, tid):
            self.stopped.append(tid)
            self._transaction_producers.pop(tid, None)

        async def maybe_begin_transaction(self, tid):
            self.begun.append(tid)

    import logging

    manager = TransactionManager.__new__(TransactionManager)
    manager.app, manager.producer = App(), Producer()
    manager.__dict__["log"] = logging.getLogger("test")
    active = {TP("src", 2), TP("src", 3)}
    revoked = {TP("src", 0), TP("src", 1)}
    run(manager.on_rebalance(active | Assignor.standbys, revoked, set()))
    assert sorted(manager.producer.stopped) == ["g-1-0", "g-1-1"]
    assert sorted(manager.producer._transaction_producers) == ["g-1-2", "g-1-3"]
    assert sorted(manager.producer.begun) == ["g-1-2", "g-1-3"]
