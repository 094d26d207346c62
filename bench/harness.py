"""The benchmark harness: a scenario measures, the harness reports.

A scenario is a module in ``bench/scenarios`` with ``NAME``, ``DESCRIPTION`` and
``async def run(ctx: Context) -> Result``. ``python -m bench NAME`` runs it, and the
raw aiokafka baseline in the same run unless ``--no-baseline``, then writes
``bench/reports/<time>-<NAME>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import pkgutil
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests import support

REPORTS = Path(__file__).resolve().parent / "reports"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, nearest-rank."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (not its children) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_seconds(stat: str | None = None) -> float:
    """CPU seconds the whole machine has spent busy so far, every CPU together, from
    ``/proc/stat``'s first line: user, nice, system, irq, softirq and steal (taken by
    the host). Idle and I/O wait are not busy; guest time is already in user and nice."""
    if stat is None:
        stat = Path("/proc/stat").read_text()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(t) for t in stat.splitlines()[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CoresUsed:
    """Cores used between ``__init__`` and ``stop()`` by processes (by name) and by the
    whole machine: at a low rate the co-located worker, load generator and broker can
    keep a small machine busy, and then every pause queues the others (docs/performance.md,
    "Session 30")."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.first = self._read()

    def _read(self) -> dict[str, float]:
        return {"machine_busy": machine_busy_seconds(), "benchmark": self_cpu_seconds(),
                **{name: process_cpu_seconds(pid) for name, pid in self.pids.items()}}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        last = self._read()
        return {name: round((last[name] - self.first[name]) / wall, 2) for name in last}


@dataclass
class Result:
    """What one scenario measured."""

    scenario: str
    events: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    cpu_seconds: float | None = None  # of the process(es) under test
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Which raw baseline result this one is compared with in the report.
    compare_with: str | None = "raw-aiokafka"
    #: Which run of the scenario this is (``--runs``), from 1.
    run: int = 1
    #: Per latency sample, when its event was sent (epoch s), in the order of
    #: ``latencies_ms`` (or empty): ``--dump-latencies`` writes both, to line a run's
    #: tail up with what the worker did then.
    sent_at: list[float] = field(default_factory=list, repr=False)
    #: More per-sample series for ``--dump-latencies`` (name -> values, same order).
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "scenario": self.scenario,
            "run": self.run,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "latency_ms": {
                "samples": len(lat),
                "p50": _round(percentile(lat, 50)),
                "p95": _round(percentile(lat, 95)),
                "p99": _round(percentile(lat, 99)),
                "max": _round(lat[-1] if lat else None),
            },
            "cpu_seconds_per_million_events": (
                round(self.cpu_seconds / self.events * 1e6, 2)
                if self.cpu_seconds is not None and self.events
                else None
            ),
            "settings": self.settings,
            "notes": self.notes,
            **({"extra": self.extra} if self.extra else {}),
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


@dataclass
class Context:
    """What a scenario gets: the broker, a unique namespace, and its knobs."""

    bootstrap: str
    namespace: str
    events: int
    keys: int
    args: argparse.Namespace

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"


def machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    except (OSError, IndexError):
        java = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "java": java,
        "broker": "local single-node KRaft Kafka (deploy/kafka), co-located",
    }


def scenarios() -> dict[str, Any]:
    """Every scenario module in bench/scenarios, by NAME."""
    import bench.scenarios as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"bench.scenarios.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found[module.NAME] = module
    return found


def write_report(name: str, results: list[Result], args: argparse.Namespace) -> tuple[Path, Path]:
    REPORTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = {
        "scenario": name,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "results": [r.summary() for r in results],
    }
    report["over_runs"] = over_runs(report["results"], args.first_run_cold)
    by_name = {(r.scenario, r.run): r for r in results}
    for result, summary in zip(results, report["results"], strict=True):
        baseline = by_name.get((result.compare_with or "", result.run))
        if baseline is not None and baseline is not result and baseline.events_per_second:
            summary["compared_with"] = baseline.scenario
            summary["ratio_to_raw_baseline"] = round(
                result.events_per_second / baseline.events_per_second, 3
            )
    json_path = REPORTS / f"{stamp}-{name}.json"
    md_path = REPORTS / f"{stamp}-{name}.md"
    json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    md_path.write_text(markdown(report))
    return json_path, md_path


def dump_latencies(into: Path, namespace: str, result: Result) -> Path:
    """``result``'s latency samples (ms) and their events' send times (epoch s), as JSON."""
    into.mkdir(parents=True, exist_ok=True)
    path = into / f"{namespace}-run{result.run}.json"
    path.write_bytes(orjson.dumps({"scenario": result.scenario, "run": result.run,
                                   "latencies_ms": result.latencies_ms, "sent_at": result.sent_at,
                                   **result.samples}))
    return path


def _spread(values: list[float | None]) -> dict[str, float] | None:
    """min / median / max of the values (None: no values)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"min": round(min(present), 2), "median": round(statistics.median(present), 2),
            "max": round(max(present), 2), "n": len(present)}


def over_runs(summaries: list[dict[str, Any]], first_cold: bool) -> dict[str, Any]:
    """Per scenario: each latency percentile and the rate as a distribution over the
    warm runs; with ``first_cold``, run 1 (the first after a broker start) apart."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(s["scenario"] for s in summaries):
        mine = [s for s in summaries if s["scenario"] == name]
        warm = [s for s in mine if not (first_cold and s["run"] == 1)]
        entry: dict[str, Any] = {
            "warm_runs": len(warm),
            **{f"{q}_ms": _spread([s["latency_ms"][q] for s in warm]) for q in ("p50", "p95", "p99", "max")},
            "events_per_second": _spread([s["events_per_second"] for s in warm]),
        }
        if first_cold and mine and mine[0]["run"] == 1:
            cold = mine[0]
            entry["first_run_after_broker_start"] = {
                **{f"{q}_ms": cold["latency_ms"][q] for q in ("p50", "p95", "p99", "max")},
                "events_per_second": cold["events_per_second"]}
        out[name] = entry
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark: {report['scenario']}",
        "",
        f"- when: {report['when']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['java']}",
        f"- broker: {m['broker']}",
        "",
        "| scenario | run | events | events/s | ratio to raw | p50 ms | p95 ms | p99 ms | CPU s / M events |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['scenario']} | {r.get('run', 1)} | {r['events']} | {r['events_per_second']:,.0f} | "
            f"{r.get('ratio_to_raw_baseline', '')} | {lat['p50']} | {lat['p95']} | {lat['p99']} | "
            f"{r['cpu_seconds_per_million_events']} |"
        )
    lines.append("")
    runs = report.get("over_runs") or {}
    if any(e["warm_runs"] > 1 or "first_run_after_broker_start" in e for e in runs.values()):
        def fmt(d: dict | None) -> str:
            return "" if not d else f"{d['min']} / {d['median']} / {d['max']}"

        lines += ["## Over the runs (min / median / max of the warm runs)", "",
                  "| scenario | warm runs | p50 ms | p99 ms | max ms | events/s | first run after a broker start: p50 / p99 ms, events/s |",
                  "|---|---:|---|---|---|---|---|"]
        for name, e in runs.items():
            cold = e.get("first_run_after_broker_start")
            cold_text = "" if not cold else f"{cold['p50_ms']} / {cold['p99_ms']}, {cold['events_per_second']:,.0f}"
            lines.append(f"| {name} | {e['warm_runs']} | {fmt(e['p50_ms'])} | {fmt(e['p99_ms'])} | "
                         f"{fmt(e['max_ms'])} | {fmt(e['events_per_second'])} | {cold_text} |")
        lines.append("")
    for r in report["results"]:
        if r.get("run", 1) != 1:
            continue  # settings and notes are the same in every run
        if r["settings"] or r["notes"] or r.get("extra"):
            lines.append(f"## {r['scenario']}")
            for k, v in r["settings"].items():
                lines.append(f"- {k}: {v}")
            for k, v in r.get("extra", {}).items():
                lines.append(f"- {k}: {v}")
            for n in r["notes"]:
                lines.append(f"- note: {n}")
            lines.append("")
    return "\n".join(lines)


async def delete_topics(bootstrap: str, namespace: str) -> None:
    """Delete every topic of one scenario run (its names, its workers' changelogs and
    reply topics all start with ``namespace``).

    Why: each run creates ten or more topics; left behind, hundreds pile up on a
    benchmark broker, and every later run's metadata responses (decoded by the worker
    under test) grow with them."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **support.kafka_options())
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(namespace)]
        if mine:
            await admin.delete_topics(mine)
    except Exception as exc:  # a benchmark's result stands even if cleaning up fails
        print(f"[bench] could not delete the run's topics: {exc!r}", flush=True)
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    found = scenarios()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=sorted(found))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--bootstrap", default=os.environ.get("STREAMETL_TEST_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw aiokafka baseline")
    parser.add_argument("--kafka-security", action="append", default=[], metavar="STREAMETL_KAFKA_X=V",
                        help="connection security for every client and worker of the run (a secured broker)")
    parser.add_argument("--rate", type=float, default=0, help="paced input rate (events/s) for latency runs; 0 = as fast as possible")
    parser.add_argument("--option", action="append", default=[], metavar="K=V", help="scenario-specific knob")
    parser.add_argument("--keep-topics", action="store_true",
                        help="leave the run's topics on the broker (default: delete them afterwards)")
    parser.add_argument("--runs", type=int, default=1,
                        help="run the scenario (and its baseline) this many times; the report gives each "
                             "latency and rate as a distribution over the runs")
    parser.add_argument("--dump-latencies", metavar="DIR",
                        help="write each run's latency samples with their send times to DIR (JSON)")
    parser.add_argument("--namespace", default="bench",
                        help="prefix of each run's app id and topics (several benchmarks sharing a broker)")
    parser.add_argument("--first-run-cold", action="store_true",
                        help="the first run follows a broker start: reported apart from the warm runs")
    args = parser.parse_args(argv)
    args.options = dict(o.split("=", 1) for o in args.option)
    # The scenarios create topics and start workers through tests.support.
    support.use_bootstrap(args.bootstrap)
    support.use_kafka_security(dict(o.split("=", 1) for o in args.kafka_security))

    async def go() -> list[Result]:
        results = []
        names = [args.scenario]
        if args.scenario != "raw-aiokafka" and not args.no_baseline:
            names.insert(0, "raw-aiokafka")
        for run_number in range(1, args.runs + 1):
            results.extend(await one_run(names, run_number))
        return results

    async def one_run(names: list[str], run_number: int) -> list[Result]:
        results = []
        for name in names:
            ctx = Context(args.bootstrap, f"{args.namespace}{int(time.time())}{name.replace('-', '')[:10]}", args.events, args.keys, args)
            print(f"[bench] running {name} with {args.events} events ...", flush=True)
            try:
                result = await found[name].run(ctx)
            finally:
                if not args.keep_topics:
                    await delete_topics(args.bootstrap, ctx.namespace)
            for r in result if isinstance(result, list) else [result]:
                r.run = run_number
                results.append(r)
                if args.dump_latencies:
                    dump_latencies(Path(args.dump_latencies), ctx.namespace, r)
            print(f"[bench] run {run_number} {name}: {orjson.dumps([r.summary() for r in (result if isinstance(result, list) else [result])]).decode()}", flush=True)
        return results

    results = asyncio.run(go())
    json_path, md_path = write_report(args.scenario, results, args)
    print(md_path.read_text())
    print(f"[bench] report: {json_path} and {md_path}")
    return 0


__all__ = ["Context", "Result", "asdict", "main", "percentile", "process_cpu_seconds", "self_cpu_seconds"]
