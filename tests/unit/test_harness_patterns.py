"""The processor harness for pattern rules (app/harness.py ``pattern_processor``): the
pattern engine's own code (agents/patterns.py: parse and split a source batch, match
the forwarded records as the repartition agent does, apply them) over in-memory
stores and emitter, tested in a few lines without a broker: alerts, bad records to
the dead-letter topic, each key's state in the partition its key goes to, written once
per commit under at_least_once and per batch under exactly_once."""

from __future__ import annotations

import orjson

from app.harness import Record, pattern_processor, run_batches

RULES = [
    {"name": "big", "type": "threshold", "key_by": "card", "source": "tx", "where": "value > 90"},
    {"name": "burst", "type": "frequency", "key_by": "card", "source": "tx",
     "where": "value > 0", "count": 3, "within": 60},
]


def tx(partition: int, offset: int, card: str, value: int, ts: float) -> Record:
    return Record(partition, offset, orjson.dumps({"card": card, "value": value, "ts": ts,
                                                   "event_id": f"{card}-{offset}"}))


def alerts(outputs) -> list[tuple[bytes, str]]:
    return [(key, orjson.loads(value)["pattern"]) for _, key, value, _, _ in outputs]


def test_alerts_state_and_dead_letters():
    rules = pattern_processor(RULES, source="tx")
    outputs, state = run_batches(rules, [
        [tx(0, 0, "c1", 95, 100.0), tx(0, 1, "c1", 10, 101.0), tx(1, 0, "c2", 5, 100.0)],
        [tx(0, 2, "c1", 20, 102.0), Record(0, 3, b"not json")],
    ])
    assert alerts(outputs) == [(b"c1", "big"), (b"c1", "burst")]
    states = {key: value for db in state.values() for key, value in db.items()}
    assert sorted(states) == [b'"card=c1"', b'"card=c2"']
    assert states[b'"card=c2"']["s"]["burst"]["st"]["h"] == [[100.0, "c2-0"]]
    assert [why["reason"] for _, _, why in rules.commit.emitter.dead] == ["invalid_json"]


def test_state_waits_for_the_commit_under_at_least_once_only():
    deferred = pattern_processor(RULES, source="tx")
    run_batches(deferred, [[tx(0, 0, "c1", 5, 100.0)], [tx(0, 1, "c1", 6, 101.0)]], commit_every=10)
    assert deferred.store.flushes == 1  # both batches' changes written once, at the commit
    per_batch = pattern_processor(RULES, source="tx", exactly_once=True)
    run_batches(per_batch, [[tx(0, 0, "c1", 5, 100.0)], [tx(0, 1, "c1", 6, 101.0)]], commit_every=10)
    assert per_batch.store.flushes == 2
