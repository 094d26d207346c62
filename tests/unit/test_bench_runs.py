"""bench --runs N: each latency percentile and the rate are reported as a distribution
over the warm runs, and with --first-run-cold the first run after a broker start apart
(issue 22: one run's p99 said little; 21 ms in one run, 1,290 ms in the next); and the
cores a latency phase used, per process and for the machine."""

from __future__ import annotations

import os
import time

from bench.harness import CoresUsed, machine_busy_seconds, over_runs


def summary(run: int, p50: float, rate: float) -> dict:
    return {"scenario": "transform", "run": run, "events_per_second": rate,
            "latency_ms": {"p50": p50, "p95": p50, "p99": 2 * p50, "max": 3 * p50}}


def test_warm_runs_are_a_distribution_and_the_cold_first_run_is_apart():
    runs = [summary(1, 50, 100), summary(2, 5, 200), summary(3, 7, 400), summary(4, 6, 300)]
    got = over_runs(runs, first_cold=True)["transform"]
    assert got["warm_runs"] == 3
    assert got["p50_ms"] == {"min": 5, "median": 6, "max": 7, "n": 3}
    assert got["p99_ms"]["max"] == 14 and got["events_per_second"]["median"] == 300
    assert got["first_run_after_broker_start"]["p99_ms"] == 100
    # Without --first-run-cold every run is a warm run.
    assert over_runs(runs, first_cold=False)["transform"]["warm_runs"] == 4


def test_machine_busy_seconds_leaves_out_idle_io_wait_and_guest_time():
    # cpu user nice system idle iowait irq softirq steal guest guest_nice: busy =
    # 100+5+20+1+2+3 ticks (guest time is counted in user and nice already)
    stat = "cpu  100 5 20 900 40 1 2 3 7 8\ncpu0 50 2 10 450 20 0 1 1 3 4\n"
    assert machine_busy_seconds(stat) == 131 / os.sysconf("SC_CLK_TCK")


def test_cores_used_reports_each_process_and_the_machine():
    cores = CoresUsed({"me": os.getpid()})
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    used = cores.stop()
    assert set(used) == {"machine_busy", "benchmark", "me"}
    assert used["me"] > 0 and used["benchmark"] > 0 and used["machine_busy"] > 0
