"""POST /api/v1/process and reference data over HTTP, against a real worker."""

from __future__ import annotations

import pytest

from tests.support import Worker, http, unique


@pytest.fixture(scope="module")
def worker():
    name = unique()
    w = Worker(app_id=name, topic_prefix=f"{name}.").start()
    yield w
    w.kill()


def test_the_issue_curl_returns_one_normalized_record_and_counts_the_duplicate(worker):
    status, reply = worker.post("/api/v1/process", {
        "records": [{"User_ID": "123", "Action": " Click ", "value": "1"},
                    {"User_ID": "123", "Action": " Click ", "value": "1"}],
        "transformations": ["deduplicate", "normalize"],
    })
    assert status == 200, reply
    assert reply["records"] == [{"user_id": "123", "action": "Click", "value": "1"}]
    dedupe, normalize = reply["steps"]
    assert dedupe == {"step": 0, "op": "deduplicate", "in": 2, "out": 1, "dropped": {"duplicate": 1}, "failed": 0}
    assert normalize["in"] == normalize["out"] == 1
    assert reply["dropped"] == [{"index": 1, "step": 0, "op": "deduplicate", "reason": "duplicate"}]


def test_every_record_is_accounted_for_with_its_index_and_reason(worker):
    records = [
        {"user_id": "1", "value": 5, "action": "click"},
        {"user_id": "2", "value": 50, "action": "click"},
        "not an object",
        {"user_id": "3", "value": "many", "action": "click"},
        {"value": 70, "action": "click"},
    ]
    status, reply = worker.post("/api/v1/process", {
        "records": records,
        "transformations": [
            {"op": "normalize", "schema": {"value": "number", "user_id": {"type": "string", "required": True}}},
            {"op": "filter", "where": "value > 10"},
            {"op": "map", "set": {"double": "value * 2"}, "drop": ["action"]},
        ],
    })
    assert status == 200, reply
    assert reply["records"] == [{"user_id": "2", "value": 50, "double": 100}]
    assert [(f["index"], f["op"]) for f in reply["failures"]] == [(2, "parse"), (3, "normalize"), (4, "normalize")]
    assert "not a number" in reply["failures"][1]["reason"]
    assert "required field 'user_id'" in reply["failures"][2]["reason"]
    assert reply["dropped"] == [{"index": 0, "step": 1, "op": "filter", "reason": "filtered"}]
    total = len(reply["records"]) + len(reply["failures"]) + len(reply["dropped"])
    assert total == len(records)


def test_enrichment_reads_reference_rows_written_through_the_api(worker):
    status, reply = worker.put("/api/v1/reference/users", {
        "key_field": "user_id", "rows": [{"user_id": "7", "country": "NL", "tier": "gold"}]})
    assert status == 200 and reply["visible_here"], reply
    status, row = worker.get("/api/v1/reference/users/7")
    assert status == 200 and row["row"]["country"] == "NL"
    status, reply = worker.post("/api/v1/process", {
        "records": [{"user_id": "7"}, {"user_id": "8"}],
        "transformations": [{"op": "enrich", "from": "users", "key": "user_id", "fields": ["country"], "on_missing": "drop"}],
    })
    assert status == 200, reply
    assert reply["records"] == [{"user_id": "7", "country": "NL"}]
    assert reply["dropped"][0]["reason"] == "no_reference_row"
    # null deletes a row
    status, _ = worker.put("/api/v1/reference/users", {"rows": {"7": None}})
    assert status == 200
    assert worker.get("/api/v1/reference/users/7")[0] == 404


@pytest.mark.parametrize(
    "body,param",
    [
        ({"records": [{}], "transformations": ["explode"]}, "op"),
        ({"records": [{}], "transformations": [{"op": "filter"}]}, "where"),
        ({"records": [{}], "transformations": [{"op": "filter", "where": "__import__('os')"}]}, "where"),
        ({"records": [{}], "transformations": [{"op": "filter", "where": "value >"}]}, "where"),
        ({"records": [{}], "transformations": [{"op": "deduplicate", "horizon_seconds": -1}]}, "horizon_seconds"),
        ({"records": [{}], "transformations": [{"op": "normalize", "schema": {"v": {"type": "uuid"}}}]}, "schema.v.type"),
        ({"records": [{}], "transformations": [{"op": "map", "colour": 1}]}, "colour"),
        ({"records": [{}], "transformations": ["normalize", {"op": "enrich", "from": "users"}]}, "key"),
    ],
)
def test_a_bad_step_is_rejected_before_anything_runs_naming_step_and_parameter(worker, body, param):
    status, reply = worker.post("/api/v1/process", body)
    assert status == 422, reply
    assert reply["error"]["details"]["parameter"] == param
    assert reply["error"]["details"]["step"] == len(body["transformations"]) - 1


def test_a_window_step_is_for_live_pipelines_only(worker):
    step = {"op": "window", "key_by": "user_id", "window": {"type": "tumbling", "size": 10},
            "aggregations": [{"name": "n", "type": "count"}]}
    status, reply = worker.post("/api/v1/process", {"records": [{"user_id": "u1"}], "transformations": [step]})
    assert status == 422, reply
    assert "live pipelines" in reply["error"]["message"]


def test_a_cdc_step_reads_change_events_and_tombstones_by_their_keys(worker):
    """The step language's ``cdc`` step over HTTP (issue 21): one envelope per record,
    ``keys`` as the message keys; a tombstone and a filtered row go out as deletes, a
    malformed event fails with its reason."""
    status, reply = worker.post("/api/v1/process", {
        "records": [{"op": "c", "after": {"id": 1, "score": 3}, "source": {"ts_ms": 5}}, None,
                    {"op": "u", "after": {"id": 2, "score": 0}}, {"op": "?"}],
        "keys": [{"id": 1}, {"id": 7}, {"id": 2}, {"id": 3}],
        "transformations": [{"op": "cdc", "key": ["id"]}, {"op": "filter", "where": "score > 0"}],
    })
    assert status == 200, reply
    assert reply["records"] == [
        {"op": "c", "before": None, "after": {"id": 1, "score": 3}, "source": {"ts_ms": 5}},
        {"op": "d", "before": {"id": 7}, "after": None}, {"op": "d", "before": {"id": 2}, "after": None}]
    assert [(f["index"], f["op"], f["code"]) for f in reply["failures"]] == [(3, "cdc", "unknown_op")]
    status, reply = worker.post("/api/v1/process", {"records": [None], "keys": [], "transformations": ["cdc"]})
    assert status == 422 and reply["error"]["details"] == {"field": "keys"}, reply
    status, reply = worker.post("/api/v1/process", {"records": [{}], "keys": [None], "transformations": ["normalize"]})
    assert status == 422 and reply["error"]["details"] == {"field": "keys"}, reply


@pytest.mark.parametrize(
    "kwargs,status",
    [
        (dict(raw=b"[1,", content_type="application/json"), 400),
        (dict(raw=b"{}", content_type="application/xml"), 415),
        (dict(raw=b"{}", content_type="text/plain", headers={"Origin": "http://elsewhere.example"}), 415),
        (dict(raw=b"records=1", content_type="application/x-www-form-urlencoded"), 400),
        (dict(body={"records": {}, "transformations": []}), 422),
        (dict(body={"records": []}), 422),
        (dict(body={"records": [{}] * 10_001, "transformations": []}), 413),
    ],
)
def test_bad_bodies_get_clear_errors(worker, kwargs, status):
    got, reply = http("POST", worker.url + "/api/v1/process", **kwargs)
    assert got == status, reply
    assert reply["error"]["code"]


def test_bad_reference_writes_are_refused(worker):
    assert worker.put("/api/v1/reference/bad%20name!", {"key": "1", "row": {}})[0] == 422
    assert worker.put("/api/v1/reference/users", {"key": "1"})[0] == 422
    assert worker.put("/api/v1/reference/users", {"rows": [{"a": 1}], "key_field": "user_id"})[0] == 422
    assert worker.put("/api/v1/reference/users", {"key": "1", "row": [1]})[0] == 422


def test_a_join_over_http_pairs_records_within_the_interval_and_emits_unmatched_once(worker):
    # The README's join example: orders (records) with payments (with_records).
    status, reply = worker.post("/api/v1/process", {
        "records": [{"order_id": "o1", "ts": 100}, {"order_id": "o2", "ts": 101}, {"order_id": "o3", "ts": 20}],
        "transformations": [{"op": "join", "on": "order_id", "within": "10s", "grace": "5s", "type": "left",
                             "with_records": [{"order_id": "o1", "ts": 99, "amount": 9},
                                              {"order_id": "o2", "ts": 150, "amount": 3}]}],
    })
    assert status == 200, reply
    assert reply["records"] == [
        {"left": {"order_id": "o1", "ts": 100}, "right": {"order_id": "o1", "ts": 99, "amount": 9}, "ts": 100},
        {"left": {"order_id": "o2", "ts": 101}, "right": None, "ts": 101},
    ]
    # o3 (ts 20) arrives once both sides were seen up to 99 (stream time, the smaller
    # of the two sides' times): past the grace, late.
    assert reply["dropped"] == [{"index": 2, "side": "left", "step": 0, "op": "join", "reason": "late"}]
    assert reply["steps"] == [{"step": 0, "op": "join", "in": 5, "out": 2, "dropped": {"late": 1}, "failed": 0}]


def test_a_join_over_http_needs_its_other_side_inline(worker):
    status, reply = worker.post("/api/v1/process", {
        "records": [{"k": 1, "ts": 1}],
        "transformations": [{"op": "join", "with": "payments", "on": "k", "within": 5}]})
    assert status == 422, reply
    assert "with_records" in reply["error"]["message"]


def test_a_stream_table_join_over_http_joins_the_version_valid_at_each_record(worker):
    """The README's example: a customer updated at 100 and 200 and deleted at 300; an
    order at 150 joins the version of 100, one at 250 that of 200, one at 350 no row
    (``left``: emitted alone), one at 50 (before the first version) no row."""
    status, reply = worker.post("/api/v1/process", {
        "records": [{"customer_id": 7, "ts": 150}, {"customer_id": 7, "ts": 250}, {"customer_id": 7, "ts": 350},
                    {"customer_id": 7, "ts": 50}],
        "transformations": [{"op": "join", "on": "customer_id", "table_key": "id", "as_of": "event_time",
                             "history": "1h", "type": "left", "prefix": {"right": "customer_"},
                             "table_records": [{"value": {"id": 7, "tier": "silver"}, "timestamp": 100},
                                               {"value": {"id": 7, "tier": "gold"}, "timestamp": 200},
                                               {"key": 7, "value": None, "timestamp": 300}]}],
    })
    assert status == 200, reply
    # Each list keeps its order: the order at 50 comes last, after every table record,
    # and still finds no version valid at its time.
    assert [(r["ts"], r.get("customer_tier")) for r in reply["records"]] == [
        (150, "silver"), (250, "gold"), (350, None), (50, None)]
    assert reply["steps"] == [{"step": 0, "op": "join", "in": 4, "out": 4, "dropped": {}, "failed": 0}]


def test_a_stream_table_join_over_http_needs_its_table_inline(worker):
    status, reply = worker.post("/api/v1/process", {
        "records": [{"k": 1}], "transformations": [{"op": "join", "with_table": "customers", "on": "k"}]})
    assert status == 422, reply
    assert "table_records" in reply["error"]["message"]
