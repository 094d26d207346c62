"""Chained faults during a live stream (issue 23), judged by the chaos verifier
(tests/chaos/verifier.py): two workers run a deduplicating pipeline, a tumbling
window re-keyed through an internal topic (grace 300 s: every window's state must
survive every fault) and a threshold pattern over one stream of 6,000 events (with
producer-retry copies and a few late events), while seed 7's schedule hits them one
fault after another: a graceful leave, a kill -9 restarted on a wiped data folder, a
worker paused past the session timeout (a zombie) and a SIGTERM during the rebalance
of a worker joining. Then every output is read back ``read_committed`` and compared
with a fold of the input.

Under exactly_once nothing may be lost or repeated and every window must equal the
fold; under at_least_once nothing may be lost (repeats are counted in the report).
Neither may leave the group stuck or crash a worker. The long mode (≥ 100,000 events,
≥ 10 faults) is the same verifier from the command line: docs/delivery.md, "Chaos
verifier".
"""

from __future__ import annotations

import json

import pytest

from tests.chaos.verifier import ChaosRun, Spec
from tests.support import REPO

SEED = 7


def run_case(guarantee: str) -> dict:
    report = ChaosRun(Spec(seed=SEED, events=6000, faults=4, guarantee=guarantee)).run()
    # Kept in the git-ignored .cache (pytest's tmp folders rotate): schedule, actions, logs.
    out = REPO / ".cache" / "chaos" / f"chained-{guarantee}-seed{SEED}-{report['app_id']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    summary = {k: report.get(k) for k in ("seed", "guarantee", "failed", "counts", "timings", "error")}
    summary["verdicts"] = {name: {k: v for k, v in verdict.items() if k != "sample"}
                           for name, verdict in report.get("verdicts", {}).items()}
    print(f"chaos report: {out}")
    assert report["ok"], json.dumps(summary, indent=1, default=str)
    return report


@pytest.mark.timeout(1200)  # 6,000 events in 60 s, then a minute's session stall per kill, on 2 loaded cores
def test_chained_faults_exactly_once(kafka):
    """Was xfail: repeated alerts (records delivered before Recovery's seek and again
    after it, docs/delivery.md AB) and a running worker fenced by a woken zombie (AC).
    Session 14, after both fixes: 3 of 3 runs of seed 7 passed (1 of 1 failed before:
    12 alerts repeated, 1 crash)."""
    run_case("exactly_once")


@pytest.mark.timeout(1200)
def test_chained_faults_at_least_once(kafka):
    """Was xfail (issue 23 finding 3 on 510198f: stuck in 2 of 9 runs, 1 crash). Passed 3
    of 3 runs in session 12, after sections I and P of docs/delivery.md; then xfail again
    for a crash on NotLeaderForPartitionError (1 of 2 CI runs), fixed by section W.
    Passed 2 of 2 runs in session 13. Was xfail in session 14 for the long mode's seed 2
    (windows short after a broker restart: batches delivered during Recovery's seek, closed
    by docs/delivery.md AB); with AB this case passed 2 of 2 runs, and on the merged code
    (AB and AF) the long mode's seeds 1, 2 and 3 passed under at_least_once."""
    run_case("at_least_once")
