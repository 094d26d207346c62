"""Debezium change events into changes, and the fold a replica must equal (issue 21)."""

from __future__ import annotations

import json
import random

import pytest

from operators.cdc import (
    DELETE,
    TRUNCATE,
    UPSERT,
    Change,
    ChangeError,
    fold,
    last_per_key,
    parse_change,
)


def event(op, before=None, after=None, wrapped=False, ts=1700000000000):
    payload = {"op": op, "before": before, "after": after, "source": {"ts_ms": ts, "lsn": 42}}
    return json.dumps({"schema": {}, "payload": payload} if wrapped else payload).encode()


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_creates_updates_and_snapshot_reads_upsert_the_after_row(op, wrapped):
    change = parse_change(b'{"id": 1}', event(op, after={"id": 1, "name": "a"}, wrapped=wrapped), ["id"])
    assert change == Change(UPSERT, (1,), {"id": 1, "name": "a"}, 1700000000000)


def test_a_delete_takes_its_key_from_before_or_the_message_key():
    assert parse_change(None, event("d", before={"id": 2, "name": "b"}), ["id"]).key == (2,)
    assert parse_change(b'{"id": 3}', event("d"), ["id"]) == Change(DELETE, (3,), None, 1700000000000)


def test_a_tombstone_deletes_the_message_keys_row():
    assert parse_change(b'{"schema": {}, "payload": {"id": 4}}', None, ["id"]) == Change(DELETE, (4,), None)


def test_a_truncate_empties_the_table():
    assert parse_change(None, event("t"), ["id"]).op == TRUNCATE


@pytest.mark.parametrize("key,value,reason", [
    (None, b"{not json", "invalid_json"),
    (None, b"[1, 2]", "not_an_envelope"),
    (None, event("x", after={"id": 1}), "unknown_op"),
    (None, event("c"), "missing_after"),
    (None, event("c", after={"name": "no id"}), "missing_key"),
    (None, None, "missing_key"),
    (b"7", None, "missing_key"),
])
def test_malformed_events_say_why(key, value, reason):
    with pytest.raises(ChangeError) as caught:
        parse_change(key, value, ["id"])
    assert caught.value.reason == reason


def test_the_fold_and_the_last_change_per_key_leave_the_same_table():
    changes = [
        Change(UPSERT, (1,), {"id": 1, "v": "a"}), Change(UPSERT, (2,), {"id": 2, "v": "b"}),
        Change(UPSERT, (1,), {"id": 1, "v": "a2"}), Change(DELETE, (2,), None),
        Change(TRUNCATE, None, None), Change(UPSERT, (3,), {"id": 3, "v": "c"}),
        Change(UPSERT, (3,), {"id": 3, "v": "c2"}), Change(DELETE, (9,), None),
    ]
    assert fold(changes) == {(3,): {"id": 3, "v": "c2"}}
    assert fold(last_per_key(changes)) == fold(changes)
    assert [c.op for c in last_per_key(changes)] == [TRUNCATE, DELETE, UPSERT]  # deletes first
    assert fold(last_per_key(changes[:4])) == fold(changes[:4]) == {(1,): {"id": 1, "v": "a2"}}


def test_a_batch_reduced_per_key_leaves_the_table_every_change_in_order_leaves():
    """A review finding (session 32): the reduction kept a key's last change only, so
    an upsert without some fields (they stay as they were) dropped the fields of an
    earlier upsert in the same batch, and a delete followed by an upsert lost the
    delete: the table depended on where the batches were cut."""
    rng = random.Random(5)
    for _ in range(300):
        changes = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            key = (rng.randint(1, 3),)
            if roll < 0.05:
                changes.append(Change(TRUNCATE, None, None))
            elif roll < 0.3:
                changes.append(Change(DELETE, key, None))
            else:
                fields = rng.sample(["a", "b", "c"], rng.randint(0, 3))
                changes.append(Change(UPSERT, key, {"id": key[0], **{f: rng.randint(0, 9) for f in fields}}))
        reduced = last_per_key(changes)
        assert fold(reduced) == fold(changes), changes
        keys = [c.key for c in reduced if c.op != TRUNCATE]
        assert all(keys.count(k) <= 2 for k in keys)
