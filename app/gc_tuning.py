"""Garbage-collector settings for a streaming worker.

Why: CPython's cyclic collector runs a young-generation pass every 700 net new container
objects, and a full pass over every tracked object once enough survivors pile up. A
worker holds whole fetches of records (several thousand objects each) while it processes
them, so they survive young passes, and full passes over the worker's whole heap (Faust,
aiokafka, aiohttp, tables: hundreds of thousands of objects) ran every few hundred
milliseconds, 100–180 ms each: measured with ``gc.callbacks`` in the agent-passthrough
benchmark, where they were the "sporadic stalls" of the consume path.

What this does, once the worker has started:

* ``gc.freeze()``: everything alive after start-up (modules, the app, its services,
  agents, views) moves to the permanent generation, which no collection scans.
* The young-generation threshold goes up (``Settings.gc_gen0_threshold``), so a fetch
  in flight does not trigger collections on its own. Records are freed by reference
  counting as soon as they are processed; the collector is only needed for cycles, and
  still runs for them.
"""

from __future__ import annotations

import gc
import logging

from app import app, settings

log = logging.getLogger(__name__)


def tune_gc(gen0_threshold: int) -> None:
    """Freeze what is alive now and raise the young-generation threshold (0: no change)."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold())


@app.task
async def tune_gc_after_start() -> None:
    """Runs when the worker's app starts (agents, tables and views exist by then)."""
    tune_gc(settings.gc_gen0_threshold)
