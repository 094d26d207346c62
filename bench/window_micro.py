"""CPU per event of the window agent's own work, without a broker.

``python -m bench.window_micro [tumbling|hopping] [events] [--profile]`` drives
``WindowRunner.process`` (agents/window_aggregate.py) with the window-aggregate
scenario's events (10,000 keys, event time at 1,000/s, keyed by user_id, 4 partitions,
fetches of 5,000 records) and reports ``time.process_time`` µs per event. Kafka is
replaced by in-memory stand-ins that still do the encoding work: results and late
records are kept as the bytes the agent built (each batch's for a few batches, as
until their acknowledgement); the store encodes each write with orjson as the real one
does. Each fetch's records are aiokafka ``ConsumerRecord`` objects, made per fetch; the
CPU of making them (the consumer's work) is reported apart and not counted per event.
The collector is set up as in a worker (``app/gc_tuning.py``) unless ``--python-gc``.
What this leaves out: aiokafka's fetch parsing, the producer and the broker round trips. Commits (``flush``) happen every ``--commit``
fetches (default 8: about one second of input at 40,000 events/s).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml


def _config(kind: str) -> dict:
    from bench.scenarios.window_aggregate import config

    return config(kind, repartition=False)


def _stored(value: Any, str_keys: bool = False) -> bytes:
    # RocksDB keeps a copy of the encoded bytes. Keeping orjson's own output object
    # instead would hold its over-allocated buffer (about 4 KB with orjson 3.12+) per
    # key for the whole run, a cost the worker does not have.
    return bytes(memoryview(orjson.dumps(value, option=0 if str_keys else orjson.OPT_NON_STR_KEYS)))


class MemoryStore:
    """PartitionStore's interface over a dict; encodes like the real one."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, bytes], bytes] = {}
        self.writes = 0

    def read(self, event: Any, key: bytes) -> Any:
        raw = self.data.get((event.message.partition, key))
        return None if raw is None else orjson.loads(raw)

    def read_partition(self, partition: int, key: bytes) -> Any:
        raw = self.data.get((partition, key))
        return None if raw is None else orjson.loads(raw)

    async def write_many(self, items: list) -> None:
        for ev, key, value in items:
            self.data[(ev.message.partition, key)] = _stored(value)
            self.writes += 1

    async def write_partitions(self, items: list, str_keys: bool = False) -> None:
        for partition, key, value in items:
            self.data[(partition, key)] = _stored(value, str_keys)
            self.writes += 1

    def scan(self):
        for (_p, key), raw in self.data.items():
            yield key, orjson.loads(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.window_micro")
    parser.add_argument("kind", nargs="?", default="tumbling")
    parser.add_argument("events", nargs="?", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--fetch", type=int, default=5_000)
    parser.add_argument("--commit", type=int, default=8, help="fetches per commit (flush)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() while measuring")
    parser.add_argument("--python-gc", action="store_true",
                        help="Python's default collector set-up instead of the worker's "
                             "(STREAMETL_GC_THRESHOLDS, heap frozen after set-up)")
    args = parser.parse_args(argv)

    path = Path(tempfile.mkdtemp(prefix="streametl-micro-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(_config(args.kind)))
    os.environ["STREAMETL_PIPELINES_FILE"] = str(path)
    os.environ.setdefault("STREAMETL_DATA_DIR", str(path.parent / "data"))

    from aiokafka.partitioner import murmur2
    from aiokafka.structs import ConsumerRecord

    from agents.window_aggregate import RUNNERS, WindowRunner
    from app import startup
    from app.commit import CommitProtocol, MemoryEmitter

    startup.register_processors()  # what a worker's start does (App.discover)
    from bench.events import make_event

    store = MemoryStore()
    sent: list[Any] = []
    n_sent = 0

    class Outputs(MemoryEmitter):
        async def send_later(self, out: list, sources: list, grouped: Any = ()) -> None:
            # As the worker does: a batch's outputs live until the broker acknowledged
            # them (a few batches later), not for the whole run.
            nonlocal n_sent
            n_sent += len(out)
            sent.append(out)
            del sent[:-4]

    # As under at_least_once with the project's consumer: flush at each "commit".
    commit = CommitProtocol(Outputs(), defer=args.commit > 1)
    configured = RUNNERS[f"bench-{args.kind}"]
    runner = WindowRunner(configured.defn, None, None, configured.sink, configured.late, store=store, commit=commit)

    rng = random.Random(7)
    base = time.time() - args.events / 1000 - 60
    topic = "clicks"
    offsets = [0, 0, 0, 0]
    records = []
    for i in range(args.events):
        e = make_event(i, args.keys, rng, ts=base + i / 1000)
        key = e["user_id"].encode()
        p = (murmur2(key) & 0x7FFFFFFF) % 4
        # Plain tuples of bytes/ints (not tracked by the GC, like a worker's heap
        # between fetches); the record objects are made per fetch, as aiokafka does.
        records.append((p, offsets[p], key, orjson.dumps(e)))
        offsets[p] += 1
    batches = [records[i:i + args.fetch] for i in range(0, len(records), args.fetch)]
    # Within a fetch, records are grouped by partition (as Batch iterates them).
    batches = [sorted(b, key=lambda r: r[0]) for b in batches]
    del records
    gc.collect()
    if not args.python_gc:
        # As app/gc_tuning.py sets up a worker: larger young passes, start-up heap frozen.
        from app import settings
        from app.gc_tuning import freeze_heap

        thresholds = settings.gc_threshold_values()
        if thresholds is not None:
            gc.set_threshold(*thresholds)
        if settings.gc_freeze:
            freeze_heap()

    #: CPU spent making aiokafka's records (the consumer's work, not the agent's).
    consumer_cpu = 0.0

    async def go() -> None:
        nonlocal consumer_cpu
        flush = commit.before_commit
        for n, raw in enumerate(batches, 1):
            # What the consumer hands a batch agent: aiokafka's records of each partition
            # (made per fetch, as aiokafka does), grouped by partition (Batch.parts).
            c0 = time.process_time()
            parts: dict[int, list[ConsumerRecord]] = {}
            for p, o, k, v in raw:
                parts.setdefault(p, []).append(
                    ConsumerRecord(topic, p, o, None, 0, k, v, None, len(k), len(v), ()))
            consumer_cpu += time.process_time() - c0
            await runner.process(list(parts.items()))
            if flush is not None and n % args.commit == 0:
                await flush()
        if flush is not None:
            await flush()

    loop = asyncio.new_event_loop()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if args.no_gc:
        gc.disable()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.process_time()
    loop.run_until_complete(go())
    cpu = time.process_time() - t0 - consumer_cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    print(f"{args.kind}: {args.events} events in {len(batches)} fetches, {cpu:.3f} CPU s "
          f"(+ {consumer_cpu:.3f} making the consumer's records), "
          f"{cpu / args.events * 1e6:.1f} µs/event; outputs {n_sent}, store writes {store.writes}, "
          f"page faults/event {faults / args.events:.2f}, stats {dict(runner.stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
