"""Instructions per event of a pipeline's dedupe path, without a broker.

``python -m bench.dedupe_micro [events] [--rounds N] [--no-dedupe]`` runs a pipeline
of the transform scenario's deduplicate step alone (bench/scenarios/transform.py;
~300-byte clicks, every event unique) through the worker's own batch handler
(agents/pipeline.py ``pipeline_handler``, via ``app.harness.pipeline_processor``): fetches
of 5,000 records over 4 partitions, each batch's dedupe entries detached, stored into
the in-memory store (``MemoryStore``) and released, expiry run per partition. Each round
is a fresh processor and store. ``--no-dedupe``: the same pipeline without the step
(a ``normalize`` that changes nothing), so the difference of the two is the dedupe path.

Count instructions, which do not vary from run to run: under
``valgrind --tool=callgrind``, ``--rounds 3`` minus ``--rounds 1``, divided by twice the
events (docs/performance.md, "The dedupe path on the one store").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import orjson

from app.harness import Record, pipeline_processor
from bench.events import make_payloads
from bench.scenarios.transform import PIPELINE

FETCH = 5000
PARTITIONS = 4


def one_round(batches: list[list[tuple[int, list[Record]]]], definition: dict) -> float:
    processor = pipeline_processor(definition)
    t0 = time.process_time()

    async def go() -> None:
        for parts in batches:
            await processor.process(parts)

    asyncio.run(go())
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dedupe_micro")
    parser.add_argument("events", nargs="?", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dedupe", action="store_true")
    args = parser.parse_args()
    spec = PIPELINE["pipelines"][0]
    step = {"op": "normalize"} if args.no_dedupe else spec["steps"][0]
    definition = {"name": "bench", "source": "events", "sink": "events.clean", "steps": [step]}
    payloads = [orjson.dumps(p) for p in make_payloads(args.events)]
    batches = []
    for start in range(0, len(payloads), FETCH):
        parts: dict[int, list[Record]] = {p: [] for p in range(PARTITIONS)}
        for i in range(start, min(start + FETCH, len(payloads))):
            parts[i % PARTITIONS].append(Record(i % PARTITIONS, i // PARTITIONS, payloads[i]))
        batches.append(list(parts.items()))
    gc.set_threshold(50_000, 20, 100)  # as a worker (app/gc_tuning.py)
    gc.freeze()
    best = min(one_round(batches, definition) for _ in range(args.rounds))
    print(f"{1e6 * best / args.events:.2f} µs/event (best of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
