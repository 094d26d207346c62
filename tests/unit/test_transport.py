"""The fast delivery path of app/transport.py, without a broker.

What must hold: a delivery that does not suspend completes inline (no task); one that
suspends is finished by the same coroutine, not restarted (no message delivered twice);
a suspended flow interrupts a blocked delivery and cancels it; errors propagate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

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
    from faust.transport import by_url

    assert by_url(f"{SCHEME}://a:9092") is Transport
    assert Transport.Consumer is FastConsumer


def test_app_uses_the_fast_transport():
    from app import app

    assert isinstance(app.transport, Transport)


def test_no_setting_selects_fausts_own_consumer():
    """Issue 23, finding 5: ``STREAMETL_FAST_CONSUMER=false`` built Faust's own transport,
    whose consumer hands batch-agent topics' records to a Faust channel nobody reads:
    the worker processed nothing. The switch is gone; the variable is ignored like any
    unknown one, and the app keeps this module's transport."""
    import os
    import subprocess
    import sys

    from app.settings import Settings

    assert "fast_consumer" not in {f.name for f in dataclasses.fields(Settings)}
    env = {**os.environ, "STREAMETL_FAST_CONSUMER": "false"}
    probe = ("from app import app; from app.transport import Transport; "
             "print(type(app.transport).__module__, isinstance(app.transport, Transport))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["app.transport", "True"], out


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
    _send_in = TransactionManager._send_in
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


def test_a_send_into_a_transaction_that_ended_under_the_batch_restarts_the_worker():
    """A chained-fault run (seed 9, exactly_once, broker restarts): a worker paused past
    the transaction timeout, while a broker restart kept its group session alive, woke
    mid-batch into a transaction the coordinator had aborted; aiokafka's
    ``IllegalOperation`` crashed it. It is a zombie (its stores hold the aborted
    writes): ``ZombieRestart``, which the worker restarts on."""
    from aiokafka.errors import IllegalOperation

    from app.transport import ZombieRestart

    class Ended(FakeTxnProducer):
        async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id=None):
            if transactional_id is not None:
                raise IllegalOperation("Can't send messages while not in transaction")
            await super().send(topic, key, value, partition, timestamp, headers)

    host = TxnHost(producer=Ended())

    async def main():
        token = PROCESSING_TOPIC.set("src")
        try:
            with pytest.raises(ZombieRestart) as raised:
                await host.send("sink", b"k", b"v", 3, None, None)
        finally:
            PROCESSING_TOPIC.reset(token)
        assert isinstance(raised.value.__cause__, IllegalOperation)

    run(main())


def test_a_worker_whose_session_lapsed_sends_into_no_transaction(monkeypatch):
    """Issue 23 (docs/delivery.md AC): a zombie woken after its session sent Faust's
    buffered table writes into a transaction its partition's new owner had fenced, and
    crashed on ``IllegalOperation``. It raises ``ZombieRestart`` instead (the worker
    restarts and restores from the changelogs); a plain send (no input) is not held."""
    import time

    from app.transport import ZombieRestart, commit_guard

    monkeypatch.setattr(commit_guard, "session_timeout", 10.0)
    monkeypatch.setattr(commit_guard, "session_ok_at", time.monotonic() - 70.0)
    host = TxnHost()

    async def main():
        await host.send("sink", b"k", b"v", 0, None, None)  # not processing input: plain
        token = PROCESSING_TOPIC.set("src")
        try:
            with pytest.raises(ZombieRestart):
                await host.send("sink", b"k", b"v", 3, None, None)
            with from_partition(0), pytest.raises(ZombieRestart):
                await host.send("sink", b"k", b"v", 3, None, None)
        finally:
            PROCESSING_TOPIC.reset(token)
        with pytest.raises(ZombieRestart):
            await host.send("src-changelog", b"k", b"v", 0, None, None)  # a table write

    run(main())
    assert host.producer.sent == [("sink", 0, None)]


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


@pytest.mark.parametrize("eos", [False, True], ids=["at_least_once", "exactly_once"])
def test_the_worker_consumer_reads_read_committed_under_both_guarantees(monkeypatch, eos):
    """Faust's consumer reads read_uncommitted outside exactly_once: an at_least_once
    worker applied the records of aborted transactions (a changelog or repartition
    topic of an earlier exactly_once run, an upstream exactly_once app's output) as
    real. The Fetcher aiokafka builds from the worker's consumer at start reads
    read_committed, and the end offset the worker reports is the last stable offset."""
    from aiokafka.consumer import fetcher as aiokafka_fetcher
    from faust.types import TP

    from app import app
    from app.transport import FastConsumerThread

    monkeypatch.setattr(app.consumer, "in_transaction", eos)

    async def main():
        thread = FastConsumerThread(app.consumer, loop=asyncio.get_running_loop())
        consumer = thread._create_worker_consumer(app.transport)
        try:
            assert consumer._isolation_level == "read_committed"
            # What start() hands its Fetcher (aiokafka converts the name there).
            fetcher = aiokafka_fetcher.Fetcher(consumer._client, consumer._subscription,
                                               isolation_level=consumer._isolation_level)
            assert fetcher._isolation_level == aiokafka_fetcher.READ_COMMITTED
            await fetcher.close()
        finally:
            await consumer._client.close()

        class Fetched:
            def highwater(self, tp):
                return 120  # past an open transaction's records

            def last_stable_offset(self, tp):
                return 100

        thread._ensure_consumer = Fetched
        assert thread.highwater(TP("in", 0)) == 100

    asyncio.run(main())


def test_the_reply_topic_names_one_worker_and_is_a_legal_topic_name():
    """One reply topic per worker, reused across its restarts (issue 17: a fresh
    f-reply-<uuid> per start piled up on the broker)."""
    import re

    from app.transport import reply_topic_name

    name = reply_topic_name("p.", "streametl", 6066)
    assert name == reply_topic_name("p.", "streametl", 6066)
    assert name != reply_topic_name("p.", "streametl", 6067)
    assert name.startswith("p.streametl-reply-")
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,249}", name)


# --- exactly_once: transactions across a rebalance (issue 23, finding 4) -------------


class FakeCoordinatorProducer:
    """An aiokafka transactional producer whose client side is aiokafka's own state
    machine (``TransactionManager``), with the broker reduced to one flag: ``timed_out``
    (the coordinator aborted the open transaction and bumped the epoch), after which
    every request of this producer fails with ``ProducerFenced``, as aiokafka reports
    ``INVALID_PRODUCER_EPOCH``."""

    def __init__(self, tid):
        from aiokafka.producer.transaction_manager import TransactionManager as AioTxn

        self._txn_manager = AioTxn(tid, 60000)
        self.timed_out = False
        self.committed = 0
        self.stopped = False

    async def start(self):
        self._txn_manager.set_pid_and_epoch(1, 0)

    async def stop(self):
        self.stopped = True

    def _fenced(self):
        from aiokafka.errors import ProducerFenced

        exc = ProducerFenced()
        self._txn_manager.fatal_error(exc)  # what aiokafka's sender does when it dies of it
        self._txn_manager.wait_for_transaction_end().exception()  # (retrieved: raised here)
        raise exc

    async def begin_transaction(self):
        self._txn_manager.begin_transaction()

    async def send(self, topic, value, key=None, partition=None, timestamp_ms=None, headers=None):
        from aiokafka.errors import IllegalOperation
        from aiokafka.structs import TopicPartition

        if not self._txn_manager.is_in_transaction():
            raise IllegalOperation("Can't send messages while not in transaction")
        if self.timed_out:
            self._fenced()  # AddPartitionsToTxn with the old epoch
        tp = TopicPartition(topic, partition)
        self._txn_manager.maybe_add_partition_to_txn(tp)
        self._txn_manager.partition_added(tp)

    async def send_offsets_to_transaction(self, offsets, group_id):
        if self.timed_out:
            self._fenced()

    async def commit_transaction(self):
        self._txn_manager.committing_transaction()
        if self.timed_out:
            self._fenced()
        self._txn_manager.complete_transaction()
        self.committed += 1

    async def abort_transaction(self):
        self._txn_manager.aborting_transaction()
        if self.timed_out:
            self._fenced()
        self._txn_manager.complete_transaction()


class FakeFaustProducer:
    """Faust's aiokafka ``Producer``: its own transaction methods, on fake clients."""

    from faust.transport.drivers.aiokafka import Producer as _P

    begin_transaction = _P.begin_transaction
    maybe_begin_transaction = _P.maybe_begin_transaction
    stop_transaction = _P.stop_transaction
    commit_transactions = _P.commit_transactions
    send = _P.send

    def __init__(self):
        from types import SimpleNamespace

        self._transaction_producers = {}
        self._trn_locks = {}
        self.created = []
        self.buffer = SimpleNamespace(put_count=0)  # table writes made (``ProducerBuffer``)
        self._send_on_produce_message = lambda **kw: None
        self.allow_headers = True

    def _new_producer(self, transactional_id=None):
        producer = FakeCoordinatorProducer(transactional_id)
        self.created.append(producer)
        return producer

    def _ensure_producer(self):
        return self


class RebalanceTxnApp:
    class conf:  # noqa: N801
        id = "g"

    class Tables(dict):
        aborted = 0
        aborted_writes = False

        def on_aborted_writes(self):
            self.aborted += 1
            self.aborted_writes = True

    def __init__(self):
        self.tables = self.Tables()

    class assignor:  # noqa: N801
        @staticmethod
        def group_for_topic(topic):
            return 1

        @staticmethod
        def is_standby(tp):
            return False


class RebalanceTxnHost:
    """Just what ``TransactionManager.on_rebalance`` uses (Faust's helpers included)."""

    on_rebalance = TransactionManager.on_rebalance
    ready_transaction = TransactionManager.ready_transaction
    transactional_id_format = TransactionManager.transactional_id_format
    _tps_to_transactional_ids = TransactionManager._tps_to_transactional_ids
    _tps_to_active_tpgs = TransactionManager._tps_to_active_tpgs
    _stop_transactions = TransactionManager._stop_transactions
    missed_generations = TransactionManager.missed_generations
    restart_if_tables_hold_aborted_writes = TransactionManager.restart_if_tables_hold_aborted_writes
    commit = TransactionManager.commit

    def __init__(self):
        import logging

        self.app = RebalanceTxnApp()
        self.producer = FakeFaustProducer()
        self.log = logging.getLogger("test")
        self.commit_failed = set()


def _tps(*partitions):
    from faust.types import TP

    return {TP("src", p) for p in partitions}


def test_a_transaction_the_coordinator_aborted_during_a_long_rebalance_is_replaced():
    """Issue 23, finding 4: a kept partition's transaction stayed open through a
    rebalance longer than the transaction timeout. Faust's ``on_rebalance`` called
    ``begin_transaction`` on it (``Invalid state transition IN_TRANSACTION ->
    IN_TRANSACTION``, logged and ignored) and kept the fenced producer: its next send
    failed (``Can't send messages while not in transaction``) and its commit crashed
    the worker (``ProducerFenced``). Now it is abandoned and a new producer begins."""
    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        old = producers["g-1-0"]
        await host.producer.send("out", None, b"v", 0, None, None, transactional_id="g-1-0")
        old.timed_out = True  # the rebalance outlasted the transaction timeout
        await host.on_rebalance(_tps(0), _tps(1), set())
        new = producers["g-1-0"]
        assert new is not old and old.stopped
        assert new._txn_manager.is_in_transaction() and new._txn_manager.is_empty_transaction()
        assert "g-1-1" not in producers  # revoked: stopped, as Faust does
        # The worker goes on: it sends and commits in the new transaction.
        await host.producer.send("out", None, b"v", 0, None, None, transactional_id="g-1-0")
        await host.producer.commit_transactions({"g-1-0": {}}, "g")
        assert new.committed == 1

    run(main())


def test_a_worker_with_tables_restarts_when_a_kept_partitions_transaction_was_aborted():
    """docs/delivery.md, AN: the same long rebalance, but the worker wrote tables. The
    aborted transaction's batches had written their table changes to the local stores
    and are processed again from the committed offsets (a count applied twice, a
    dedupe key dropping its own record); replaying the changelog does not remove a key
    only that transaction wrote. So the worker restarts (its stores are restored from
    the changelogs at start) instead of going on."""
    from app.transport import ZombieRestart

    host = RebalanceTxnHost()
    host.producer.buffer.put_count = 1  # the worker has written a table
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        await host.producer.send("counts-changelog", None, b"v", 0, None, None, transactional_id="g-1-0")
        producers["g-1-0"].timed_out = True
        with pytest.raises(ZombieRestart, match="aborted, fenced or left"):
            await host.on_rebalance(_tps(0, 1), set(), set())
        assert host.app.tables.aborted_writes

    run(main())


def test_a_revoked_partitions_transaction_stopped_with_records_restarts_a_worker_with_tables():
    """A producer stopped at a revocation while its transaction still held records:
    the partition's next owner aborts it, and its writes stay in this worker's stores
    (where the partition may come back)."""
    from app.transport import ZombieRestart

    host = RebalanceTxnHost()
    host.producer.buffer.put_count = 1  # the worker has written a table

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        await host.producer.send("counts-changelog", None, b"v", 1, None, None, transactional_id="g-1-1")
        with pytest.raises(ZombieRestart):
            await host.on_rebalance(_tps(0), _tps(1), set())

    run(main())


def test_a_fenced_commit_restarts_a_worker_with_tables_at_its_next_assignment():
    """A refused (fenced) commit marks the process as holding aborted writes
    (``FastConsumer.commit``); the next assignment, even at the next generation, does
    not go on over them. Ended cleanly, a rebalance changes nothing."""
    from app.transport import ZombieRestart

    host = RebalanceTxnHost()
    host.producer.buffer.put_count = 1  # the worker has written a table

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        await host.on_rebalance(_tps(0, 1), set(), set())  # nothing aborted: goes on
        host.app.tables.on_aborted_writes()
        with pytest.raises(ZombieRestart):
            await host.on_rebalance(_tps(0, 1), set(), set())

    run(main())


def test_a_worker_with_tables_goes_on_through_rebalances_whose_transactions_ended_cleanly():
    """The restart of AN must not fire at a routine rebalance: the revocation's commit
    left the revoked producers READY (or in an empty transaction), the kept ones are in
    empty transactions."""
    host = RebalanceTxnHost()
    host.producer.buffer.put_count = 1
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1, 2, 3), set(), _tps(0, 1, 2, 3))
        await producers["g-1-2"].commit_transaction()  # ended by the revocation's commit (READY)
        await host.on_rebalance(_tps(0, 1), _tps(2, 3), set())  # 3: an empty transaction
        await host.on_rebalance(_tps(0, 1, 2, 3), set(), _tps(2, 3))  # they come back
        assert not host.app.tables.aborted_writes
        assert sorted(producers) == ["g-1-0", "g-1-1", "g-1-2", "g-1-3"]

    run(main())


def test_kept_transactions_are_kept_or_ended_cleanly_at_a_rebalance():
    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1, 2), set(), _tps(0, 1, 2))
        p0, p1, p2 = producers["g-1-0"], producers["g-1-1"], producers["g-1-2"]
        # p0: ended on revocation (committed, no new transaction begun): begins again.
        await p0.commit_transaction()
        # p1: in a transaction that holds nothing: left as it is (no "invalid transition").
        # p2: holds records sent during the rebalance, not timed out: committed, then anew.
        await host.producer.send("out", None, b"v", 2, None, None, transactional_id="g-1-2")
        await host.on_rebalance(_tps(0, 1, 2), set(), set())
        assert [producers[t] for t in ("g-1-0", "g-1-1", "g-1-2")] == [p0, p1, p2]
        assert (p0.committed, p1.committed, p2.committed) == (1, 0, 1)
        for p in (p0, p1, p2):
            assert p._txn_manager.is_in_transaction() and p._txn_manager.is_empty_transaction()
        assert len(host.producer.created) == 3

    run(main())


def test_a_worker_that_missed_a_generation_restarts():
    """Issue 23 (the chaos verifier's zombie; docs/delivery.md, O): a worker paused past
    its session (generation 1) was out of the group in generations 3 and 4, in which
    other workers owned its partitions: its producers were fenced and its open
    transactions aborted, but its local stores kept what they wrote. It kept its empty
    transactions' producers, and the first send after it became ready crashed it
    (``Can't send messages while not in transaction``); with new producers instead, it
    processed on the aborted writes (91 records its dedupe memory took for copies). It
    restarts, with a reason, at its first assignment after the gap; at consecutive
    generations kept producers stay (no needless InitProducerId)."""
    from app.transport import ZombieRestart

    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        host.app.consumer_generation_id = 1
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        old = dict(producers)
        host.app.consumer_generation_id = 2  # a rebalance this worker took part in
        await host.on_rebalance(_tps(0, 1), set(), set())
        assert producers == old
        host.app.consumer_generation_id = 5  # generations 3 and 4 went on without it
        with pytest.raises(ZombieRestart, match="missed a generation"):
            await host.on_rebalance(_tps(0, 1), set(), set())

    run(main())


def test_a_worker_paused_while_it_starts_its_producers_does_not_fence_the_owners(monkeypatch):
    """Issue 23 (long-mode chaos run, docs/delivery.md, Y): a worker paused (SIGSTOP)
    in the middle of ``on_rebalance`` woke 70 s later, after the group had given its
    partitions to others, and went on registering producers for the transactional ids
    of its stale assignment: each InitProducerId fenced the producer of that
    partition's current owner, a running worker, which crashed. Once its session has
    lapsed it registers no further producer and restarts (ZombieRestart)."""
    import time

    from app import transport
    from app.transport import ZombieRestart

    host = RebalanceTxnHost()
    guard = transport.commit_guard
    monkeypatch.setattr(guard, "session_timeout", 45.0)
    monkeypatch.setattr(guard, "session_ok_at", time.monotonic())
    new_producer = host.producer._new_producer

    def paused_after_first(transactional_id=None):
        producer = new_producer(transactional_id)
        guard.session_ok_at = time.monotonic() - 70.0  # SIGSTOP here, SIGCONT 70 s later
        return producer

    host.producer._new_producer = paused_after_first

    async def main():
        host.app.consumer_generation_id = 1
        with pytest.raises(ZombieRestart, match="session lapsed"):
            await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))

    run(main())
    assert [p._txn_manager.transactional_id for p in host.producer.created] == ["g-1-0"]  # none for g-1-1


def test_a_fenced_transaction_does_not_keep_the_others_from_committing():
    """Issue 23 (docs/delivery.md, O): Faust commits the transactions of a commit in
    turn and stopped at the first fenced one; the later ones kept outputs whose
    offsets that commit had taken, and a rebalance then ended them without those
    offsets: the batches were processed again, their outputs twice in read_committed.
    Now every transaction is tried, and the first failure is raised afterwards."""
    from aiokafka.errors import ProducerFenced
    from faust.types import TP

    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers
    crashed: list = []

    async def crash(exc):  # Faust's commit crashed the worker at the first fenced one
        crashed.append(exc)

    host.app.crash = crash

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))
        for p in (0, 1):
            await host.producer.send("out", None, b"v", p, None, None, transactional_id=f"g-1-{p}")
        producers["g-1-0"].timed_out = True  # taken over by another worker meanwhile
        with pytest.raises(ProducerFenced):
            await host.commit({TP("src", 0): 10, TP("src", 1): 20})
        assert producers["g-1-1"].committed == 1
        assert producers["g-1-0"].committed == 0
        assert not crashed

    run(main())


def test_a_transaction_whose_commit_failed_is_aborted_at_the_rebalance_not_committed_without_offsets():
    """docs/delivery.md BC: a commit's transaction failed with an error other than a
    fence (here the fatal error of a producer whose sender died): the loop stopped
    there, and the next transaction, whose offsets that commit had already taken from
    the consumer, stayed open; the rebalance then committed it without them, and its
    batches were processed again (outputs twice in read_committed). Now every
    transaction is tried, and one whose commit failed is aborted at the rebalance."""
    from aiokafka.errors import KafkaError
    from faust.types import TP

    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1, 2), set(), _tps(0, 1, 2))
        for p in (0, 1, 2):
            await host.producer.send("out", None, b"v", p, None, None, transactional_id=f"g-1-{p}")
        p0, p1, p2 = producers["g-1-0"], producers["g-1-1"], producers["g-1-2"]
        offsets_sent: list = []

        async def offsets_refused(offsets, group_id):  # e.g. the coordinator moved meanwhile
            raise KafkaError("Unexpected error during batch delivery")

        async def offsets_of_p1(offsets, group_id):
            offsets_sent.append(dict(offsets))

        p0.send_offsets_to_transaction = offsets_refused
        p1.send_offsets_to_transaction = offsets_of_p1
        with pytest.raises(KafkaError):
            await host.commit({TP("src", 0): 10, TP("src", 1): 20})
        # p1 committed with its own offsets, not left for the rebalance to end without.
        assert p1.committed == 1 and offsets_sent and list(offsets_sent[0].values()) == [20]
        assert p0.committed == 0
        await host.on_rebalance(_tps(0, 1, 2), set(), set())
        # p0 holds outputs of inputs processed again: aborted. p2 holds records sent
        # outside a commit (a timer's): committed as before.
        assert (p0.committed, p1.committed, p2.committed) == (0, 1, 1)
        assert host.app.tables.aborted_writes
        assert not host.commit_failed
        for p in (p0, p1, p2):
            assert p._txn_manager.is_in_transaction() and p._txn_manager.is_empty_transaction()

    run(main())


def test_a_commit_raises_a_failure_other_than_a_fence_in_place_of_a_fence():
    """A fence is refused quietly (the worker goes on: ``FastConsumer.commit``); a
    later transaction's other failure (a producer whose sender died) must still reach
    the commit's caller, which restarts the worker."""
    from aiokafka.errors import KafkaError, ProducerFenced
    from faust.types import TP

    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0, 1), set(), _tps(0, 1))

        async def fenced(offsets, group_id):
            raise ProducerFenced()

        async def sender_died(offsets, group_id):
            raise KafkaError("Unexpected error during batch delivery")

        producers["g-1-0"].send_offsets_to_transaction = fenced
        producers["g-1-1"].send_offsets_to_transaction = sender_died
        with pytest.raises(KafkaError) as raised:
            await host.commit({TP("src", 0): 10, TP("src", 1): 20})
        assert not isinstance(raised.value, ProducerFenced)

    run(main())


def test_a_transaction_committed_after_a_failed_commit_is_no_longer_aborted_at_the_rebalance():
    """``commit_failed`` names only transactions whose last commit failed: one
    committed since holds, at the rebalance, records sent outside a commit (a timer's),
    which are committed as before."""
    from aiokafka.errors import KafkaError
    from faust.types import TP

    host = RebalanceTxnHost()
    producers = host.producer._transaction_producers

    async def main():
        await host.on_rebalance(_tps(0,), set(), _tps(0,))
        p0 = producers["g-1-0"]
        refuse = [True]

        async def offsets_once_refused(offsets, group_id):
            if refuse.pop() if refuse else False:
                raise KafkaError("coordinator moved")

        p0.send_offsets_to_transaction = offsets_once_refused
        await host.producer.send("out", None, b"v", 0, None, None, transactional_id="g-1-0")
        with pytest.raises(KafkaError):
            await host.commit({TP("src", 0): 10})
        await host.commit({TP("src", 0): 10})  # tried again: committed
        await host.producer.send("out", None, b"timer", 0, None, None, transactional_id="g-1-0")
        await host.on_rebalance(_tps(0,), set(), set())
        assert p0.committed == 2 and not host.app.tables.aborted_writes

    run(main())


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_exactly_once_commits_acked_offsets_before_a_rebalance_forgets_them(monkeypatch, guarantee):
    """Issue 23, finding 4: Faust forgets every partition's acks when a rebalance starts
    and commits only after that, so the transactions holding them stayed open through
    the rebalance (and timed out in a long one). Under exactly_once the consumer now
    stops the flow, lets batches in flight ack, and commits, ending those transactions,
    before Faust's revoke handling runs."""
    from types import SimpleNamespace

    from faust.transport.consumer import Consumer as FaustConsumer

    calls: list = []

    async def faust_revoked(self, revoked):
        calls.append("faust forgets acks")

    monkeypatch.setattr(FaustConsumer, "on_partitions_revoked", faust_revoked)
    consumer = object.__new__(FastConsumer)
    consumer.app = SimpleNamespace(in_transaction=guarantee == "exactly_once", should_stop=False)
    consumer._batch_next = {}
    consumer._last_timestamp = {}
    consumer.assignment = lambda: {"tp"}
    consumer.stop_flow = lambda: calls.append("stop flow")

    async def wait_empty():
        calls.append("in-flight acked")

    async def commit(topics=None, start_new_transaction=True):
        calls.append(("commit", start_new_transaction))

    consumer.wait_empty, consumer.commit = wait_empty, commit
    run(consumer.on_partitions_revoked({"tp"}))
    if guarantee == "exactly_once":
        assert calls == ["stop flow", "in-flight acked", ("commit", False), "faust forgets acks"]
    else:
        assert calls == ["faust forgets acks"]


def test_a_failed_commit_before_a_rebalance_still_lets_the_revocation_run(monkeypatch):
    """docs/delivery.md BC: the commit on revocation raised (a producer whose sender
    died), the error left ``on_partitions_revoked`` for aiokafka to log, and Faust's
    revoke handling and ``forget_batches`` were skipped: a revoked partition's acked
    offset stayed, to be committed when the partition came back."""
    import logging
    from types import SimpleNamespace

    from aiokafka.errors import KafkaError
    from faust.transport.consumer import Consumer as FaustConsumer

    calls: list = []

    async def faust_revoked(self, revoked):
        calls.append("faust revoke handling")

    monkeypatch.setattr(FaustConsumer, "on_partitions_revoked", faust_revoked)
    consumer = object.__new__(FastConsumer)
    consumer.app = SimpleNamespace(in_transaction=True, should_stop=False)
    consumer.log = logging.getLogger("test")
    consumer._batch_next = {"tp": 6123}
    consumer._last_timestamp = {}
    consumer.assignment = lambda: {"tp"}
    consumer.stop_flow = lambda: None

    async def wait_empty():
        pass

    async def commit(topics=None, start_new_transaction=True):
        raise KafkaError("Unexpected error during batch delivery")

    consumer.wait_empty, consumer.commit = wait_empty, commit
    run(consumer.on_partitions_revoked({"tp"}))
    assert calls == ["faust revoke handling"]
    assert consumer._batch_next == {}


def test_a_commit_by_count_runs_beside_the_fetch_loop_one_at_a_time():
    """Issue 22: Faust awaited the commit due after ``commit_every`` acked records inside
    the fetch loop, so no batch was fetched or delivered until the whole commit (every
    changed state written) ended: the pattern benchmark's first live alerts waited 165
    ms. ``commit_by_count`` returns at once with the commit running as a task, and
    starts no second one while it runs."""
    consumer = object.__new__(FastConsumer)
    consumer._count_commit = None
    started: list[asyncio.Event] = []

    async def commit(topics=None, start_new_transaction=True):
        done = asyncio.Event()
        started.append(done)
        await done.wait()
        return True

    consumer.commit = commit
    consumer.add_future = asyncio.ensure_future

    async def scenario():
        consumer.commit_by_count()  # not awaited: the fetch loop goes on
        await asyncio.sleep(0)
        assert len(started) == 1 and not consumer._count_commit.done()
        consumer.commit_by_count()  # due again while the first still runs: not doubled
        await asyncio.sleep(0)
        assert len(started) == 1
        started[0].set()
        await consumer._count_commit
        consumer.commit_by_count()
        await asyncio.sleep(0)
        assert len(started) == 2
        started[1].set()
        await consumer._count_commit

    run(scenario())


# --- static group membership (issue 23, finding 6) -----------------------------------


def test_a_worker_is_identified_by_app_host_and_web_port_and_may_opt_out():
    import socket

    from app.transport import static_identity

    derived = static_identity("", "orders", 6066)
    assert derived == f"orders.{socket.gethostname()}.6066".replace(":", "_")
    assert static_identity("", "orders", 6067) != derived  # another live worker on this host
    assert static_identity("pod-3", "orders", 6066) == "pod-3"
    assert static_identity("a b@c:1", "orders", 6066) == "a_b_c_1"  # only Kafka's legal characters
    assert static_identity("off", "orders", 6066) is None
    assert static_identity(" OFF ", "orders", 6066) is None


def test_the_instance_id_changes_with_the_workers_topics():
    """The coordinator hands a rejoining static member its old assignment without looking
    at its subscription (KAFKA-12759): a worker restarted with other topics must join as
    a new member, and one restarted with the same topics must get the same id."""
    from app.transport import group_instance_id

    same = group_instance_id("w", ["a", "b", "f-reply-w"])
    assert same == group_instance_id("w", ["f-reply-w", "b", "a"])
    assert same.startswith("w-")
    assert group_instance_id("w", ["a", "b", "c", "f-reply-w"]) != same


def test_a_static_member_leaves_the_group_on_a_graceful_stop():
    """aiokafka sends no LeaveGroup for a static member: a SIGTERM'd worker's partitions
    waited for its session to time out. ``StaticLeave`` sends LeaveGroup v3 naming it."""
    from app.transport import StaticLeave, StaticLeaveGroupRequest

    encoded = StaticLeaveGroupRequest("g", "m-1", "w-1").prepare({13: (0, 5)})
    assert encoded.API_VERSION == 3
    assert encoded.encode() == b"\x00\x01g" + b"\x00\x00\x00\x01" + b"\x00\x03m-1" + b"\x00\x03w-1"

    class Coordinator:
        group_id, member_id, generation, _group_instance_id = "g", "m-1", 7, "w-1"
        sent: list = []

        async def _send_req(self, request):
            self.sent.append(request.prepare({13: (0, 5)}))
            return SimpleNamespace(error_code=0, members=[("m-1", "w-1", 0)])

        def reset_generation(self):
            self.generation = -1

    from types import SimpleNamespace

    coordinator = Coordinator()
    run(StaticLeave(coordinator)())
    assert [r.members for r in coordinator.sent] == [[("m-1", "w-1")]]
    assert coordinator.generation == -1
    coordinator.sent.clear()
    run(StaticLeave(coordinator)())  # not in the group (any more): nothing to leave
    assert coordinator.sent == []


def test_session_timeout_setting_reaches_faust():
    from app import app, settings
    from app.settings import Settings, SettingsError

    assert Settings.from_env({}).session_timeout == 45.0
    assert app.conf.broker_session_timeout == settings.session_timeout
    with pytest.raises(SettingsError):
        Settings.from_env({"STREAMETL_SESSION_TIMEOUT": "3"})




def test_a_rebalance_stops_the_producers_of_partitions_that_became_standbys():
    """Issue 23 (docs/delivery.md, M): Faust stops the transactional producers of
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
        tables = RebalanceTxnApp.Tables()

    class Ready:  # a producer whose last transaction ended (aiokafka's READY state)
        class _txn_manager:  # noqa: N801
            from aiokafka.producer.transaction_manager import TransactionState

            state = TransactionState.READY

            @staticmethod
            def is_in_transaction():
                return False

    class Producer:
        def __init__(self):
            self._transaction_producers = {f"g-1-{p}": Ready() for p in range(4)}
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
    manager.commit_failed = set()
    active = {TP("src", 2), TP("src", 3)}
    revoked = {TP("src", 0), TP("src", 1)}
    run(manager.on_rebalance(active | Assignor.standbys, revoked, set()))
    assert sorted(manager.producer.stopped) == ["g-1-0", "g-1-1"]
    assert sorted(manager.producer._transaction_producers) == ["g-1-2", "g-1-3"]
    assert sorted(manager.producer.begun) == ["g-1-2", "g-1-3"]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_fenced_commit_of_a_zombie_is_refused_not_a_crash(monkeypatch, guarantee):
    """Issue 23 (the chaos verifier's zombie: SIGSTOP past the session, then SIGCONT):
    its timer commit found its transaction fenced by the new owner and the worker
    crashed (IllegalOperation "Not in the middle of a transaction"). Under exactly_once
    the commit is refused instead (nothing of the fenced transaction is visible); under
    at_least_once there are no transactions and an error stays an error."""
    from types import SimpleNamespace

    from aiokafka.errors import IllegalOperation
    from faust.transport.consumer import Consumer as FaustConsumer

    from app.transport import commit_guard

    async def fenced(self, topics=None, start_new_transaction=True):
        raise IllegalOperation("Not in the middle of a transaction")

    monkeypatch.setattr(FaustConsumer, "commit", fenced)
    monkeypatch.setattr(commit_guard, "before_commit", [])
    consumer = object.__new__(FastConsumer)
    aborted = []
    consumer.app = SimpleNamespace(in_transaction=guarantee == "exactly_once",
                                   tables=SimpleNamespace(on_aborted_writes=lambda: aborted.append(1)))
    consumer._broken_section = None
    consumer.__dict__["log"] = logging.getLogger("test")
    if guarantee == "exactly_once":
        assert run(consumer.commit()) is False
        # Its writes may be in the local RocksDB: no persisted offsets, no clean marker.
        assert aborted == [1]
    else:
        with pytest.raises(IllegalOperation):
            run(consumer.commit())


def test_a_stop_is_clean_only_when_no_transaction_holds_uncommitted_records():
    """``stopped_clean`` decides whether the clean-shutdown marker is written
    (tables/local_state.py): not after a crash, an interrupted processing section, or
    under exactly_once while a transactional producer still holds records (their
    writes are in RocksDB, and the transaction will be aborted)."""
    from types import SimpleNamespace

    from aiokafka.producer.transaction_manager import TransactionState

    from app.transport import stopped_clean

    def txn(state, empty=True):
        return SimpleNamespace(_txn_manager=SimpleNamespace(
            state=state, is_empty_transaction=lambda: empty, partitions_to_add=lambda: {}))

    def fake_app(producers, crashed=False, broken=None, eos=True, aborted=False):
        consumer = SimpleNamespace(crashed=False, _broken_section=broken)
        return SimpleNamespace(crashed=crashed, _consumer=consumer, in_transaction=eos,
                               tables=SimpleNamespace(aborted_writes=aborted),
                               producer=SimpleNamespace(_transaction_producers=producers))

    ready, empty_open = txn(TransactionState.READY), txn(TransactionState.IN_TRANSACTION)
    holding = txn(TransactionState.IN_TRANSACTION, empty=False)
    assert stopped_clean(fake_app({"a": ready, "b": empty_open}))
    assert not stopped_clean(fake_app({"a": ready, "b": holding}))
    assert not stopped_clean(fake_app({"a": txn(TransactionState.ABORTABLE_ERROR)}))
    assert not stopped_clean(fake_app({}, crashed=True))
    assert not stopped_clean(fake_app({}, broken=RuntimeError("cancelled")))
    assert stopped_clean(fake_app({"b": holding}, eos=False))  # at_least_once: acked writes only
    # A transaction was aborted or fenced earlier in this process: its writes may be local.
    assert not stopped_clean(fake_app({"a": ready}, aborted=True))


def test_an_exactly_once_commit_stores_the_changelog_offsets_its_transactions_ended():
    """Faust held each changelog write's offset until its transaction committed, then
    looked the held offsets up by the committed *source* partitions and never found
    them: no table had a persisted offset under exactly_once, and every start replayed
    every changelog from 0 (docs/delivery.md, S). A commit of source partition 0 now
    stores the held offset of changelog partition 0 (same transaction), not of 1; after
    an aborted transaction nothing is stored any more."""
    from types import SimpleNamespace

    from faust.types import TP

    from app.transport import TableManager

    stored: dict = {}

    class Store:
        def set_persisted_offset(self, tp, offset):
            stored[tp] = offset

    tm = object.__new__(TableManager)
    tm.app = SimpleNamespace(in_transaction=True, assignor=SimpleNamespace(group_for_topic=lambda topic: 0))
    tm._pending_persisted_offsets = {TP("cl", 0): (Store(), 41), TP("cl", 1): (Store(), 7)}
    tm.on_commit({TP("src", 0): 100})
    assert stored == {TP("cl", 0): 41}
    tm.aborted_writes = True
    tm.on_commit({TP("src", 1): 100})
    assert stored == {TP("cl", 0): 41}


def test_a_refused_first_partition_of_a_transaction_is_asked_again_after_2_ms_not_20():
    """Issue 22 (docs/performance.md, "exactly_once aggregate tail"): when the broker
    answers a transaction's first AddPartitionsToTxn with CONCURRENT_TRANSACTIONS (it is
    still writing the previous transaction's markers), aiokafka waits its
    ``BACKOFF_OVERRIDE`` before asking again: 20 ms, the whole p99 tail of sequential
    ``POST /api/v1/aggregate`` under exactly_once. Importing the app shortens it."""
    from types import SimpleNamespace

    from aiokafka.errors import ConcurrentTransactions
    from aiokafka.producer.sender import AddPartitionsToTxnHandler
    from aiokafka.structs import TopicPartition

    import app  # noqa: F401 - installs the transport (app/__init__.py)
    from app.transport import CONCURRENT_TRANSACTIONS_BACKOFF

    txn = SimpleNamespace(txn_partitions=set())  # nothing in the transaction yet
    sender = SimpleNamespace(_retry_backoff=0.1, _txn_manager=txn)
    handler = AddPartitionsToTxnHandler(sender, [TopicPartition("t", 0)])
    resp = SimpleNamespace(errors=[("t", [(0, ConcurrentTransactions.errno)])])
    assert handler.handle_response(resp) == CONCURRENT_TRANSACTIONS_BACKOFF == 0.002


def test_table_writes_are_handed_over_even_when_a_send_waits_longer_than_fausts_flush():
    """Faust's flush returns once a send takes over 0.1 s (a full record batch): under
    exactly_once the rest of the batch's table writes then missed its transaction.
    ``ProducerBuffer.handed_over`` waits for every message put before it."""
    from types import SimpleNamespace

    from app.transport import ProducerBuffer

    async def main():
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
        room, handed = asyncio.Event(), []

        class Channel:
            async def publish_message(self, fut, wait=False):
                if fut.n == 1:
                    await room.wait()  # its record batch is full for a while
                handed.append(fut.n)

        await buffer.start()
        try:
            for n in range(3):
                buffer.put(SimpleNamespace(n=n, message=SimpleNamespace(channel=Channel())))
            await buffer.flush()
            assert handed == [0]  # Faust's flush gave up
            waiting = asyncio.create_task(buffer.handed_over())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            room.set()
            await asyncio.wait_for(waiting, 5)
            assert handed == [0, 1, 2]
            await buffer.handed_over()  # nothing put since: returns at once
        finally:
            await buffer.stop()
        buffer.put(SimpleNamespace(n=3, message=SimpleNamespace(channel=Channel())))
        with pytest.raises(RuntimeError, match="not handed over"):  # stopped: no wait for ever
            await asyncio.wait_for(buffer.handed_over(), 5)

    asyncio.run(main())


def test_a_buffer_that_stopped_a_zombies_send_hands_its_reason_to_the_batch():
    """A woken zombie's send into a fenced transaction crashes the producer buffer with
    ``ZombieRestart``; the batch waiting for its table writes raised a RuntimeError
    instead, which became the worker's exit reason (a chained-fault run counted the
    deliberate exit as a crash)."""
    from types import SimpleNamespace

    from app.transport import ProducerBuffer, ZombieRestart

    async def main():
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
        reason = ZombieRestart("a send into a fenced transaction")

        class Channel:
            async def publish_message(self, fut, wait=False):
                raise reason

        await buffer.start()
        try:
            buffer.put(SimpleNamespace(n=0, message=SimpleNamespace(channel=Channel())))
            with pytest.raises(ZombieRestart) as raised:
                await asyncio.wait_for(buffer.handed_over(), 5)
            assert raised.value is reason
        finally:
            await buffer.stop()

    asyncio.run(main())


def test_the_app_producer_uses_the_counting_buffer():
    from app import app
    from app.transport import ProducerBuffer

    assert isinstance(app.producer.buffer, ProducerBuffer)
