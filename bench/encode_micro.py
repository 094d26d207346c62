"""Encode cost per output record: a window result (``WindowRunner._result``) and an
alert (``agents.patterns.alert_value``), in µs, best of several rounds.

    .venv/bin/python -m bench.encode_micro [rounds]
"""

from __future__ import annotations

import os
import sys
import tempfile
import timeit
from types import SimpleNamespace


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    os.environ.setdefault("STREAMETL_PIPELINES_FILE", "")
    os.environ.setdefault("STREAMETL_DATA_DIR", tempfile.mkdtemp())
    from agents.patterns import alert_value
    from agents.window_aggregate import WindowRunner
    from app.windows import parse_window_def

    defn = parse_window_def({
        "name": "w", "source": "clicks", "key_by": "user", "time_field": "ts",
        "window": {"type": "tumbling", "size": 10},
        "aggregations": [{"name": "n", "type": "count"}, {"name": "s", "type": "sum", "field": "v"}],
        "repartition": False,
    })
    runner = WindowRunner(defn, None, None, "sink", "late")
    w = {"s": 1_700_000_000_000, "e": 1_700_000_010_000, "n": 3, "a": runner.aggs.init()}
    runner.aggs.add(w["a"], {"n": None, "s": 4.5}, 0)

    def result() -> None:
        runner._result("user-12345", w, True, "event_time", False)

    p = SimpleNamespace(name="fraud", fingerprint="f1", kind="sequence", key_by="user_id", source="events")
    item = SimpleNamespace(table_key="user_id=u1", key="u1")
    match = SimpleNamespace(at=1_700_000_000.5, evidence=[{"event_id": "e1", "ts": 1.0}, {"event_id": "e2", "ts": 2.0}],
                            detail={"count": 2}, steps=None)

    def alert() -> None:
        alert_value(p, item, match)

    n = 20_000
    for name, fn in (("window result", result), ("alert", alert)):
        best = min(timeit.repeat(fn, number=n, repeat=rounds)) / n * 1e6
        print(f"{name:14s} {best:6.3f} µs/record")


if __name__ == "__main__":
    main()
