"""CPU per event of a pipeline's own work (parse, steps, encode to the sink), without a
broker.

``python -m bench.transform_micro [events] [--rounds N]`` runs the transform
scenario's steps (deduplicate, normalize, enrich, filter; bench/scenarios/transform.py)
over its events (~300-byte JSON clicks, 10,000 keys, every event unique) the way the
live pipeline does per record (agents/pipeline.py): ``loads_object``, ``pass_record``,
then the output encoded into its partition's record batch (``kafka_io.RecordBatches``
with a producer that only counts). Deduplication memory is a dict (``MemoryContext``),
reference rows a dict lookup. Reports ``time.process_time`` µs per event, per phase,
as the best of ``--rounds`` (this machine's speed varies from minute to minute).
For A/B comparisons count instructions instead, which do not vary: under
``valgrind --tool=callgrind``, ``--rounds 3`` minus ``--rounds 1``, divided by twice the
events, is the instructions per event of the measured work (docs/performance.md).
``metrics`` is what ``STREAMETL_METRICS=true`` adds per fetch (``Metrics.observe_batch``:
two histogram observations and the oldest-timestamp scan per partition), so its share of
``total`` is the cost of metrics in the worker's own work.
What this leaves out: the fetch, the dedupe state's storage, the broker round trips.
"""

from __future__ import annotations

import argparse
import gc
import time

import orjson

from app.codec import loads_object
from app.kafka_io import KeyPartitioner, RecordBatches
from app.metrics import Metrics
from bench.events import make_payloads
from bench.scenarios.transform import PIPELINE
from operators.steps import MemoryContext, Outcome, parse_steps, pass_record, runnable


class FetchedRecord:
    """What observe_batch reads of a fetched record: its Kafka timestamp."""

    __slots__ = ("timestamp",)

    def __init__(self, timestamp: int) -> None:
        self.timestamp = timestamp


class Fetch:
    """A fetch as a batch agent gets it: records by partition."""

    def __init__(self, parts: list) -> None:
        self.parts = parts


class CountingProducer:
    """Record batches are built as for a broker, then dropped."""

    def create_batch(self):
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(900 * 1024, 0)


def one_round(payloads: list[bytes], steps, users: dict, partition_of: KeyPartitioner,
              metrics: Metrics) -> dict[str, float]:
    ctx = MemoryContext(lookup=lambda source, key: users.get(key))
    batches = RecordBatches(CountingProducer())
    dumps = orjson.dumps
    timings = {"parse": 0.0, "steps": 0.0, "sink": 0.0, "metrics": 0.0}
    now_ms = int(time.time() * 1000)
    clock = time.process_time
    for start in range(0, len(payloads), 5000):  # fetches of 5,000 records
        chunk = payloads[start:start + 5000]
        t0 = clock()
        records = [loads_object(p) for p in chunk]
        t1 = clock()
        outcomes = [pass_record(steps, r, ctx) for r in records]
        t2 = clock()
        for outcome in outcomes:
            if outcome.__class__ is not Outcome:
                key = outcome["user_id"].encode()
                batches.add(partition_of(key), key, dumps(outcome))
        t3 = clock()
        batches._open, batches._full = {}, []  # sent and forgotten
        fetch = Fetch([(p, [FetchedRecord(now_ms - i) for i in range(p, len(chunk), 4)]) for p in range(4)])
        t4 = clock()
        metrics.observe_batch("pipeline.bench", fetch, t3 - t0)
        t5 = clock()
        timings["metrics"] += t5 - t4
        timings["parse"] += t1 - t0
        timings["steps"] += t2 - t1
        timings["sink"] += t3 - t2
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transform_micro")
    parser.add_argument("events", nargs="?", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    payloads = [orjson.dumps(p) for p in make_payloads(args.events)]
    users = {f"u{i:05d}": {"tier": ("gold", "silver", "bronze")[i % 3], "segment": f"s{i % 17}"}
             for i in range(10_000)}
    steps = runnable(parse_steps(PIPELINE["pipelines"][0]["steps"]))
    gc.set_threshold(50_000, 20, 100)  # as a worker (app/gc_tuning.py)
    gc.freeze()
    best: dict[str, float] = {}
    partition_of = KeyPartitioner(4)  # kept across fetches, as the worker's sink keeps it
    metrics = Metrics()
    for _ in range(args.rounds):
        timings = one_round(payloads, steps, users, partition_of, metrics)
        timings["total"] = sum(timings.values())
        for phase, seconds in timings.items():
            best[phase] = min(best.get(phase, float("inf")), seconds)
    print(" ".join(f"{phase} {1e6 * seconds / args.events:.2f}" for phase, seconds in best.items()),
          "µs/event (best of", args.rounds, "rounds)")


if __name__ == "__main__":
    main()
