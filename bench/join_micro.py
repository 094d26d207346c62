"""CPU per input record of the live join's own work (agents/join.py), without a broker.

``python -m bench.join_micro [events] [--profile]`` drives ``JoinRunner.process`` with
the join scenario's records (bench/scenarios/join.py: orders and payments over 10,000
keys, event time at 1,000 orders/s, payments 0-5 s after their order, within 10 s,
grace 30 s, 4 partitions), in fetches of ``--fetch`` records alternating between the
two sides, and reports ``time.process_time`` µs per input record. The state store is
``tables.store.MemoryStore`` (it encodes each write with orjson, as RocksDB's does);
the emitter keeps a few batches' outputs, as until their acknowledgement. A commit
(``before_commit``: outputs, then the state flush) every ``--commit`` fetches;
``--exactly-once``: the state is written at the end of every fetch instead, as under
exactly_once (through the in-memory store: Faust's per-record changelog path is left out).
The garbage collector is set up as in a worker (``app/gc_tuning.py``) unless
``--python-gc``; the fetches, made up front, are frozen with the rest of the heap.
What this leaves out: aiokafka's fetch parsing, the producer and the broker round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import random
import time

import orjson

PARTITIONS = 4


class Rec:
    __slots__ = ("offset", "timestamp", "key", "value", "headers")

    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.timestamp, self.key, self.value, self.headers = offset, 0, key, value, ()


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name


def fetches(n: int, keys: int, fetch: int, event_rate: float = 1000.0) -> list[tuple[str, list[tuple[int, list[Rec]]]]]:
    from aiokafka.partitioner import murmur2

    from bench.scenarios.join import make_pairs

    orders, payments = make_pairs(n, keys, random.Random(7), 1_700_000_000.0, event_rate)
    out = []
    offsets = {(s, p): 0 for s in "lr" for p in range(PARTITIONS)}
    for i in range(0, n, fetch):
        for side, records in (("l", orders[i:i + fetch]), ("r", payments[i:i + fetch])):
            parts: dict[int, list[Rec]] = {}
            for r in records:
                key = r["user_id"].encode()
                p = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
                parts.setdefault(p, []).append(Rec(offsets[(side, p)], key, orjson.dumps(r)))
                offsets[(side, p)] += 1
            out.append((side, sorted(parts.items())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.join_micro")
    parser.add_argument("events", nargs="?", type=int, default=100_000, help="records per side")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--fetch", type=int, default=2_000, help="records per fetch (one side)")
    parser.add_argument("--commit", type=int, default=8, help="fetches per commit")
    parser.add_argument("--event-rate", type=float, default=1000.0, help="orders/s of event time")
    parser.add_argument("--exactly-once", action="store_true",
                        help="the state written at the end of every fetch, as under exactly_once")
    parser.add_argument("--python-gc", action="store_true",
                        help="Python's collector thresholds, not the worker's (app/gc_tuning.py)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    from agents.join import JoinRunner
    from app.commit import CommitProtocol, MemoryEmitter
    from app.pipelines import parse_pipelines
    from bench.scenarios.join import config
    from tables.store import MemoryStore

    class Outputs(MemoryEmitter):
        async def send_later(self, out: list, sources: list) -> None:
            self.n = getattr(self, "n", 0) + len(out)
            self.sent.append(out)
            del self.sent[:-4]

    store_writes = [0, 0]

    class Store(MemoryStore):
        async def write_partitions(self, items: list, str_keys: bool = False) -> None:
            await super().write_partitions(items, str_keys)
            for p, key, value in items:
                store_writes[0] += 1
                store_writes[1] += 0 if value is None else len(self.data[p][key])

    spec = parse_pipelines(config(30.0)["pipelines"])[0]
    store = Store()
    emitter = Outputs(transactional=args.exactly_once)
    commit = CommitProtocol(emitter, defer=not args.exactly_once)
    runner = JoinRunner(spec, None, Topic("paid"), Topic("late"), left_name="orders", right_name="payments",
                        store=store, commit=commit)
    runner.checked = True
    batches = fetches(args.events, args.keys, args.fetch, args.event_rate)
    if not args.python_gc:
        # As app/gc_tuning.py sets up a worker: larger young passes, the heap so far frozen.
        from app import settings
        from app.gc_tuning import freeze_heap

        thresholds = settings.gc_threshold_values()
        if thresholds is not None:
            gc.set_threshold(*thresholds)
        freeze_heap()

    flush_cpu = [0.0]

    async def go() -> None:
        for i, (side, parts) in enumerate(batches, 1):
            await runner.process(side, parts)
            if i % args.commit == 0:
                c = time.process_time()
                await commit.before_commit()
                flush_cpu[0] += time.process_time() - c
        await commit.before_commit()

    profiler = cProfile.Profile() if args.profile else None
    c0 = time.process_time()
    if profiler:
        profiler.enable()
    asyncio.run(go())
    if profiler:
        profiler.disable()
    cpu = time.process_time() - c0
    total = 2 * args.events
    print(f"join_micro: {total} input records, {getattr(emitter, 'n', 0)} outputs, {cpu:.2f} CPU s, "
          f"{cpu / total * 1e6:.2f} µs/record, stats {dict(runner.stats)}")
    db = [v for part in store.data.values() for v in part.values()]
    print(f"state at the end: {len(db)} values, {sum(map(len, db)) / max(1, len(db)):.0f} bytes each; "
          f"{store_writes[0]} values written, {store_writes[1] / max(1, store_writes[0]):.0f} bytes each; "
          f"flushes {runner.flushes}, their CPU {flush_cpu[0]:.2f} s")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
