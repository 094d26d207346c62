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
@pytest.mark.xfail(strict=False, reason=(
    "issue 23 findings 1, 2 and 4 on 510198f, 2 of 4 runs of this case failed. One: verdict "
    "windows (22 windows missing and 14 wrong, 207 records in no result and no late record: "
    "the keys' first windows lost with their state), duplicated (1 id in the read_committed "
    "sink), crashed (Invalid state transition TransactionState.IN_TRANSACTION -> "
    "IN_TRANSACTION; 'Cannot flush: Producer not Running'). The other: verdict alerts, 1 alert "
    "repeated, its source record once in events but twice in the read_committed "
    "patterns-repartition topic (the re-key hop of finding 1's run B, on the pattern path). "
    "With a 30 s grace, 1 of 6: alerts, 24 repeated"))
def test_chained_faults_exactly_once(kafka):
    run_case("exactly_once")


@pytest.mark.timeout(1200)
@pytest.mark.xfail(strict=False, reason=(
    "issue 23 finding 3 on 510198f (a worker stays in table recovery for good): verdict stuck, "
    "3 partitions (events, chaos_win.keyed, patterns-repartition) at a constant lag of 2,607 "
    "and 2,746 records for 7 min, the joiner the SIGTERM hit at /health 503 logging "
    "'Recovery: No event received for active tp ... since recovery start': 2 of 9 runs of this "
    "schedule (both with a 30 s grace; the lag does not depend on it); 1 more: verdict crashed, "
    "NotLeaderForPartitionError from a window result send in the commit flush"))
def test_chained_faults_at_least_once(kafka):
    run_case("at_least_once")
