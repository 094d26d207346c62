"""A processor test harness: run a processor over batches of records without a broker,
over the in-memory store and emitter, and get back what it sent and what it stored.

    runner = window_processor({"name": "t", "source": "clicks", ...})
    outputs, state = run_batches(runner, [[Record(0, 0, b'{"user": "a", "ts": 1, "v": 2}')]])

A processor here is anything with ``commit`` (an ``app.commit.CommitProtocol``) and an
async ``process(parts)`` taking ``(partition, records)`` pairs, the records with the
fields of aiokafka's ``ConsumerRecord`` (``WindowRunner``). Each batch is followed by a
commit (``commit_every``), as the worker's commit interval would.
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


__all__ = ["Record", "run_batches", "window_processor"]
