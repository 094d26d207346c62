"""POST /api/v1/aggregate and GET /api/v1/aggregate/{window_id} with two workers of
one app: the running aggregate of a window_id is one consistent value whichever worker
is asked, equal to a fold of the records sent; invalid specs get a clear 4xx."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import Worker, unique


@pytest.fixture(scope="module")
def two_workers(kafka):
    name = unique("agg")
    # No windows: section; the API needs none.
    env = {"STREAMETL_PIPELINES_FILE": ""}  # no declared pipelines
    ws = [Worker(app_id=name, topic_prefix=f"{name}.", env=env) for _ in range(2)]
    for w in ws:
        w.start(timeout=150)
    for w in ws:
        w.wait_ready(150)
    yield ws
    for w in ws:
        w.kill()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_issue_curl_works_as_written(two_workers):
    port = two_workers[0].web_port
    cmd = (
        f"curl -s -X POST http://localhost:{port}/api/v1/aggregate -H 'Content-Type: application/json' "
        """-d '{"window_id": "user_clicks", "record": {"value": 1}, "window_size": 100, "aggregation": "sum", "value_key": "value"}'"""
    )
    import json

    out = json.loads(subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout)
    assert out["window_id"] == "user_clicks"
    assert out["window_type"] == "count"
    assert out["value"] == 1
    assert out["windows"] == [{"window_type": "count", "start": 0, "end": 100, "count": 1,
                               "aggregates": {"sum": 1}}]


def test_alternating_workers_give_one_running_aggregate(two_workers):
    body = {"window_id": "alt", "window_size": 5, "aggregation": "sum", "value_key": "v"}
    values = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    for i, v in enumerate(values):
        status, reply = two_workers[i % 2].post("/api/v1/aggregate", {**body, "record": {"v": v}})
        assert status == 200, reply
        # The fold: count windows of 5 records; the answer is the sum so far in this one.
        start = i - i % 5
        assert reply["value"] == sum(values[start : i + 1]), (i, reply)
        assert reply["windows"][0]["start"] == start and reply["windows"][0]["count"] == i - start + 1
        if (i + 1) % 5 == 0:
            assert reply["closed"] == [{"window_type": "count", "start": start, "end": start + 5,
                                        "count": 5, "aggregates": {"sum": sum(values[start : start + 5])}}]
    views = [w.get("/api/v1/aggregate/alt") for w in two_workers]
    assert views[0] == views[1]
    status, view = views[0]
    assert status == 200
    assert view["windows"] == [{"window_type": "count", "start": 10, "end": 15, "count": 2,
                                "aggregates": {"sum": 13}}]
    assert [c["aggregates"]["sum"] for c in view["closed"]] == [14, 25]


def test_time_windows_with_an_event_time_key(two_workers):
    base = {"window_id": "tw", "window_type": "tumbling", "window_size": 10, "grace": 0,
            "aggregations": [{"name": "n", "type": "count"}, {"name": "mx", "type": "max", "field": "v"},
                             {"name": "p", "type": "percentiles", "field": "v", "percentiles": [50]}],
            "time_key": "t"}
    sent = [(1000.0, 5), (1003.0, 7), (1009.9, 1), (1010.0, 2), (1004.0, 100)]
    replies = []
    for i, (t, v) in enumerate(sent):
        status, reply = two_workers[i % 2].post("/api/v1/aggregate", {**base, "record": {"t": t, "v": v}})
        assert status == 200, reply
        replies.append(reply)
    assert replies[2]["value"]["n"] == 3 and replies[2]["value"]["mx"] == 7
    # The record at 1010 starts the next window and closes [1000, 1010) (grace 0).
    assert replies[3]["windows"][0]["start"] == 1_010_000
    assert replies[3]["closed"][0]["aggregates"]["n"] == 3
    # 1004 arrives after its window closed: late, applied nowhere, and said so.
    assert replies[4]["late"] is True and replies[4]["windows"] == []
    status, view = two_workers[1].get("/api/v1/aggregate/tw")
    assert view["late_records"] == 1
    assert [w["aggregates"]["n"] for w in view["windows"]] == [1]

    session = {"window_id": "sw", "window_type": "session", "gap": 10, "grace": 60,
               "aggregation": "count", "time_key": "t"}
    for t in (0, 2, 20, 22):
        assert two_workers[0].post("/api/v1/aggregate", {**session, "record": {"t": t}})[0] == 200
    status, reply = two_workers[1].post("/api/v1/aggregate", {**session, "record": {"t": 11}})
    assert status == 200
    assert reply["windows"] == [{"window_type": "session", "start": 0, "end": 22_000, "count": 5,
                                 "aggregates": {"count": 5}}]


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"window_id": "bad", "record": {"value": 1}, "window_size": 10, "aggregation": "median", "value_key": "value"}, 422, "unknown aggregation"),
        ({"window_id": "bad", "record": {"value": "1"}, "window_size": 10, "aggregation": "sum", "value_key": "value"}, 422, "needs a number"),
        ({"window_id": "bad", "record": {"value": 1}, "window_size": 0, "aggregation": "sum", "value_key": "value"}, 422, "size must be > 0"),
        ({"window_id": "bad", "record": {"value": 1}, "window_type": "tumbling", "window_size": -5, "aggregation": "count"}, 422, "size must be > 0"),
        ({"window_id": "bad", "record": {"value": 1}, "aggregation": "sum", "value_key": "value"}, 422, "window_type or window_size"),
        ({"window_id": "bad", "record": {"other": 1}, "window_size": 3, "aggregation": "sum", "value_key": "value"}, 422, "no field"),
        ({"window_id": "", "record": {"value": 1}, "window_size": 3}, 422, "window_id"),
        ({"window_id": "bad", "record": [1], "window_size": 3}, 422, "record"),
    ],
)
def test_invalid_specs_get_a_clear_4xx(two_workers, body, status, fragment):
    got, reply = two_workers[1].post("/api/v1/aggregate", body)
    assert got == status, reply
    assert fragment in reply["error"]["message"]


def test_a_changed_spec_for_an_existing_window_id_is_a_409(two_workers):
    body = {"window_id": "fixed", "record": {"value": 1}, "window_size": 10, "aggregation": "sum", "value_key": "value"}
    assert two_workers[0].post("/api/v1/aggregate", body)[0] == 200
    status, reply = two_workers[1].post("/api/v1/aggregate", {**body, "window_size": 20})
    assert status == 409, reply
    assert reply["error"]["code"] == "spec_conflict"
    assert reply["error"]["details"]["existing"]["window"]["size"] == 10
    # The refused request changed nothing.
    assert two_workers[1].post("/api/v1/aggregate", body)[1]["value"] == 2


def test_wrong_content_type_and_unknown_window_id(two_workers):
    status, reply = two_workers[0].post("/api/v1/aggregate", {"window_id": "x"}, content_type="text/plain",
                                        headers={"Origin": "http://elsewhere.example"})
    assert status == 415
    status, reply = two_workers[0].get("/api/v1/aggregate/never-seen")
    assert status == 404 and reply["error"]["code"] == "unknown_window"


def test_a_replayed_request_id_is_applied_once_whichever_worker_gets_it(two_workers):
    """The replay protection: a request repeated with its Idempotency-Key (a client's
    retry after a lost answer) is answered from the state, not applied again, also when
    the repeat reaches the other worker (one of the two forwards it to the owner)."""
    body = {"window_id": "replayed", "window_size": 100, "aggregation": "sum", "value_key": "v"}
    first = two_workers[0].post("/api/v1/aggregate", {**body, "record": {"v": 5}},
                                headers={"Idempotency-Key": "req-1"})
    assert first[0] == 200 and first[1]["value"] == 5
    for w in two_workers:
        again = w.post("/api/v1/aggregate", {**body, "record": {"v": 5}}, headers={"Idempotency-Key": "req-1"})
        assert again == first
    assert two_workers[1].post("/api/v1/aggregate", {**body, "record": {"v": 1}},
                               headers={"Idempotency-Key": "req-2"})[1]["value"] == 6


def test_exactly_once_two_workers_one_running_aggregate(kafka):
    """Under exactly_once the owner commits each changelog write in its own transaction
    before answering (agents/aggregate_api.py): alternating workers still fold into one
    running aggregate, a replayed request id is not applied twice, and the aggregate
    survives a kill -9 of both workers (the restarted ones restore it from the changelog)."""
    name = unique("aggeos")
    env = {"STREAMETL_PIPELINES_FILE": "", "STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}
    ws = [Worker(app_id=name, topic_prefix=f"{name}.", env=env) for _ in range(2)]
    try:
        for w in ws:
            w.start(wait=False)
        for w in ws:
            w.wait_ready(150)
        body = {"window_id": "eos", "window_size": 100, "aggregation": "sum", "value_key": "v"}
        values = [3, 1, 4, 1, 5, 9, 2, 6]
        for i, v in enumerate(values):
            status, reply = ws[i % 2].post("/api/v1/aggregate", {**body, "record": {"v": v}},
                                           headers={"Idempotency-Key": f"eos-{i}"})
            assert status == 200, reply
            assert reply["value"] == sum(values[: i + 1])
        assert ws[0].post("/api/v1/aggregate", {**body, "record": {"v": 6}},
                          headers={"Idempotency-Key": "eos-7"})[1]["value"] == sum(values)
        for w in ws:
            w.kill()
        ws = [Worker(app_id=name, topic_prefix=f"{name}.", env=env, data_dir=w.data_dir) for w in ws]
        for w in ws:
            w.start(wait=False)
        for w in ws:
            w.wait_ready(150)
        for w in ws:
            status, view = w.get("/api/v1/aggregate/eos")
            assert status == 200, view
            assert view["windows"][0]["aggregates"] == {"sum": sum(values)}
    finally:
        for w in ws:
            w.kill()
