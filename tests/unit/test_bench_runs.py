"""bench --runs N: each latency percentile and the rate are reported as a distribution
over the warm runs, and with --first-run-cold the first run after a broker start apart
(issue 22: one run's p99 said little; 21 ms in one run, 1,290 ms in the next)."""

from __future__ import annotations

from bench.harness import over_runs


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
