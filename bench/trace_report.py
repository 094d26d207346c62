"""Line a benchmark run's latency tail up with its worker's timeline (issue 22).

    python -m bench.trace_report LATENCIES.json TRACE.jsonl [--over MS] [--worst N]

``LATENCIES.json``: one run of ``python -m bench ... --dump-latencies DIR``;
``TRACE.jsonl``: the worker's timeline (``bench/worker_trace/sitecustomize.py``). For
every sample slower than ``--over`` ms it finds what the worker did between the event's
send and its result: loop stalls (``lag``) with what ran meanwhile, commits and their
phases, GC passes, batches that waited for a commit section. Prints totals per kind over
the run's latency phase, the share of slow samples each kind overlaps, and the timeline
around the ``--worst`` slowest samples.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def load_trace(path: Path) -> list[dict]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events.sort(key=lambda e: e["at"])
    return events


def overlapping(events: list[dict], start: float, end: float) -> list[dict]:
    return [e for e in events if e["at"] < end and e["at"] + e["dur"] > start]


def stack_key(stack: list[str], depth: int = 4) -> str:
    return " < ".join(reversed(stack[-depth:]))


def report(lat_path: Path, trace_path: Path, over_ms: float, worst: int, out=sys.stdout) -> None:
    lat = json.loads(lat_path.read_text())
    samples = sorted(zip(lat["sent_at"], lat["latencies_ms"], strict=True))
    if not samples:
        print("no samples with send times", file=out)
        return
    trace = load_trace(trace_path)
    start, end = samples[0][0], samples[-1][0] + samples[-1][1] / 1000
    phase = [e for e in trace if start <= e["at"] <= end]
    span = end - start
    print(f"{lat['scenario']} run {lat['run']}: {len(samples)} samples over {span:.1f} s; "
          f"p50 {pct([s[1] for s in samples], 50):.1f} ms, p99 {pct([s[1] for s in samples], 99):.1f} ms, "
          f"max {max(s[1] for s in samples):.1f} ms", file=out)

    print("\nworker timeline during the latency phase (count, total s, mean ms, max ms):", file=out)
    by_kind: dict[str, list[dict]] = collections.defaultdict(list)
    for e in phase:
        key = e["k"] if e["k"] != "gc" else f"gc{e['gen']}"
        by_kind[key].append(e)
    for kind, es in sorted(by_kind.items()):
        durs = [e["dur"] for e in es]
        print(f"  {kind:8s} {len(es):6d} {sum(durs):8.3f} {1000 * sum(durs) / len(durs):8.2f} "
              f"{1000 * max(durs):8.1f}", file=out)
    stores = [e for e in phase if e["k"] == "store"]
    if stores:
        for part in ("hand_over", "acks", "rocksdb"):
            vals = [e[part] for e in stores]
            print(f"    store.{part:9s} mean {1000 * sum(vals) / len(vals):6.2f} ms, max {1000 * max(vals):6.1f} ms",
                  file=out)
    batches = [e for e in phase if e["k"] == "batch"]
    if batches:
        ages = sorted(e["age"] for e in batches if e.get("age") is not None)
        sizes = sorted(e["n"] for e in batches)
        print(f"    batches: size p50 {pct(sizes, 50)} max {sizes[-1]}; oldest record's age at start "
              f"p50 {1000 * pct(ages, 50):.1f} ms, p99 {1000 * pct(ages, 99):.1f} ms, max {1000 * ages[-1]:.1f} ms",
              file=out)

    slow = [(t, ms) for t, ms in samples if ms > over_ms]
    print(f"\n{len(slow)} samples over {over_ms:g} ms ({100 * len(slow) / len(samples):.2f} %); share of them whose "
          f"send-to-result span overlaps:", file=out)
    kinds = ("lag", "commit", "section", "encode", "store", "wait", "gc0", "gc1", "gc2", "timers")
    hits = collections.Counter()
    for t, ms in slow:
        found = {e["k"] if e["k"] != "gc" else f"gc{e['gen']}" for e in overlapping(phase, t, t + ms / 1000)}
        for k in found:
            hits[k] += 1
    for k in kinds:
        if slow:
            print(f"  {k:8s} {100 * hits[k] / len(slow):6.1f} %", file=out)

    lags = [e for e in phase if e["k"] == "lag"]
    sections = [e for e in phase if e["k"] == "section"]
    if sections:
        print(f"\ncommit sections: {len(sections)}, longest {1000 * max(e['dur'] for e in sections):.1f} ms "
              f"(CPU {1000 * max(e.get('cpu', 0) for e in sections):.1f} ms)", file=out)
    if lags:
        by_commit = [e for e in lags if commit_work(e)]
        others = [e for e in lags if not commit_work(e)]
        for name, es in (("the commit's work sampled", by_commit), ("no commit work sampled", others)):
            if es:
                print(f"loop stalls with {name}: {len(es)}, longest {1000 * max(e['dur'] for e in es):.1f} ms wall, "
                      f"{1000 * max(e.get('cpu', 0) for e in es):.1f} ms CPU of the worker's main thread",
                      file=out)
        print(f"\nloop stalls: {len(lags)}, {sum(e['dur'] for e in lags):.3f} s in all; longest:", file=out)
        for e in sorted(lags, key=lambda e: -e["dur"])[:8]:
            tops = collections.Counter(stack_key(s) for _, s in e.get("stacks", []))
            print(f"  {e['at']:.3f} +{1000 * e['dur']:.1f} ms  {tops.most_common(3)}", file=out)
        tops = collections.Counter()
        for e in lags:
            for _, s in e.get("stacks", []):
                tops[stack_key(s, 3)] += 1
        print("  most sampled while stalled (5 ms samples):", file=out)
        for key, n in tops.most_common(12):
            print(f"    {n:5d}  {key}", file=out)

    for t, ms in sorted(samples, key=lambda s: -s[1])[:worst]:
        print(f"\nsample sent {t:.3f}, {ms:.1f} ms:", file=out)
        for e in overlapping(trace, t - 0.05, t + ms / 1000 + 0.01):
            info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                    if k not in ("k", "at", "dur", "stacks")}
            print(f"  {1000 * (e['at'] - t):+8.1f} ms {e['k']:8s} {1000 * e['dur']:7.1f} ms {info}", file=out)


#: Frames of the commit's own work (its write's stack runs through ``_write_snapshot``).
COMMIT_FRAMES = (":encode_some", ":_write_snapshot", ":begin_commit", ":_commit_snapshot")


def commit_work(lag: dict) -> bool:
    """Whether a loop stall's stack samples show the commit's own work."""
    return any(any(name in frame for frame in stack for name in COMMIT_FRAMES)
               for _, stack in lag.get("stacks", []))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latencies", type=Path)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--over", type=float, default=50.0, help="a slow sample, ms")
    parser.add_argument("--worst", type=int, default=3)
    args = parser.parse_args(argv)
    report(args.latencies, args.trace, args.over, args.worst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
