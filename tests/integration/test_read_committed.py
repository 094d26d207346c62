"""An at_least_once worker reads only committed records (docs/delivery.md, AR).

Faust's consumer reads read_uncommitted unless the app runs exactly_once, but a topic
may hold a transactional producer's aborted records whatever the worker's guarantee:
an input written by an upstream exactly_once app, or a table changelog left by an
exactly_once run of this app whose worker died mid-transaction. Here such aborted
records are written with a plain aiokafka transactional producer (begin, send, abort),
and an at_least_once worker must act as if they were never written, while it handles
the committed records around them."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer

from tests.integration.test_pipelines import write_config
from tests.support import (
    BOOTSTRAP,
    Worker,
    kafka_options,
    produce_json,
    read_topic,
    run,
    unique,
    wait_for,
)

CONFIG = {"pipelines": [{
    "name": "dedupe", "source": "events", "sink": "events.clean",
    "steps": [{"op": "deduplicate", "horizon_seconds": 600}],
}]}


async def write_aborted(topic: str, records: list[tuple[bytes | None, bytes]], partition: int) -> None:
    """``records`` (key, value) sent to ``partition`` in a transaction that is aborted."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=unique("aborter"),
                                enable_idempotence=True, acks="all", **kafka_options())
    await producer.start()
    try:
        await producer.begin_transaction()
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
        await producer.abort_transaction()
    finally:
        await producer.stop()


def at_least_once_worker(name: str) -> Worker:
    return Worker(app_id=name, topic_prefix=f"{name}.",
                  env={"STREAMETL_PIPELINES_FILE": write_config(CONFIG),
                       "STREAMETL_PROCESSING_GUARANTEE": "at_least_once"})


async def emitted_ids(sink: str) -> list[str]:
    return sorted(r.json()["event_id"] for r in await read_topic(sink, timeout=10, idle=1.0))


def test_an_at_least_once_worker_skips_an_aborted_transaction_in_its_input(kafka):
    """Aborted input records (as an upstream exactly_once app leaves them) were processed
    as real: their outputs emitted, and their ids in the dedupe memory then dropped the
    committed record carrying the same id."""
    name = unique("rcin")
    w = at_least_once_worker(name)
    source, sink = w.topic_prefix + "events", w.topic_prefix + "events.clean"
    try:
        w.start(timeout=120)
        aborted = [{"event_id": "aborted-1"}, {"event_id": "aborted-2"}, {"event_id": "both"}]
        run(write_aborted(source, [(b"k", json.dumps(r).encode()) for r in aborted], partition=0))
        run(produce_json(source, [{"event_id": "both", "n": 1}, {"event_id": "committed"}], partition=0))

        async def committed_handled() -> bool:
            return "committed" in [r.json()["event_id"] for r in await read_topic(sink, timeout=10, idle=1.0)]

        run(wait_for(committed_handled, timeout=60, what="the committed record behind the aborted ones"))
        out = run(read_topic(sink, timeout=10, idle=1.0))
        assert sorted(r.json()["event_id"] for r in out) == ["both", "committed"]
        assert [r.json() for r in out if r.json()["event_id"] == "both"] == [{"event_id": "both", "n": 1}]
    finally:
        w.kill()


def test_an_at_least_once_worker_restores_its_tables_without_an_aborted_transaction(kafka):
    """A dedupe changelog holding an aborted transaction's entry (an exactly_once worker
    killed mid-transaction, then the app switched to at_least_once): the restore applied
    it, and the id it names was dropped as a duplicate though never admitted. The
    changelog then ends with the abort marker, which no record follows: the recovery
    still ends (it waited for ever)."""
    name = unique("rccl")
    source_name = f"{name}.events"
    changelog = f"{name}-pipeline-dedupe-dedupe-changelog"
    first = at_least_once_worker(name)
    sink = first.topic_prefix + "events.clean"
    try:
        first.start(timeout=120)
        run(produce_json(source_name, [{"event_id": "seed"}], partition=0))
        async def seed_admitted() -> bool:
            return await emitted_ids(sink) == ["seed"]

        run(wait_for(seed_admitted, timeout=60, what="seed admitted"))

        async def seed_entry() -> bytes | None:
            records = await read_topic(changelog, timeout=5, idle=1.0)
            return next((r.value for r in records if r.key == b"0|id:seed" and r.partition == 0), None)

        value = run(wait_for(seed_entry, timeout=30, interval=0.5, what="seed's dedupe entry in the changelog"))
    finally:
        first.stop()

    # What an aborted transaction leaves: an entry for "ghost", as recent as seed's.
    run(write_aborted(changelog, [(b"0|id:ghost", value)], partition=0))

    second = at_least_once_worker(name)  # same app, a data folder of its own: a full restore
    try:
        second.start(timeout=120)  # ready = recovery ended
        run(produce_json(source_name, [{"event_id": "seed", "n": 2}, {"event_id": "ghost"},
                                       {"event_id": "after"}], partition=0))
        async def after_admitted() -> bool:
            return "after" in await emitted_ids(sink)

        run(wait_for(after_admitted, timeout=60, what="the records after the restore"))
        # seed again: dropped (the committed entry was restored); ghost: admitted.
        assert run(emitted_ids(sink)) == ["after", "ghost", "seed"]
    finally:
        second.kill()


def test_the_global_readers_skip_an_aborted_transaction(kafka, monkeypatch):
    """The readers of the topics every worker reads whole (reference data, the pattern
    catalog and its counts, the alert history: ``app.global_topics``) read
    read_uncommitted: under exactly_once an aborted alert stayed in the history."""
    from app import global_topics
    from tests.support import create_topics

    monkeypatch.setattr(global_topics, "settings", global_topics.settings.replace(broker=f"kafka://{BOOTSTRAP}"))
    topic = unique("alerts-history")

    async def scenario() -> list[bytes]:
        await create_topics([topic], partitions=1)
        await produce_json(topic, [], raw=[b"committed-1"])
        await write_aborted(topic, [(b"k", b"aborted")], partition=0)
        await produce_json(topic, [], raw=[b"committed-2"])
        seen: list[bytes] = []
        await global_topics.read_recent(topic, 10, lambda m: seen.append(m.value))
        return seen

    assert run(scenario()) == [b"committed-1", b"committed-2"]
