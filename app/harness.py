"""A processor test harness: run a processor over batches of records without a broker,
over the in-memory store and emitter, and get back what it sent and what it stored.

    runner = window_processor({"name": "t", "source": "clicks", ...})
    outputs, state = run_batches(runner, [[Record(0, 0, b'{"user": "a", "ts": 1, "v": 2}')]])

    dedupe = pipeline_processor({"name": "p", "source": "in", "sink": "out",
                                 "steps": [{"op": "deduplicate", "horizon_seconds": 60}]})
    outputs, state = run_batches(dedupe, [[Record(0, 0, b'{"event_id": "a"}')]])

    rule = pattern_processor([{"name": "big", "type": "threshold", "key_by": "card",
                               "source": "tx", "where": "value > 90"}], source="tx")
    outputs, state = run_batches(rule, [[Record(0, 0, b'{"card": "c1", "value": 95, "ts": 1}')]])

A processor here is anything with ``commit`` (an ``app.commit.CommitProtocol``), a
``store`` (``MemoryStore``) and an async ``process(parts)`` taking ``(partition,
records)`` pairs, the records with the fields of aiokafka's ``ConsumerRecord``
(``WindowRunner``; ``PipelineProcessor`` around the pipeline's own batch handler;
``PatternProcessor`` around the pattern engine's). Each
batch is followed by a commit (``commit_every``), as the worker's commit interval would.
Dead letters are in ``processor.commit.emitter.dead``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.commit import CommitProtocol, MemoryEmitter
from app.settings import settings
from app.transport import CommitGuard
from tables.store import MemoryStore


@dataclass(slots=True)
class Record:
    """One input record of a partition (what a batch agent is handed)."""

    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int | None = 1000  # ms
    headers: Sequence[tuple[str, bytes]] = field(default_factory=tuple)
    topic: str = "in"


def window_processor(definition: Mapping[str, Any], *, exactly_once: bool = False) -> Any:
    """A window (a ``windows:`` entry) over a ``MemoryStore`` and a ``MemoryEmitter``."""
    from agents.window_aggregate import WindowRunner
    from app.windows import parse_window_def

    defn = parse_window_def(dict(definition))
    commit = CommitProtocol(MemoryEmitter(transactional=exactly_once), defer=not exactly_once)
    return WindowRunner(defn, None, None, defn.sink, defn.late_topic, store=MemoryStore(), commit=commit)


class PipelineProcessor:
    """A pipeline (a ``pipelines:`` entry) as the worker runs it (agents/pipeline.py's
    ``pipeline_handler``), its dedupe state over a ``MemoryStore``, its outputs into a
    ``MemoryEmitter``; ``counters``: the pipeline's counters (in, out, dropped)."""

    def __init__(self, definition: Mapping[str, Any], *, exactly_once: bool = False,
                 store: MemoryStore | None = None) -> None:
        from agents.pipeline import LiveContext, PipelineCounters, pipeline_handler
        from app.pipelines import parse_pipelines
        from operators.steps import StepTally

        (spec,) = parse_pipelines([dict(definition)])
        self.spec = spec
        self.commit = CommitProtocol(MemoryEmitter(transactional=exactly_once), defer=not exactly_once)
        #: Pass the store of an earlier processor to run on after a "restart".
        self.store = store if store is not None else MemoryStore()
        self.ctx = LiveContext(spec, None)
        if spec.has_state:
            self.ctx.store = self.store
            self.commit.register(self.ctx.cache)
        self.counters = PipelineCounters(steps=StepTally(spec.steps))
        self.handler = pipeline_handler(spec, self.ctx, spec.output_topic, spec.source, self.counters,
                                        self.commit.emitter, wait_for_inputs=False)

    async def process(self, parts: Sequence[tuple[int, Sequence[Record]]]) -> None:
        from faust.types import TP

        from app.batches import Batch

        batch = Batch()
        for partition, records in parts:
            batch.add(TP(self.spec.source, partition), list(records))
        await self.handler(batch)
        for work in batch.take_later():  # before the batch would be acked
            await work


def pipeline_processor(definition: Mapping[str, Any], *, exactly_once: bool = False,
                       store: MemoryStore | None = None) -> PipelineProcessor:
    """A pipeline (a ``pipelines:`` entry) over a ``MemoryStore`` and a ``MemoryEmitter``."""
    return PipelineProcessor(definition, exactly_once=exactly_once, store=store)


class PatternProcessor:
    """Pattern rules (``patterns:`` definitions) as the engine runs them
    (agents/patterns.py): each batch of ``source`` records parsed and split
    (``split_source_batch``), the records it forwards to the repartition topic matched
    as the repartition agent matches them (``parse_repartitioned``), then
    ``apply_items``; state over ``MemoryStore`` s (``store``: pattern-state, ``timers``,
    ``counts``), alerts into a ``MemoryEmitter``. The forwarded records stay internal:
    they are not in the outputs.

    The engine keeps its stores, cache, emitter and commit protocol in module globals
    (tables/patterns.py); the processor puts its own in their place while it handles a
    batch, and restores them after."""

    def __init__(self, definitions: Sequence[Mapping[str, Any]], *, source: str = "events",
                 exactly_once: bool = False, cache_limit: int = 1000) -> None:
        from app.patterns import EngineConfig, parse_definition
        from tables.patterns import StateCache

        self.source = source
        engine = EngineConfig(sources=(source,))
        self.patterns = {d["name"]: parse_definition(dict(d), engine, "runtime") for d in definitions}
        # With a guard of its own, as the worker's: a commit encodes its parts only while
        # no batch is in its processing section, which is what keeps a state a lone batch
        # changes in place out of a commit until its alerts are sent.
        self.guard = CommitGuard()
        self.commit = CommitProtocol(MemoryEmitter(transactional=exactly_once), defer=not exactly_once,
                                     guard=self.guard)
        self.store, self.timers, self.counts = MemoryStore(), MemoryStore(), MemoryStore()
        self.cache = self.commit.register(StateCache(cache_limit, self.store))
        #: The next offset of each partition of the (simulated) repartition topic.
        self.forwarded: dict[int, int] = {}

    @contextmanager
    def installed(self) -> Iterator[Any]:
        """The engine module, with this processor's stores, cache and outputs in place."""
        import agents.patterns as engine

        own = {"state_store": self.store, "timer_store": self.timers, "count_store": self.counts,
               "state_cache": self.cache, "emitter": self.commit.emitter, "commit_protocol": self.commit,
               "current_assignment": lambda: frozenset()}
        saved = {name: getattr(engine, name) for name in own}
        runtime = engine.catalog.runtime
        try:
            for name, value in own.items():
                setattr(engine, name, value)
            engine.catalog.runtime = self.patterns
            yield engine
        finally:
            for name, value in saved.items():
                setattr(engine, name, value)
            engine.catalog.runtime = runtime

    async def process(self, parts: Sequence[tuple[int, Sequence[Record]]]) -> None:
        from faust.types import TP

        from app.batches import BatchRecord
        from app.kafka_io import KeyPartitioner

        sent = self.commit.emitter.sent
        with self.installed() as engine:
            first = len(sent)
            items = await engine.split_source_batch(
                self.source, [(TP(self.source, partition), list(records)) for partition, records in parts])
            forwarded = [out for out in sent[first:] if out[0] is engine.repartition_topic]
            del sent[first:first + len(forwarded)]  # the split's only outputs: internal
            partition_of = KeyPartitioner(settings.topic_partitions)
            topic = engine.repartition_topic.get_topic_name()
            for _, key, value, _, _ in forwarded:
                p = partition_of(key)
                offset = self.forwarded[p] = self.forwarded.get(p, -1) + 1
                item = engine.parse_repartitioned(BatchRecord(TP(topic, p), Record(p, offset, value, key)))
                if item is not None:
                    items.append(item)
            if items:
                async with self.guard.processing():
                    await engine.apply_items(items)


def pattern_processor(definitions: Sequence[Mapping[str, Any]], *, source: str = "events",
                      exactly_once: bool = False) -> PatternProcessor:
    """Pattern rules over ``MemoryStore`` s and a ``MemoryEmitter``."""
    return PatternProcessor(definitions, source=source, exactly_once=exactly_once)


def run_batches(processor: Any, batches: Iterable[Sequence[Record]], *,
                commit_every: int = 1) -> tuple[list[tuple[Any, bytes | None, bytes, tuple, int | None]],
                                                dict[int, dict[bytes, Any]]]:
    """Feed each batch (its records grouped by partition, in order) to ``processor``,
    commit every ``commit_every`` batches and at the end; returns (every output as
    (topic, key, value, headers, source partition), the stored state as
    {partition: {key: decoded value}})."""

    async def go() -> None:
        n = 0
        for n, batch in enumerate(batches, 1):
            parts: dict[int, list[Record]] = {}
            for record in batch:
                parts.setdefault(record.partition, []).append(record)
            await processor.process(list(parts.items()))
            if n % commit_every == 0:
                await processor.commit.before_commit()
        await processor.commit.before_commit()

    asyncio.run(go())
    emitter = processor.commit.emitter
    store = processor.store
    state = {p: {key: orjson.loads(raw) for key, raw in db.items()} for p, db in store.data.items()}
    return list(emitter.sent), state


__all__ = ["PatternProcessor", "PipelineProcessor", "Record", "pattern_processor", "pipeline_processor",
           "run_batches", "window_processor"]
