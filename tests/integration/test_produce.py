"""POST /api/v1/produce against a real broker: what goes in comes out exactly, and
every kind of bad input gets a clear 4xx and sends nothing."""

from __future__ import annotations

import json

import pytest

from tests.support import create_topics, http, read_topic, run


@pytest.fixture(scope="module")
def two_workers(request):
    from tests.support import Worker, unique

    name = unique()
    ws = [Worker(app_id=name, topic_prefix=f"{name}.") for _ in range(2)]
    ws[0].start()
    ws[1].start()
    yield ws
    for w in ws:
        w.kill()


def events_topic(ws) -> str:
    return ws[0].topic_prefix + "events"


def test_the_readme_curl_produces_one_message_readable_with_plain_kafka(two_workers):
    w = two_workers[0]
    status, reply = w.post(
        "/api/v1/produce",
        {"topic": events_topic(two_workers), "messages": [{"user_id": 123, "action": "click", "value": 1}]},
    )
    assert status == 200, reply
    assert reply["topic"] == events_topic(two_workers)
    assert reply["count"] == 1
    [result] = reply["results"]
    records = run(read_topic(events_topic(two_workers), expect=1))
    assert [r.json() for r in records] == [{"user_id": 123, "action": "click", "value": 1}]
    assert (records[0].partition, records[0].offset) == (result["partition"], result["offset"])


def test_both_workers_serve_the_api_and_keys_follow_kafkas_partitioner(two_workers):
    topic = two_workers[0].topic_prefix + "keyed"
    # the app declares only its own topics; this one is created directly
    run(create_topics([topic], partitions=4))
    sent = []
    for i, w in enumerate(two_workers):
        messages = [{"user_id": f"u{j}", "n": i * 100 + j} for j in range(50)]
        status, reply = w.post(
            "/api/v1/produce",
            {"topic": topic, "messages": messages, "key_field": "user_id", "headers": {"source": f"w{i}"}},
        )
        assert status == 200, reply
        assert reply["count"] == 50
        sent.extend(zip(messages, reply["results"], strict=True))
    got = run(read_topic(topic, expect=100))
    assert len(got) == 100
    by_position = {(r.partition, r.offset): r for r in got}
    for message, result in sent:
        record = by_position[(result["partition"], result["offset"])]
        assert record.json() == message
        assert record.key == message["user_id"].encode()
        assert record.headers["source"] in (b"w0", b"w1")
    # The same key always lands on the same partition, whichever worker produced it.
    partitions_by_key: dict[bytes, set[int]] = {}
    for r in got:
        partitions_by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in partitions_by_key.values())


def test_a_large_batch_is_acknowledged_with_consecutive_offsets(two_workers):
    w = two_workers[1]
    topic = events_topic(two_workers)
    messages = [{"i": i, "pad": "x" * 200} for i in range(3000)]
    status, reply = w.post("/api/v1/produce", {"topic": topic, "messages": messages})
    assert status == 200, reply
    assert reply["count"] == 3000
    positions = {(r["partition"], r["offset"]) for r in reply["results"]}
    assert len(positions) == 3000


def post_without_content_type(url: str, body: bytes) -> tuple[int, dict]:
    """A POST that carries no Content-Type header at all (urllib would add one)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "text/plain; charset=utf-8"],
                         ids=["no header", "form-urlencoded (curl -d)", "text/plain", "text/plain charset"])
def test_json_sent_without_the_json_content_type_is_produced(two_workers, content_type):
    """`curl -d '{...}'` with no -H: a JSON body in a simple content type from a
    non-browser client (no Origin header) is read as JSON."""
    w = two_workers[0]
    topic = events_topic(two_workers)
    body = json.dumps({"topic": topic, "messages": [{"ct": str(content_type)}]}).encode()
    if content_type is None:
        status, reply = post_without_content_type(w.url + "/api/v1/produce", body)
    else:
        status, reply = http("POST", w.url + "/api/v1/produce", raw=body, content_type=content_type)
    assert status == 200, reply
    assert reply["count"] == 1
    records = run(read_topic(topic, idle=0.5))
    assert {"ct": str(content_type)} in [r.json() for r in records]


BAD_INPUTS = [
    # (description, kwargs for http(), expected status, expected error code)
    ("not json", dict(raw=b"{not json"), 400, "invalid_json"),
    ("not a JSON-compatible content type", dict(raw=b'{"topic": "x", "messages": [{}]}', content_type="application/xml"), 415, "unsupported_media_type"),
    ("cross-site text/plain from a browser", dict(raw=b'{"topic": "x", "messages": [{}]}', content_type="text/plain", headers={"Origin": "http://elsewhere.example"}), 415, "unsupported_media_type"),
    ("cross-site form post from a browser", dict(raw=b'{"topic": "x", "messages": [{}]}', content_type="application/x-www-form-urlencoded", headers={"Origin": "http://elsewhere.example"}), 415, "unsupported_media_type"),
    ("not json, sent as curl -d sends it", dict(raw=b"topic=x", content_type=""), 400, "invalid_json"),
    ("body is a list", dict(body=[1, 2]), 400, "invalid_body"),
    ("missing messages", dict(body={"topic": "{events}"}), 422, "validation_error"),
    ("empty messages", dict(body={"topic": "{events}", "messages": []}), 422, "validation_error"),
    ("message not an object", dict(body={"topic": "{events}", "messages": [{"a": 1}, 5]}), 422, "validation_error"),
    ("illegal topic name", dict(body={"topic": "bad topic!", "messages": [{"a": 1}]}), 422, "validation_error"),
    ("topic too long", dict(body={"topic": "x" * 250, "messages": [{"a": 1}]}), 422, "validation_error"),
    ("unknown topic", dict(body={"topic": "{prefix}does-not-exist", "messages": [{"a": 1}]}), 404, "unknown_topic"),
    ("key field missing", dict(body={"topic": "{events}", "messages": [{"a": 1}], "key_field": "user_id"}), 422, "validation_error"),
    ("headers not strings", dict(body={"topic": "{events}", "messages": [{"a": 1}], "headers": {"h": 1}}), 422, "validation_error"),
    ("too many messages", dict(body={"topic": "{events}", "messages": [{"a": 1}] * 10_001}), 413, "too_many_messages"),
    ("too many bytes", dict(body={"topic": "{events}", "messages": [{"pad": "x" * 1_000_000}] * 9}), 413, "payload_too_large"),
]


@pytest.mark.parametrize("case,kwargs,status,code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_sends_nothing(two_workers, case, kwargs, status, code):
    w = two_workers[0]
    prefix = w.topic_prefix
    topic = events_topic(two_workers)
    before = len(run(read_topic(topic, idle=0.5)))
    kwargs = dict(kwargs)
    if "body" in kwargs:
        kwargs["body"] = json.loads(
            json.dumps(kwargs["body"]).replace("{events}", topic).replace("{prefix}", prefix)
        )
    got_status, reply = http("POST", w.url + "/api/v1/produce", **kwargs)
    assert got_status == status, reply
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    after = len(run(read_topic(topic, idle=0.5)))
    assert after == before


def test_a_logical_topic_name_means_the_apps_prefixed_topic(two_workers):
    """The README's `"topic": "events"` under STREAMETL_TOPIC_PREFIX: the logical name of
    one of the app's own topics (as in the config) means that topic; a name the app does
    not own still gets 404."""
    w = two_workers[0]
    status, reply = w.post("/api/v1/produce", {"topic": "events", "messages": [{"logical": 1}]})
    assert status == 200, reply
    assert reply["topic"] == events_topic(two_workers)
    assert {"logical": 1} in [r.json() for r in run(read_topic(events_topic(two_workers), idle=0.5))]
    status, reply = w.post("/api/v1/produce", {"topic": "no-such-app-topic", "messages": [{"a": 1}]})
    assert status == 404 and reply["error"]["code"] == "unknown_topic"
