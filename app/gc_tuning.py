"""Garbage-collector set-up of a streaming worker: freeze what start-up built.

Why: CPython's cyclic collector runs a full pass over every tracked object once enough
objects have survived younger passes. A worker holds whole fetches of records (several
thousand container objects each) while it processes them, so survivors pile up fast,
and each full pass walked the worker's whole heap (Faust, aiokafka, aiohttp, tables:
about 120,000 objects after start-up): measured with ``gc.callbacks`` in the
agent-passthrough benchmark, full passes of 100–180 ms every few hundred milliseconds.
They were the "sporadic stalls" of the consume path (docs/performance.md).

``gc.freeze()`` moves every object alive at that moment into the permanent generation,
which no collection scans. It runs when the worker starts (after autodiscovery: the
modules, the app, agents, tables and views exist) and once more after the first
assignment and table recovery (clients, stores, recovered state). Full passes then walk
only what was created since. Python's thresholds are kept: raising the young-generation
threshold made each young pass walk a whole fetch in flight (30–150 ms pauses).
Records are still freed by reference counting the moment they are processed, and the
collector still runs for cycles.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from app import app, settings

log = logging.getLogger(__name__)

_frozen_after_assignment = False


def freeze_heap() -> int:
    """Collect garbage, then freeze everything alive; returns the frozen object count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@app.on_worker_init.connect
def freeze_at_worker_init(sender: Any = None, **kwargs: Any) -> None:
    if settings.gc_freeze:
        log.info("gc: %d objects frozen at worker start", freeze_heap())


@app.on_rebalance_complete.connect
async def freeze_after_first_assignment(sender: Any = None, **kwargs: Any) -> None:
    global _frozen_after_assignment
    if settings.gc_freeze and not _frozen_after_assignment:
        _frozen_after_assignment = True
        log.info("gc: %d objects frozen after the first assignment", freeze_heap())
