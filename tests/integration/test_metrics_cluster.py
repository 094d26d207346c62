"""GET /metrics and GET /api/v1/cluster on two workers of one pipeline (issue 20).

The records-in counters of both workers add up to what was produced; after one worker
stops, the survivor's /metrics reports every partition of the source (the stopped
worker's too, and no partition twice) and the stopped worker is gone from the cluster
view of the survivor within the status timeout.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Worker, http, produce_json, run, unique, wait_for

PARTITIONS = 4  # STREAMETL_TOPIC_PARTITIONS default
PIPELINE = {"pipelines": [{
    "name": "metered", "source": "events", "sink": "events.metered",
    "steps": [{"op": "deduplicate", "fields": ["value"]}, {"op": "filter", "where": "value >= 0"}],
}]}
STORE = "pipeline-metered-dedupe"
FAST_STATUS = {"STREAMETL_CLUSTER_STATUS_INTERVAL": "0.5", "STREAMETL_CLUSTER_STATUS_TIMEOUT": "4"}


def scrape(worker: Worker) -> dict[str, list]:
    """Metric name -> samples of one worker's /metrics."""
    status, text = http("GET", worker.url + "/metrics", timeout=10)
    assert status == 200, text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def lag_partitions(samples: dict[str, list], topic: str) -> list[int]:
    return sorted(int(s.labels["partition"]) for s in samples.get("streametl_consumer_lag_records", [])
                  if s.labels["topic"] == topic)


def store_partitions(samples: dict[str, list], role: str) -> list[int]:
    return sorted(int(s.labels["partition"]) for s in samples.get("streametl_state_store_keys", [])
                  if s.labels["store"] == STORE and s.labels["role"] == role)


def cluster_ids(worker: Worker) -> list[str]:
    status, body = worker.get("/api/v1/cluster", timeout=10)
    assert status == 200, body
    return [w["worker"] for w in body["workers"]]


def test_two_workers_counters_add_up_and_survivor_reports_every_partition():
    name = unique()
    prefix = f"{name}."
    config = Path(tempfile.mkdtemp(prefix="streametl-cfg-")) / "pipelines.yaml"
    config.write_text(json.dumps(PIPELINE))
    env = {"STREAMETL_PIPELINES_FILE": str(config), **FAST_STATUS}
    a = Worker(app_id=name, topic_prefix=prefix, env=env)
    b = Worker(app_id=name, topic_prefix=prefix, env=env)
    source = prefix + "events"
    try:
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()

        def split() -> bool:
            pa, pb = lag_partitions(scrape(a), source), lag_partitions(scrape(b), source)
            return bool(pa) and bool(pb) and sorted(pa + pb) == list(range(PARTITIONS))

        run(wait_for(split, timeout=90, interval=0.5, what="the source split between both workers"))
        run(wait_for(lambda: len(cluster_ids(a)) == 2 and cluster_ids(a) == cluster_ids(b), timeout=30,
                     what="both workers in both cluster views"))
        assert sorted(w.rsplit(":", 1)[1] for w in cluster_ids(a)) == sorted([str(a.web_port), str(b.web_port)])

        n = 400
        run(produce_json(source, [{"user_id": f"u{i % 37}", "value": i} for i in range(n)], key="user_id"))

        def total_in() -> float:
            return sum(value(scrape(w), "streametl_pipeline_records_in_total", pipeline="metered") for w in (a, b))

        run(wait_for(lambda: total_in() >= n, timeout=60, what=f"{n} records counted in"))
        time.sleep(1.0)  # nothing more may come: no record counted twice
        assert total_in() == n
        out = sum(value(scrape(w), "streametl_pipeline_records_out_total", pipeline="metered") for w in (a, b))
        assert out == n
        for w in (a, b):
            s = scrape(w)
            assert store_partitions(s, "active") == lag_partitions(s, source)
            assert value(s, "streametl_batch_seconds_count", agent="pipeline.metered") > 0
            assert value(s, "streametl_http_requests_total", route="/metrics", status="200") > 0

        def cluster_total_in() -> bool:
            _, body = a.get("/api/v1/pipelines")
            return (body["pipelines"][0]["cluster_counters"] or {}).get("in") == n

        run(wait_for(cluster_total_in, timeout=20, what="cluster-wide total in /api/v1/pipelines"))

        b.stop()
        # A clean stop publishes a tombstone: gone well before the status timeout (4 s).
        run(wait_for(lambda: [w.rsplit(":", 1)[1] for w in cluster_ids(a)] == [str(a.web_port)],
                     timeout=4 + 5, what="the stopped worker gone from the cluster view"))

        run(wait_for(lambda: lag_partitions(scrape(a), source) == list(range(PARTITIONS)), timeout=90,
                     interval=0.5, what="the survivor reporting every source partition"))
        # Every record was processed (counted above): no lag may remain, also on the
        # partitions whose processed records an earlier owner never committed.
        run(wait_for(lambda: value(scrape(a), "streametl_consumer_lag_records", topic=source) == 0,
                     timeout=30, what="no lag left on the survivor"))
        run(wait_for(lambda: store_partitions(scrape(a), "active") == list(range(PARTITIONS)), timeout=30,
                     what="the survivor's store partitions all active"))
        survivor = scrape(a)
        assert store_partitions(survivor, "standby") == []  # no stale series of the old assignment
        assert value(survivor, "streametl_state_store_keys", store=STORE) >= n
        assert value(survivor, "streametl_rebalances_total") >= 2  # B joined, B left
        assert value(survivor, "streametl_rebalance_seconds_count", phase="restore") >= 2
        assert value(survivor, "streametl_commit_seconds_count") > 0
        _, body = a.get("/api/v1/cluster")
        (only,) = body["workers"]
        assert sorted(p["partition"] for p in only["partitions"] if p["topic"] == source) == list(range(PARTITIONS))
    finally:
        a.kill()
        b.kill()
