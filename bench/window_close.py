"""Instructions per closed window of a tumbling window end, without a broker.

``python -m bench.window_close [--keys N] [--no-close] [--ahead]`` gives N keys of the
window-aggregate scenario's tumbling window (10 s, grace 0, count + sum, 4 partitions)
one record each in the window [E - 10 s, E), through ``WindowRunner.process``, then
hands the runner one more batch: one record per partition at E, which closes every
key's window (as at a window end of the benchmark), or with ``--no-close`` one record
per partition just before E, which closes none. A window end before that one (the same
keys) is not measured: in a running worker every key's window closed before, so its
sink partition is known (``KeyPartitioner``: murmur2 in Python, ~30,000 instructions a
new key). The results go through the
at_least_once ``Emitter`` (grouped by the sink's partition) into real aiokafka record
batches; a stand-in producer acknowledges each batch at once. So the close, the
results, their grouping and their appending to record batches are all in the count;
the state's flush (at the next commit) is not.

Wall time on this machine varies too much to compare small changes: count
instructions. The difference of the two totals divided by N is the instructions per
closed window (the set-up is the same in both runs). ``--ahead`` makes the last
window's results ahead first, as a live worker does in the idle time before a window
end (``WindowRunner._prerender``); the close then takes them::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m bench.window_close --keys 10000
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m bench.window_close --keys 10000 --no-close

Without valgrind it prints the CPU time of the last batch (noisy; a sanity check).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import yaml

SIZE_MS = 10_000
PARTITIONS = 4


class InstantProducer:
    """What the batch path uses of aiokafka's producer: real record batches, each
    acknowledged at once (nothing is sent)."""

    def __init__(self) -> None:
        self.records = 0

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        from app.kafka_io import MAX_BATCH_BYTES

        return BatchBuilder(MAX_BATCH_BYTES, 0)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future:
        self.records += batch._relative_offset
        future = asyncio.get_running_loop().create_future()
        future.set_result(SimpleNamespace(partition=partition, offset=0))
        return future


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.window_close")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--no-close", action="store_true", help="the last batch closes nothing")
    parser.add_argument("--ahead", action="store_true", help="make the results ahead before the last batch")
    args = parser.parse_args(argv)

    from bench.window_micro import MemoryStore, _config

    path = Path(tempfile.mkdtemp(prefix="streametl-close-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(_config("tumbling")))
    os.environ["STREAMETL_PIPELINES_FILE"] = str(path)
    os.environ.setdefault("STREAMETL_DATA_DIR", str(path.parent / "data"))

    from aiokafka.partitioner import murmur2
    from aiokafka.structs import ConsumerRecord

    from agents.window_aggregate import RUNNERS, WindowRunner
    from app import settings, startup
    from app.commit import CommitProtocol, Emitter
    from app.gc_tuning import freeze_heap
    from app.kafka_io import kafka_io

    startup.register_processors()
    configured = RUNNERS["bench-tumbling"]
    sink_name = "bench.aggregates"
    configured.sink = SimpleNamespace(get_topic_name=lambda: sink_name)
    producer = InstantProducer()
    kafka_io.producer = producer
    kafka_io._known_topics[sink_name] = PARTITIONS
    kafka_io.ready.set()
    commit = CommitProtocol(Emitter(), defer=True)
    runner = WindowRunner(configured.defn, None, None, configured.sink, configured.late,
                          store=MemoryStore(), commit=commit)

    end = (int(time.time() * 1000) // SIZE_MS - 1) * SIZE_MS  # E: a window end
    offsets = [0] * PARTITIONS

    def record(i: int, key: bytes, ts_ms: int) -> tuple[int, ConsumerRecord]:
        p = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
        value = orjson.dumps({"event_id": f"e-{i:012d}", "user_id": key.decode(), "action": "click",
                              "value": i % 100 + 1, "ts": ts_ms / 1000})
        rec = ConsumerRecord("clicks", p, offsets[p], None, 0, key, value, None, len(key), len(value), ())
        offsets[p] += 1
        return p, rec

    def parts(records: list[tuple[int, ConsumerRecord]]) -> list[tuple[int, list[ConsumerRecord]]]:
        by: dict[int, list[ConsumerRecord]] = {}
        for p, rec in records:
            by.setdefault(p, []).append(rec)
        return sorted(by.items())

    keys = [f"u{i:05d}".encode() for i in range(args.keys)]
    crossing_keys = [next(k for k in (f"x{j}".encode() for j in range(1000))
                          if (murmur2(k) & 0x7FFFFFFF) % PARTITIONS == p) for p in range(PARTITIONS)]

    def window(until: int) -> list[tuple[int, ConsumerRecord]]:
        """One record per key inside [until - 10 s, until)."""
        return [record(i, key, until - SIZE_MS + 1 + i * (SIZE_MS - 1000) // len(keys)) for i, key in enumerate(keys)]

    def crossing(ts: int) -> list[tuple[int, ConsumerRecord]]:
        return [record(len(keys) + p, key, ts) for p, key in enumerate(crossing_keys)]

    async def go() -> float:
        # A first window end (not measured): as in a running worker, every key has
        # been closed before (its sink partition known, the templates made).
        for until, last_ts in ((end - SIZE_MS, end - SIZE_MS), (end, end - 1 if args.no_close else end)):
            fill = window(until)
            for i in range(0, len(fill), 5000):  # fetches of 5,000, as in the benchmark
                await runner.process(parts(fill[i:i + 5000]))
            await commit.before_commit()  # the state written: the close finds it cached
            if args.ahead:
                # All keys' windows are filled now: make their results ahead (the lead
                # and the once-per-window-end mark are a live worker's, not this one's).
                runner.PRERENDER_LEAD_MS = SIZE_MS
                runner._prerendered.clear()
                runner._queue_prerender(range(PARTITIONS))
                del runner.PRERENDER_LEAD_MS
                if runner.prerendering is not None:
                    await runner.prerendering
            last = parts(crossing(last_ts))
            t0 = time.process_time()
            await runner.process(last)
            await commit.emitter.flush()
            cpu = time.process_time() - t0
        return cpu

    # The collector set up as in a worker (app/gc_tuning.py), as bench.window_micro does.
    gc.collect()
    thresholds = settings.gc_threshold_values()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    if settings.gc_freeze:
        freeze_heap()
    cpu = asyncio.new_event_loop().run_until_complete(go())
    closed = runner.stats["emitted"] - args.keys
    print(f"{args.keys} keys, last batch closed {closed} windows, {producer.records} records appended, "
          f"{cpu * 1e3:.1f} ms CPU" + (f" ({cpu / closed * 1e6:.2f} µs a window)" if closed else ""), flush=True)
    # No interpreter shutdown: its teardown differs between the two runs (what each
    # left allocated) and would count in the difference.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
