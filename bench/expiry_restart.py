"""What a partition's dedupe expiry costs at the first batch after a move or a start,
without a broker: built from the table, or reopened (docs/performance.md, "The dedupe
expiry kept across moves").

``python -m bench.expiry_restart [--entries N] [--runs R]`` writes ``N`` dedupe entries
(``0|id:...`` -> ``[at, seq]``, as ``TableMemory`` stores them) into a RocksDB standing
for one table partition, then ``R`` times: closes the partition's expiry and builds it
again from the table (what ``Expiry.ensure`` and ``Expiry.build_some`` do after the
table changed, or without a kept index), and closes it to be kept and reopens it (what
``ensure`` does otherwise). Prints the seconds of each, and the longest build step: the
worker reopens in one batch, and builds ``Expiry.BUILD_STEP`` table keys per batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from rocksdict import Rdict, WriteBatch

from agents.pipeline import _seen_at
from tables.store import Expiry


class TableStandIn:
    """``PartitionStore.scan_partition`` over one RocksDB."""

    def __init__(self, db: Rdict) -> None:
        self.db = db

    def scan_partition(self, partition: int, start: bytes = b"") -> Any:
        for key, raw in self.db.items(from_key=start) if start else self.db.items():
            if raw is not None:
                yield key, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="expiry-restart-"))
    db = Rdict(str(folder / "table"))
    batch = WriteBatch()
    for i in range(args.entries):
        batch.put(f"0|id:{i:012}".encode(), orjson.dumps([1.7e9 + i / 5000, i]))
        if i % 100_000 == 99_999:
            db.write(batch)
            batch = WriteBatch()
    db.write(batch)
    store = TableStandIn(db)
    expiry = Expiry(_seen_at, lambda: folder / "expiry")
    print(f"{args.entries:,} entries in one partition, {Expiry.BUILD_STEP:,} table keys a build step")
    for run in range(args.runs):
        expiry.forget()
        expiry.changed.add(0)  # as after a restore: built from the table
        t0 = time.perf_counter()
        expiry.ensure(0, store)
        longest, done = 0.0, False
        while not done:
            t1 = time.perf_counter()
            done = expiry.build_some(0, store)
            longest = max(longest, time.perf_counter() - t1)
        built = time.perf_counter() - t0
        assert len(expiry.queues[0]) == args.entries
        expiry.forget()
        t0 = time.perf_counter()
        assert len(expiry.ensure(0, store)) == args.entries
        reopened = time.perf_counter() - t0
        print(f"run {run + 1}: built from the table {built:.3f} s (longest step {longest * 1000:.2f} ms), "
              f"reopened {reopened * 1000:.1f} ms")
    expiry.forget()
    db.close()


if __name__ == "__main__":
    main()
