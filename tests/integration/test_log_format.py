"""STREAMETL_LOG_FORMAT (issue 20, item 5): with ``json`` every line a worker prints is
one JSON object (time, level, logger, message); in both formats the log does not grow
with the records processed (no per-record lines), bad records included."""

from __future__ import annotations

import json
import time

import pytest

from tests.support import Worker, produce_json, run, unique

pytestmark = pytest.mark.integration

RECORDS = 600


def pipeline_in(worker: Worker) -> int:
    status, reply = worker.get("/api/v1/pipelines")
    assert status == 200, reply
    return reply["pipelines"][0]["counters"]["in"]


def log_lines(worker: Worker) -> list[str]:
    return worker.log_path.read_text(errors="replace").splitlines()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_log_has_no_per_record_lines_and_json_is_json(log_format):
    name = unique()
    worker = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_LOG_FORMAT": log_format}).start()
    try:
        time.sleep(2)  # let start-up logging settle
        before = len(log_lines(worker))
        # Good records, and records every step refuses or fails (no user_id, bad value).
        events = [{"event_id": f"e{i}", "user_id": f"u{i % 7}", "action": "click", "value": i % 5, "ts": 1_700_000_000 + i}
                  for i in range(RECORDS - 100)]
        events += [{"event_id": f"bad{i}", "action": "click", "value": "many"} for i in range(100)]
        run(produce_json(name + ".events", events, key="event_id"))
        deadline = time.monotonic() + 90
        while pipeline_in(worker) < RECORDS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pipeline_in(worker) >= RECORDS
        grown = len(log_lines(worker)) - before
        assert grown < RECORDS // 10, "\n".join(log_lines(worker)[before:before + 40])
    finally:
        worker.stop()
    lines = log_lines(worker)
    assert lines
    if log_format == "json":
        for line in lines:
            entry = json.loads(line)  # every line: one object
            assert {"time", "level", "logger", "message"} <= set(entry), line
        assert any(json.loads(line)["message"].endswith("Starting...") for line in lines)
    else:
        assert not lines[0].startswith("{")
