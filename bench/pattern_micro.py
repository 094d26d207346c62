"""CPU per event of the pattern engine's handler without Kafka (no broker needed).

Runs the bench's pattern-detect events through ``split_source_batch`` + ``match_items``
in batches of 5,000, with a dict standing in for RocksDB (get + JSON decode on a cache
miss, JSON encode per written state), and prints ``time.process_time`` per event. Also
the five matchers alone.

States are written as the worker writes them under at_least_once: changed states are
kept unwritten in the cache and encoded once per commit (``flush_states``), here every
``--flush-every=N`` batches. Default 12: the worker commits (and flushes) by time, every
3 s under at_least_once (``Settings.commit_interval_seconds``), which at the pattern
worker's ~20,000 events/s is every twelfth 5,000-record fetch
(``STREAMETL_COMMIT_EVERY``, 100,000 records, is not reached). ``--flush-every=4`` is
the 1 s interval of sessions 5-8; with Faust's 10,000-record commits it was every
second fetch (``--flush-every=2``); ``--flush-every=1`` writes every batch
(exactly_once, or before the write-back).

The garbage collector is set up as the worker sets it up (``app/gc_tuning.py``: the
thresholds of ``STREAMETL_GC_THRESHOLDS``, 50,000/20/100 by default, and the start-up
heap frozen), so the GC share is the worker's. Before, the micro ran with Python's
700/10/10 unless told otherwise, and its GC share (~25 µs per event) was several times
the worker's; ``--python-gc`` gives that set-up back.

    .venv/bin/python -m bench.pattern_micro [EVENTS] [--no-cache] [--python-gc] [--no-gc] [--profile] [--handler-only]

``--handler-only`` skips the matchers-alone figures (for instruction counts under
callgrind: run it for two event counts and divide the difference).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import time

import orjson
import yaml

from bench.events import make_payloads
from bench.scenarios.pattern_detect import PATTERNS


class Record:
    """The fields of a raw fetched record the pattern agent reads (offset, key, value)."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "__weakref__")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value

    @property
    def message(self) -> Record:
        return self


def main() -> None:
    args = sys.argv[1:]
    n = int(next((a for a in args if a.isdigit()), 100_000))
    flush_every = int(next((a.split("=", 1)[1] for a in args if a.startswith("--flush-every=")), 12))
    config = os.path.join(tempfile.mkdtemp(), "patterns.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"patterns": {"sources": ["events"], "source_key": "user_id",
                                     "definitions": PATTERNS}}, f)
    os.environ["STREAMETL_PIPELINES_FILE"] = config
    os.environ["STREAMETL_DATA_DIR"] = tempfile.mkdtemp()
    if "--no-cache" in args:
        os.environ["STREAMETL_PATTERN_STATE_CACHE"] = "0"
    from faust.types import TP

    import agents.patterns as engine  # after the environment: the app reads it at import
    from app.kafka_io import partition_for
    from tables.patterns import table_key_bytes

    store: dict[bytes, bytes] = {}
    engine.state_store.read = lambda _record, key: orjson.loads(store[key]) if key in store else None
    engine.state_cache.assignment = frozenset()
    engine.catalog.loaded.set()

    events = make_payloads(n, 10_000)
    base = time.time() - 100
    offsets = [0, 0, 0, 0]
    records = []
    for i, e in enumerate(events):
        e["ts"] = base + i / 20_000
        p = partition_for(e["user_id"].encode(), 4, 0)
        records.append(Record("events", p, offsets[p], e["user_id"].encode(), orjson.dumps(e)))
        offsets[p] += 1

    def parts(batch: list[Record]) -> list[tuple[TP, list[Record]]]:
        """A fetch's records as ``Batch.parts`` holds them: per partition, in order."""
        by_partition: dict[int, list[Record]] = {}
        for r in batch:
            by_partition.setdefault(r.partition, []).append(r)
        return [(TP("events", p), rs) for p, rs in sorted(by_partition.items())]

    batches = [parts(records[i:i + 5000]) for i in range(0, n, 5000)]

    # CPU per phase (process_time) and in the garbage collector (gc.callbacks).
    phases = {"split": 0.0, "match": 0.0, "encode": 0.0, "gc": 0.0}
    gc_started = [0.0]

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.process_time()
        else:
            phases["gc"] += time.process_time() - gc_started[0]

    cache = engine.state_cache

    async def run() -> int:
        alerts_total = 0
        clock = time.process_time
        for batch, i in enumerate(range(0, n, 5000)):
            t0 = clock()
            local = await engine.split_source_batch("events", batches[batch])
            t1 = clock()
            alerts, state_writes, _timers, _counts = engine.match_items(local, True)  # in place, as a batch alone in flight
            t2 = clock()
            if cache.limit <= 0:  # no cache: written every batch
                for _record, tkey, value in state_writes:
                    store[table_key_bytes(tkey)] = engine.encode_state(value)
            else:
                cache.put_dirty_many(state_writes)  # as apply_items does
            if (batch + 1) % flush_every == 0 or i + 5000 >= n:  # as flush_states does
                for p, tkey in cache.dirty:
                    store[table_key_bytes(tkey)] = engine.encode_state(cache.entries[(p, tkey)])
                cache.dirty.clear()
            phases["split"] += t1 - t0
            phases["match"] += t2 - t1
            phases["encode"] += clock() - t2
            alerts_total += len(alerts)
        return alerts_total

    if "--python-gc" not in args:  # as the worker does (app/gc_tuning.py)
        from app import settings
        from app.gc_tuning import freeze_heap

        thresholds = settings.gc_threshold_values()
        if thresholds is not None:
            gc.set_threshold(*thresholds)
        if settings.gc_freeze:
            freeze_heap()
    if "--no-gc" in args:
        gc.disable()
    if "--profile" in args:
        import cProfile
        import pstats

        cProfile.runctx("asyncio.run(run())", globals(), locals(), "/tmp/pattern_micro.prof")
        pstats.Stats("/tmp/pattern_micro.prof").sort_stats("tottime").print_stats(25)
        return
    gc.callbacks.append(on_gc)
    t0 = time.process_time()
    found = asyncio.run(run())
    spent = time.process_time() - t0
    gc.callbacks.remove(on_gc)
    print(f"handler: {spent / n * 1e6:.1f} CPU-µs per event ({n} events, {found} alerts)")
    print("  per phase (µs per event, GC included where it ran): "
          + ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in phases.items()))

    if "--handler-only" in args:
        return
    from app.patterns import EngineConfig, parse_definition

    total = 0.0
    for p in (parse_definition(d, EngineConfig()) for d in PATTERNS):
        states: dict[str, object] = {}
        t0 = time.process_time()
        for e in events:
            k = e["user_id"]
            states[k], _ = p.matcher.step(states.get(k), e, e["ts"], e["event_id"])
        spent = time.process_time() - t0
        total += spent
        print(f"  {p.name:24s} {spent / n * 1e6:6.2f} µs per event")
    print(f"matchers alone: {total / n * 1e6:.1f} µs per event")


if __name__ == "__main__":
    main()
