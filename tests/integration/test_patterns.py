"""Pattern detection against the real broker, with two workers of one app.

Every expectation is stated by hand and, where it can be, also recomputed by folding
the same input through the pure matchers (``operators.patterns``) per key.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from app.patterns import EngineConfig, parse_definition
from tests.support import Worker, produce_json, read_topic, run, unique, wait_for

FRAUD = {
    "name": "fraud", "type": "sequence", "key_by": "user_id", "within": "10m",
    "steps": [
        {"name": "fail", "where": "action == 'login' and status == 'failed'", "times": 3},
        {"name": "buy", "where": "action == 'purchase' and country != match.fail.country"},
    ],
}
TREND = {"name": "overheating", "type": "trend", "key_by": "sensor", "field": "temp",
         "direction": "rising", "min_slope": 1.0, "points": 4}
ANOMALY = {"name": "odd-amount", "type": "anomaly", "key_by": "card", "field": "amount",
           "method": "zscore", "threshold": 3, "warmup": 4, "window": 20}
ABSENCE = {"name": "no-heartbeat", "type": "absence", "key_by": "device",
           "trigger": "type == 'heartbeat'", "expect": "type == 'heartbeat'", "within": 3}
CONFIG = {"patterns": {"sources": ["events"], "source_key": "user_id", "time_field": "ts",
                       "timer_interval": 0.3, "definitions": [FRAUD, TREND, ANOMALY, ABSENCE]}}


@pytest.fixture(scope="module")
def cluster(kafka):
    name = unique("pat")
    config = Path(tempfile.mkdtemp(prefix="streametl-pat-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {"STREAMETL_PIPELINES_FILE": str(config)}
    ws = [Worker(app_id=name, topic_prefix=f"{name}.", env=env) for _ in range(2)]
    ws[0].start(timeout=120)
    ws[1].start(timeout=120)
    for w in ws:
        w.wait_ready(120)
    yield ws
    for w in ws:
        w.kill()


def topic(ws, name):
    return ws[0].topic_prefix + name


async def read_alerts(ws, pattern, timeout=60.0):
    records = await read_topic(topic(ws, "alerts"), timeout=timeout, idle=3.0)
    by_id = {}
    for r in records:
        a = r.json()
        if a["pattern"] == pattern:
            by_id.setdefault(a["alert_id"], a)  # at-least-once copies share the id
    return list(by_id.values())


def alerts_of(ws, pattern, timeout=60.0):
    """Every distinct alert of one pattern on the alerts topic."""
    return run(read_alerts(ws, pattern, timeout))


def wait_alerts(ws, pattern, count, timeout=90.0):
    """Alerts of one pattern once at least ``count`` arrived (then a quiet read)."""
    async def enough():
        return len(await read_alerts(ws, pattern, timeout=5)) >= count
    run(wait_for(enough, timeout=timeout, interval=1.0, what=f"{count} {pattern} alerts"))
    return alerts_of(ws, pattern)


def fold(definition, events, key_by):
    """Expected matches: the same events through the pure matcher, key by key."""
    matcher = parse_definition(definition, EngineConfig()).matcher
    states, out = {}, defaultdict(list)
    for e in events:
        key = e[key_by]
        states[key], matches = matcher.step(states.get(key), e, e["ts"], e["event_id"])
        out[key] += [[x["event_id"] for x in m.evidence] for m in matches]
    return dict(out)


def test_fraud_one_alert_per_match_and_none_for_near_misses(cluster):
    base = time.time() - 1000
    events = []

    def add(user, dt, **fields):
        events.append({"event_id": f"{user}-{len(events)}", "user_id": user, "ts": base + dt, **fields})
        return events[-1]["event_id"]

    for user in ("match", "two", "late", "home", "burst"):
        n = 2 if user == "two" else 5 if user == "burst" else 3
        for i in range(n):
            add(user, i * 10, action="login", status="failed", country="DE")
        add(user, 30, action="view", country="DE")
    bought = add("match", 300, action="purchase", country="BR")
    add("two", 300, action="purchase", country="BR")
    add("late", 660, action="purchase", country="BR")      # 11 minutes after the first failure
    add("home", 300, action="purchase", country="DE")      # the usual country
    add("burst", 300, action="purchase", country="BR")
    add("burst", 310, action="purchase", country="BR")     # a second purchase: the match was used
    run(produce_json(topic(cluster, "events"), events, key="user_id"))

    alerts = wait_alerts(cluster, "fraud", 2)
    by_key = defaultdict(list)
    for a in alerts:
        by_key[a["key"]].append(a)
    assert sorted(by_key) == ["burst", "match"]
    assert len(by_key["match"]) == 1 and len(by_key["burst"]) == 1
    m = by_key["match"][0]
    assert [e["event_id"] for e in m["evidence"]] == ["match-0", "match-1", "match-2", bought]
    assert m["at"] == pytest.approx(base + 300) and m["key_by"] == "user_id" and m["kind"] == "sequence"
    expected = fold(FRAUD, events, "user_id")
    got = {k: [[e["event_id"] for e in a["evidence"]] for a in v] for k, v in by_key.items()}
    assert got == {k: v for k, v in expected.items() if v}

    # Both workers answer the same, whichever owns the key.
    for w in cluster:
        status, body = w.get("/api/v1/alerts?pattern=fraud&key=match")
        assert status == 200, body
        assert [a["alert_id"] for a in body["alerts"]] == [m["alert_id"]]

    def counted():
        status, body = cluster[1].get("/api/v1/patterns")
        return {p["name"]: p["matches"] for p in body["patterns"]}.get("fraud") == 2
    run(wait_for(counted, timeout=60, what="match count 2 on the other worker"))


def test_partial_matches_are_read_back_from_their_own_partitions_in_a_mixed_batch(cluster):
    """State stored by an earlier batch must be found when the next batch mixes
    partitions (Faust reads a table key from the *current* event's partition)."""
    from app.kafka_io import partition_for

    events_topic = topic(cluster, "events")
    base = time.time() - 200
    users = [f"mixed-{i}" for i in range(8)]
    assert len({partition_for(u.encode(), 4, 0) for u in users}) >= 3

    def fail(user, i):
        return {"event_id": f"{user}-f{i}", "user_id": user, "action": "login", "status": "failed",
                "country": "DE", "ts": base + i}
    run(produce_json(events_topic, [fail(u, i) for i in range(2) for u in users], key="user_id"))

    async def stored():
        records = await read_topic(f"{cluster[0].app_id}-pattern-state-changelog", timeout=5, idle=1.0)
        keys = {r.key for r in records}
        return all(json.dumps(f"user_id={u}").encode() in keys for u in users)
    run(wait_for(stored, timeout=60, interval=0.5, what="the partial matches stored"))

    # One produce call (one consumer batch, all partitions): the third failure and the
    # purchase of every user.
    run(produce_json(events_topic, [fail(u, 2) for u in users] + [
        {"event_id": f"{u}-buy", "user_id": u, "action": "purchase", "country": "BR", "ts": base + 50}
        for u in users], key="user_id"))

    async def all_alerted():
        found = [a for a in await read_alerts(cluster, "fraud", timeout=5) if a["key"] in users]
        return found if len({a["key"] for a in found}) == len(users) else None
    found = run(wait_for(all_alerted, timeout=60, interval=1.0, what="one fraud alert per user"))
    assert sorted(a["key"] for a in found) == sorted(users)  # exactly one each
    for a in found:
        u = a["key"]
        assert [e["event_id"] for e in a["evidence"]] == [f"{u}-f0", f"{u}-f1", f"{u}-f2", f"{u}-buy"]


def test_trend_and_anomaly_on_hand_checked_series(cluster):
    base = time.time() - 100
    events = []
    for i, temp in enumerate([10, 11, 11, 14]):  # slope 1.2 per second at the 4th point
        events.append({"event_id": f"t{i}", "sensor": "s1", "temp": temp, "ts": base + i})
    for i, temp in enumerate([10, 10.5, 11, 11]):  # slope 0.35: below 1.0
        events.append({"event_id": f"c{i}", "sensor": "s2", "temp": temp, "ts": base + i})
    for i, amount in enumerate([10, 12, 10, 12, 14, 12]):  # mean 11 std 1: 14 is z=3
        events.append({"event_id": f"a{i}", "card": "k1", "amount": amount, "ts": base + i})
    for i, amount in enumerate([10, 12, 10, 12, 13]):  # z=2
        events.append({"event_id": f"n{i}", "card": "k2", "amount": amount, "ts": base + i})
    # Keyed by sensor / card (not by the source key user_id): the engine repartitions,
    # and each entity's order is kept because its events share a source partition.
    run(produce_json(topic(cluster, "events"), [e for e in events if "sensor" in e], key="sensor"))
    run(produce_json(topic(cluster, "events"), [e for e in events if "card" in e], key="card"))

    [trend] = wait_alerts(cluster, "overheating", 1)
    assert trend["key"] == "s1"
    assert trend["detail"]["slope"] == pytest.approx(1.2)
    assert [e["value"] for e in trend["evidence"]] == [10, 11, 11, 14]
    [odd] = wait_alerts(cluster, "odd-amount", 1)
    assert odd["key"] == "k1" and odd["evidence"][0]["event_id"] == "a4"
    assert odd["detail"]["z"] == pytest.approx(3) and odd["detail"]["mean"] == pytest.approx(11)
    assert fold(TREND, [e for e in events if "sensor" in e], "sensor") == {"s1": [["t0", "t1", "t2", "t3"]], "s2": []}
    assert fold(ANOMALY, [e for e in events if "card" in e], "card") == {"k1": [["a4"]], "k2": []}


def test_absence_fires_with_no_further_input(cluster):
    now = time.time()
    run(produce_json(topic(cluster, "events"), [
        {"event_id": "h1", "device": "d1", "type": "heartbeat", "ts": now - 2},
        {"event_id": "h2", "device": "d2", "type": "heartbeat", "ts": now - 2},
        {"event_id": "h3", "device": "d2", "type": "heartbeat", "ts": now},  # d2 beat once more
    ], key="device"))
    # Nothing else is produced: only the timers can fire these.
    alerts = wait_alerts(cluster, "no-heartbeat", 2)
    by_key = {a["key"]: a for a in alerts}
    assert sorted(by_key) == ["d1", "d2"]
    assert by_key["d1"]["at"] == pytest.approx(now + 1)
    assert by_key["d1"]["evidence"][0]["event_id"] == "h1"
    assert by_key["d2"]["at"] == pytest.approx(now + 3)  # re-armed by h3
    assert by_key["d2"]["evidence"][0]["event_id"] == "h3"
    for a in alerts:
        assert a["detected_at"] >= a["at"]  # never before the deadline


def test_runtime_patterns_register_list_apply_and_delete(cluster):
    w0, w1 = cluster
    big = {"name": "big-spend", "type": "threshold", "key_by": "user_id", "where": "amount > 1000"}
    status, body = w0.post("/api/v1/patterns", big)
    assert status == 201, body
    assert body["name"] == "big-spend" and body["origin"] == "runtime"

    def listed(worker, name):
        status, body = worker.get("/api/v1/patterns")
        return status == 200 and name in {p["name"] for p in body["patterns"]}
    run(wait_for(lambda: listed(w1, "big-spend"), timeout=60, what="pattern visible on the other worker"))

    now = time.time()
    run(produce_json(topic(cluster, "events"), [
        {"event_id": "b1", "user_id": "rich", "amount": 5000, "ts": now},
        {"event_id": "b2", "user_id": "rich", "amount": 50, "ts": now + 1},
        {"event_id": "b3", "user_id": "poor", "amount": 1001, "ts": now + 2},
    ], key="user_id"))
    alerts = wait_alerts(cluster, "big-spend", 2)
    assert sorted((a["key"], a["evidence"][0]["event_id"]) for a in alerts) == [("poor", "b3"), ("rich", "b1")]

    status, body = w1.delete("/api/v1/patterns/big-spend")
    assert status == 200, body
    run(wait_for(lambda: not listed(w0, "big-spend") and not listed(w1, "big-spend"), timeout=60,
                 what="pattern gone everywhere"))
    assert w0.delete("/api/v1/patterns/big-spend")[0] == 404
    assert w0.delete("/api/v1/patterns/fraud")[0] == 409


@pytest.mark.parametrize("definition,field", [
    ({"name": "x", "type": "frequency", "key_by": "user_id", "where": "action ==", "count": 3, "within": 60}, "where"),
    ({"name": "x", "type": "frequency", "key_by": "user_id", "count": 0, "within": 60}, "count"),
    ({"name": "x", "type": "sequence", "key_by": "user_id", "within": 60,
      "steps": [{"name": "a", "where": "x == 1"}, {"name": "b"}]}, "steps[1].where"),
    ({"name": "x", "type": "threshold", "key_by": "user_id", "where": "x > 1", "source": "orders"}, "source"),
    ({"type": "threshold", "key_by": "user_id", "where": "x > 1"}, "name"),
])
def test_invalid_runtime_definitions_get_a_422_naming_the_field(cluster, definition, field):
    status, body = cluster[0].post("/api/v1/patterns", definition)
    assert status == 422, body
    assert body["error"]["code"] == "validation_error"
    assert body["error"]["details"]["field"] == field
    assert field in body["error"]["message"]


def test_config_pattern_name_conflicts_and_bad_limit(cluster):
    status, body = cluster[0].post("/api/v1/patterns", {**FRAUD})
    assert status == 409, body
    status, body = cluster[0].get("/api/v1/alerts?limit=0")
    assert status == 422 and body["error"]["details"]["field"] == "limit"


def test_bad_records_go_to_the_dead_letter_topic(cluster):
    events_topic = topic(cluster, "events")
    run(produce_json(events_topic, [{"event_id": "nots", "user_id": "x", "ts": "soon"}],
                     raw=[b"{not json"]))

    async def ours():
        got = await read_topic(topic(cluster, "dlq"), timeout=5, idle=1.0)
        mine = [r for r in got if r.headers.get("dlq.pipeline") == b"patterns"]
        return mine if len(mine) >= 2 else None
    dead = run(wait_for(ours, timeout=60, interval=1.0, what="two dead letters"))
    reasons = sorted(r.headers["dlq.reason"].decode() for r in dead)
    assert reasons == ["invalid_event_time", "invalid_json"]
    assert all(r.headers["dlq.source_topic"] == events_topic.encode() for r in dead)
    assert json.loads(next(r.value for r in dead if r.headers["dlq.reason"] == b"invalid_event_time"))["event_id"] == "nots"


def test_exactly_once_alerts_are_committed_once_including_timer_fired_ones(kafka):
    """Under exactly_once, alerts (also those fired by timer ticks) become visible to a
    read_committed consumer, once each."""
    name = unique("eos")
    config = Path(tempfile.mkdtemp(prefix="streametl-pat-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={
        "STREAMETL_PIPELINES_FILE": str(config), "STREAMETL_PROCESSING_GUARANTEE": "exactly_once"})
    try:
        w.start(timeout=150)
        base = time.time() - 500
        events = [{"event_id": f"f{i}", "user_id": "x", "action": "login", "status": "failed",
                   "country": "DE", "ts": base + i} for i in range(3)]
        events.append({"event_id": "p", "user_id": "x", "action": "purchase", "country": "BR", "ts": base + 100})
        run(produce_json(w.topic_prefix + "events", events, key="user_id"))
        run(produce_json(w.topic_prefix + "events",
                         [{"event_id": "hb", "device": "d9", "type": "heartbeat", "ts": time.time()}], key="device"))

        async def committed():
            got = await read_topic(w.topic_prefix + "alerts", timeout=5, idle=1.0,
                                   isolation_level="read_committed")
            return got if len(got) >= 2 else None
        got = run(wait_for(committed, timeout=90, interval=1.0, what="two committed alerts"))
        assert sorted((a.json()["pattern"], a.json()["key"]) for a in got) == [
            ("fraud", "x"), ("no-heartbeat", "d9")]
    finally:
        w.kill()


def test_a_pipeline_and_patterns_on_the_same_topic_both_see_every_event(kafka):
    """``events`` feeds a pipeline and a pattern (as in the shipped config): two batch
    agents of one topic, and each must get every record."""
    name = unique("patpipe")
    config = Path(tempfile.mkdtemp(prefix="streametl-pat-")) / "pipelines.yaml"
    config.write_text(yaml.safe_dump({
        "pipelines": [{"name": "clean", "source": "events", "sink": "events.clean",
                       "steps": ["normalize"]}],
        "patterns": {"sources": ["events"], "source_key": "user_id", "time_field": "ts",
                     "definitions": [{"name": "big", "type": "threshold", "key_by": "user_id",
                                      "where": "value > 100"}]},
    }))
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": str(config)})
    w.start(timeout=120)
    try:
        now = time.time()
        events = [{"event_id": f"e{i}", "user_id": f"u{i % 3}", "value": 50 + 40 * i, "ts": now + i}
                  for i in range(5)]  # values 50, 90, 130, 170, 210: three above 100
        run(produce_json(f"{name}.events", events, key="user_id"))
        clean = run(read_topic(f"{name}.events.clean", expect=len(events), timeout=60))
        assert sorted(r.json()["event_id"] for r in clean) == [e["event_id"] for e in events]
        alerts = wait_alerts([w], "big", 3)
        assert sorted(a["key"] for a in alerts) == sorted(e["user_id"] for e in events if e["value"] > 100)
    finally:
        w.kill()
