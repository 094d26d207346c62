"""Batch agents: a handler receives, in one call, every record one fetch returned for its
topic, and the consumer acks them all when it returns.

Why: Faust delivers each record on its own (decode through the serializer registry, a
``Message`` and an ``Event`` object, a queue hop into the agent's stream, one ack per
record), about 80-100 µs per record here: a bare ``take`` agent peaks near 9,000
events/s while the aiokafka consumer under it fetches 200,000+/s (issue 6, profiles in
docs/performance.md). A batch agent skips all of that: it gets the fetched aiokafka records
as a :class:`Batch`, iterated as slotted :class:`BatchRecord` objects (no decoding: the
handler decodes what it reads), and the whole batch is acked with one bookkeeping step
per partition.

Delivery contract (implemented in ``app.transport.FastConsumer``):

* The handler runs in the consumer's fetch loop; the next fetch's records are delivered
  only after it returns, so at most one batch per worker is in flight (the natural
  backpressure; aiokafka keeps prefetching meanwhile).
* Records are acked only after the handler returned: an offset is never committed before
  its record was processed (at-least-once). Under exactly_once the call and its acks form
  one ``commit_guard.processing()`` section, so a transaction commits outputs and the
  offsets of the records that produced them together, or neither; sends made in the
  handler join the transaction of the input partition they come from, when the handler
  says which (``from_partition``), else of their own partition number
  (``PROCESSING_TOPIC``, ``app.transport.TransactionManager``; docs/delivery.md).
* Rebalances wait for a running handler (``Consumer.wait_empty``), and no batch starts
  while flow is suspended or after the consumer generation changed.
* A handler that raises crashes the worker without acking its batch (like Kafka Streams'
  default): records are reprocessed from the last commit after a restart. Handlers send
  bad *records* to the dead-letter topic themselves; an exception means the worker
  cannot go on (e.g. the sink is unreachable).
* Within one partition records arrive in offset order; a batch may mix partitions.
* Work a handler hands to :meth:`Batch.finish_later` (typically: wait for the acks of
  the outputs it sent, then store its state) must finish before the batch is acked, but
  under at_least_once the next batches may be handled meanwhile: up to
  ``app.transport.MAX_FINISHING`` batches finish in the background, each after the one
  before it, batches are acked in order, a rebalance waits for all of them, and a failure
  there crashes the worker like a handler failure. Under exactly_once that work is
  awaited inside the handler's section, before the acks, as if the handler had awaited
  it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from faust.types import TP


class BatchRecord:
    """One consumed record. Mirrors the fields of Faust's ``Event``/``Message`` that this
    project reads (``.message`` is the record itself), so code written for Faust events
    (and Faust tables, which read the current event's ``message.partition``) accepts it.
    ``key`` and ``value`` are the raw bytes; ``timestamp`` is in seconds, as in Faust."""

    __slots__ = ("tp", "topic", "partition", "offset", "timestamp", "key", "value", "raw_headers", "__weakref__")

    def __init__(self, tp: TP, record: Any) -> None:
        self.tp = tp
        self.topic = tp.topic
        self.partition = tp.partition
        self.offset = record.offset
        ts = record.timestamp
        self.timestamp = None if ts is None else ts / 1000.0
        self.key = record.key
        self.value = record.value
        self.raw_headers = record.headers

    @property
    def message(self) -> BatchRecord:
        return self

    @property
    def headers(self) -> dict[str, bytes]:
        """Headers as a dict (Faust ``Event.headers``); the last value of a repeated key."""
        raw = self.raw_headers
        return dict(raw) if raw else {}

    def __repr__(self) -> str:
        return f"<BatchRecord {self.topic}[{self.partition}]@{self.offset}>"


class Batch:
    """The records one fetch returned for one batch agent, grouped by partition.

    Records are wrapped in :class:`BatchRecord` only as they are iterated (about 1 µs
    each): a handler that needs only the count (``len``) or one partition's raw
    aiokafka records (``parts``) pays nothing per record."""

    __slots__ = ("parts", "_len", "_later")

    def __init__(self) -> None:
        #: (partition, raw aiokafka records of it, in offset order). A raw record has
        #: ``offset``, ``timestamp`` (ms), ``key``, ``value`` and ``headers`` (a list of
        #: (str, bytes)); not ``topic`` or ``partition``: take them from the partition
        #: (app/transport.py: RawPartitionRecords).
        self.parts: list[tuple[TP, list[Any]]] = []
        self._len = 0
        self._later: list[Awaitable[Any]] = []

    def finish_later(self, work: Awaitable[Any]) -> None:
        """Await ``work`` before this batch is acked, possibly while the next batch is
        handled (see the module's delivery contract).

        Why: waiting for the broker's acks of a batch's outputs and state takes a few
        milliseconds per batch in which the worker has nothing else to do; a live stream
        spends that time idle between batches, and its records wait for it."""
        self._later.append(work)

    def take_later(self) -> list[Awaitable[Any]]:
        """The work handed to :meth:`finish_later`, in order (and forget it)."""
        later, self._later = self._later, []
        return later

    def add(self, tp: TP, records: list[Any]) -> None:
        self.parts.append((tp, records))
        self._len += len(records)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[BatchRecord]:
        for tp, records in self.parts:
            for record in records:
                yield BatchRecord(tp, record)

    def __repr__(self) -> str:
        return f"<Batch of {self._len} records from {len(self.parts)} partitions>"


Handler = Callable[[Batch], Awaitable[None]]

#: The source topic of the batch being handled in this context (None outside a
#: handler). Under exactly_once, sends made while it is set must join the transaction
#: of the input (``app.transport.TransactionManager``).
PROCESSING_TOPIC: ContextVar[str | None] = ContextVar("streametl_processing_topic", default=None)

#: The partition (of ``PROCESSING_TOPIC``) of the record the outputs being sent now come
#: from, when the handler says so (``from_partition``). Under exactly_once such an output
#: joins that partition's transaction, the one that commits the record's offset, to
#: whichever partition of its own topic it goes.
SOURCE_PARTITION: ContextVar[int | None] = ContextVar("streametl_source_partition", default=None)


@contextmanager
def from_partition(partition: int | None) -> Iterator[None]:
    """Sends inside come from a record of ``partition`` of the topic being processed."""
    token = SOURCE_PARTITION.set(partition)
    try:
        yield
    finally:
        SOURCE_PARTITION.reset(token)


@dataclass
class BatchAgent:
    """A registered batch handler of one topic."""

    name: str
    topic: Any
    handler: Handler


#: topic name -> its batch agents, called in turn with the same batch; the records are
#: acked once, after the last of them returned.
BATCH_AGENTS: dict[str, list[BatchAgent]] = {}


def batch_agent(topic: Any, name: str) -> Callable[[Handler], Handler]:
    """Register ``handler`` as a batch agent of ``topic`` (a Faust topic) and subscribe
    the worker to it. Every record of that topic then goes to its batch agents (several
    may read one topic, e.g. a pipeline and the patterns on ``events``), never to a Faust
    stream: a topic has batch agents or Faust agents, not both."""

    def register(handler: Handler) -> Handler:
        from app import app  # here: app.transport imports this module before app exists

        topic_name = topic.get_topic_name()
        agents = BATCH_AGENTS.setdefault(topic_name, [])
        if any(a.name == name for a in agents):
            raise ValueError(f"topic {topic_name!r} already has a batch agent named {name!r}")
        agents.append(BatchAgent(name, topic, handler))
        # The conductor subscribes the consumer to its topics and marks them as acked
        # topics (commits follow acks); the consumer routes their records here.
        app.topics.add(topic)
        return handler

    return register


def for_topic(topic_name: str) -> list[BatchAgent] | None:
    """The batch agents reading ``topic_name``, if any."""
    return BATCH_AGENTS.get(topic_name)


__all__ = ["BATCH_AGENTS", "PROCESSING_TOPIC", "SOURCE_PARTITION", "Batch", "BatchAgent", "BatchRecord", "batch_agent",
           "for_topic", "from_partition"]
