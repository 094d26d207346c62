"""A processor test harness: run a processor over batches of records without a broker,
over the in-memory store and emitter, and get back what it sent and what it stored.

    runner = window_processor({"name": "t", "source": "clicks", ...})
    outputs, state = run_batches(runner, [[Record(0, 0, b'{"user": "a", "ts": 1, "v": 2}')]])

    dedupe = pipeline_processor({"name": "p", "source": "in", "sink": "out",
                                 "steps": [{"op": "deduplicate", "horizon_seconds": 60}]})
    outputs, state = run_batches(dedupe, [[Record(0, 0, b'{"event_id": "a"}')]])

A processor here is anything with ``commit`` (an ``app.commit.CommitProtocol``), a
``store`` (``MemoryStore``) and an async ``process(parts)`` taking ``(partition,
records)`` pairs, the records with the fields of aiokafka's ``ConsumerRecord``
(``WindowRunner``; ``PipelineProcessor`` around the pipeline's own batch handler). Each
batch is followed by a commit (``commit_every``), as the worker's commit interval would.
Dead letters are in ``processor.commit.emitter.dead``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.commit import CommitProtocol, MemoryEmitter
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


__all__ = ["PipelineProcessor", "Record", "pipeline_processor", "run_batches", "window_processor"]
