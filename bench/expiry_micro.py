"""CPU per entry of the dedupe expiry, in memory (``ExpiryQueue``) and on disk
(``ExpiryIndex``), without a broker.

``python -m bench.expiry_micro [--batch N] [--rounds R]`` stores ``R`` batches of
``N`` entries (``stored``, as ``LiveContext.store_after`` does) into each kind; after a
backlog of 10 batches, each round also expires as many entries as it stores (``oldest``
then ``drop``, as the pipeline's ``expire`` does). Prints the microseconds per entry of
each part, three times, the two kinds alternated (docs/performance.md, "The dedupe
expiry on disk").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from tables.store import ExpiryIndex, ExpiryQueue

BACKLOG = 10


def one_kind(queue: Any, batch: int, rounds: int) -> tuple[float, float]:
    """(µs per stored entry, µs per expired entry) of ``rounds`` batches."""
    stored = expired = 0.0
    seq = 0
    for r in range(rounds):
        values = {f"0|id:{seq + i:09}".encode(): (1.7e9 + seq + i, seq + i) for i in range(batch)}
        seq += batch
        t0 = time.perf_counter()
        queue.stored(values)
        stored += time.perf_counter() - t0
        if r < BACKLOG:
            continue
        t0 = time.perf_counter()
        entries = queue.oldest()
        n = 0
        for _entry in entries:
            n += 1
            if n >= batch:
                break
        entries.close()
        queue.drop(n)
        expired += time.perf_counter() - t0
    return stored * 1e6 / (rounds * batch), expired * 1e6 / ((rounds - BACKLOG) * batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.expiry_micro")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    if args.rounds <= BACKLOG:
        parser.error(f"--rounds must be more than {BACKLOG}")
    folder = Path(tempfile.mkdtemp(prefix="streametl-expiry-"))
    for i in range(3):
        for name, queue in (("memory (ExpiryQueue)", ExpiryQueue()), ("disk (ExpiryIndex)", ExpiryIndex(folder / str(i)))):
            stored, expired = one_kind(queue, args.batch, args.rounds)
            print(f"{name:22} stored {stored:.3f} µs/entry, expired {expired:.3f} µs/entry")
            queue.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
