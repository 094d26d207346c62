"""A live pipeline against the real broker: dead letters, enrichment from reference
rows added while it runs, counters, and deduplication."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import Worker, produce_json, read_topic, run, unique

PIPELINE = {
    "pipelines": [{
        "name": "clean",
        "source": "events",
        "sink": "events.clean",
        "key_by": "user_id",
        "steps": [
            {"op": "deduplicate", "horizon_seconds": 600},
            {"op": "normalize", "lowercase": ["action"],
             "schema": {"value": {"type": "number", "required": True}, "user_id": {"type": "string", "required": True}}},
            {"op": "enrich", "from": "users", "key": "user_id", "fields": ["country"]},
            {"op": "filter", "where": "value > 0"},
        ],
    }]
}


def write_config(config: dict) -> str:
    path = Path(tempfile.mkdtemp(prefix="streametl-cfg-")) / "pipelines.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def worker():
    name = unique()
    w = Worker(app_id=name, topic_prefix=f"{name}.",
               env={"STREAMETL_PIPELINES_FILE": write_config(PIPELINE)}).start()
    yield w
    w.kill()


def counters(worker: Worker) -> dict:
    status, reply = worker.get("/api/v1/pipelines")
    assert status == 200, reply
    return reply["pipelines"][0]["counters"]


def wait_counter(worker: Worker, field: str, at_least: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = counters(worker)
        if c[field] >= at_least:
            return c
        time.sleep(0.2)
    raise TimeoutError(f"counter {field} did not reach {at_least}: {counters(worker)}")


def test_bad_records_go_to_the_dead_letter_topic_while_good_ones_flow(worker):
    p = worker.topic_prefix
    good = [{"event_id": f"g{i}", "user_id": f"u{i}", "action": "CLICK", "value": i + 1} for i in range(20)]
    failing = {"event_id": "bad-1", "user_id": "u1", "action": "click", "value": "lots"}
    run(produce_json(p + "events", good[:10] + [failing] + good[10:], key="user_id",
                     raw=[b"{not json", b"[1, 2]"]))
    out = run(read_topic(p + "events.clean", expect=20))
    assert sorted(r.json()["event_id"] for r in out) == sorted(g["event_id"] for g in good)
    assert all(r.json()["action"] == "click" for r in out)
    assert all(r.key == r.json()["user_id"].encode() for r in out)  # key_by
    dead = run(read_topic(p + "dlq", expect=3))
    by_reason = {d.headers["dlq.reason"].decode(): d for d in dead}
    assert set(by_reason) == {"invalid_json", "not_an_object", "step_failed"}
    failed = by_reason["step_failed"]
    assert failed.headers["dlq.pipeline"] == b"clean"
    assert failed.headers["dlq.step"] == b"1:normalize"
    assert b"not a number" in failed.headers["dlq.message"]
    assert json.loads(failed.value) == failing  # the original record, untouched
    assert by_reason["invalid_json"].value == b"{not json"
    assert by_reason["invalid_json"].headers["dlq.source_topic"] == (p + "events").encode()
    c = wait_counter(worker, "dead_lettered", 3)
    assert c["in"] >= 23 and c["out"] >= 20


def test_enrichment_picks_up_reference_rows_added_while_running(worker):
    p = worker.topic_prefix
    before = len(run(read_topic(p + "events.clean", idle=1)))
    run(produce_json(p + "events", [{"event_id": "r1", "user_id": "ref-user", "action": "view", "value": 3}], key="user_id"))
    first = run(read_topic(p + "events.clean", expect=before + 1))
    assert "country" not in [r.json() for r in first if r.json()["event_id"] == "r1"][0]

    status, _ = worker.put("/api/v1/reference/users", {"key": "ref-user", "row": {"country": "PT"}})
    assert status == 200
    run(produce_json(p + "events", [{"event_id": "r2", "user_id": "ref-user", "action": "view", "value": 4}], key="user_id"))
    second = run(read_topic(p + "events.clean", expect=before + 2))
    assert [r.json() for r in second if r.json()["event_id"] == "r2"][0]["country"] == "PT"


def test_duplicates_and_filtered_records_are_counted_not_emitted(worker):
    p = worker.topic_prefix
    before = len(run(read_topic(p + "events.clean", idle=1)))
    c0 = counters(worker)
    batch = [{"event_id": "d1", "user_id": "x", "action": "a", "value": 1},
             {"event_id": "d1", "user_id": "x", "action": "a", "value": 1},
             {"event_id": "z1", "user_id": "x", "action": "a", "value": 0}]
    run(produce_json(p + "events", batch, key="user_id"))
    c = wait_counter(worker, "in", c0["in"] + 3)
    assert c["dropped_by_reason"].get("duplicate", 0) == c0["dropped_by_reason"].get("duplicate", 0) + 1
    assert c["dropped_by_reason"].get("filtered", 0) == c0["dropped_by_reason"].get("filtered", 0) + 1
    after = run(read_topic(p + "events.clean", idle=1.5))
    assert len(after) == before + 1


def test_exactly_once_pipeline_commits_its_outputs_in_transactions(kafka):
    name = unique("eos")
    w = Worker(app_id=name, topic_prefix=f"{name}.",
               env={"STREAMETL_PIPELINES_FILE": write_config(PIPELINE),
                    "STREAMETL_PROCESSING_GUARANTEE": "exactly_once"})
    try:
        w.start(timeout=120)
        sent = [{"event_id": f"x{i}", "user_id": f"u{i % 5}", "action": "Click", "value": i + 1} for i in range(200)]
        run(produce_json(w.topic_prefix + "events", sent + sent[:50], key="user_id"))
        out = run(read_topic(w.topic_prefix + "events.clean", expect=200, timeout=60,
                             isolation_level="read_committed"))
        ids = [r.json()["event_id"] for r in out]
        assert sorted(ids) == sorted(s["event_id"] for s in sent)  # each once, duplicates dropped
        # Faust's transactions are per partition number: outputs keep their input's.
        by_user = {}
        for r in out:
            by_user.setdefault(r.json()["user_id"], set()).add(r.partition)
        assert all(len(p) == 1 for p in by_user.values())
    finally:
        w.kill()
