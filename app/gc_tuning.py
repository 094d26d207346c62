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
only what was created since.

The thresholds go from Python's 700/10/10 to ``Settings.gc_thresholds`` (50,000/20/100):
fewer, larger passes. Records in flight then mostly die (reference counting frees them
the moment they are processed) before a young pass would have walked and promoted them.
Measured on the idle machine, against the freeze alone: pattern-detect 14.4k → 20.1k
events/s (73 → 53 CPU s per million events), transform's p99 latency at 5,000 events/s
210–465 → 74–79 ms. (On a machine loaded 3×, the larger young passes looked like
30–150 ms pauses; on the idle machine the latency got better, not worse.) The collector
still runs for cycles.
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
def tune_gc_at_worker_init(sender: Any = None, **kwargs: Any) -> None:
    thresholds = settings.gc_threshold_values()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    if settings.gc_freeze:
        freeze_heap()


@app.on_rebalance_complete.connect
async def freeze_after_first_assignment(sender: Any = None, **kwargs: Any) -> None:
    global _frozen_after_assignment
    if settings.gc_freeze and not _frozen_after_assignment:
        _frozen_after_assignment = True
        log.info("gc: %d objects frozen after the first assignment", freeze_heap())
