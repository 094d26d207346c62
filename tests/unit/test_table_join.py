"""The temporal stream-table join's pure logic (operators/table_join.py): version
lookup, insertion, retention pruning, tombstones, the two ``as_of`` modes and both join
types, and the HTTP batch through ``run_batch`` (the step language)."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from operators.steps import MemoryContext, StepSpecError, parse_steps, run_batch
from operators.table_join import (
    BatchTableJoin,
    TableJoinSpec,
    TableRecord,
    VersionedTable,
    insert_version,
    key_text,
    prune,
    table_record,
    version_at,
)

H = 100.0


def spec(**kw) -> TableJoinSpec:
    base = dict(on=("k",), table_key=("k",), as_of="event_time", history=H, type="inner")
    base.update(kw)
    return TableJoinSpec(**base)


def row(k, v):
    return {"k": k, "v": v}


def test_a_row_updated_at_t1_and_t2_joins_records_between_them_against_its_t1_version():
    """The issue's case: updates at t1 and t2; a stream record at t1 <= t < t2 joins the
    t1 version, one at t >= t2 the t2 version, one before t1 nothing."""
    table = VersionedTable(spec())
    key = key_text([1])
    table.update(TableRecord(key, row(1, "t1"), 1000.0))
    table.update(TableRecord(key, row(1, "t2"), 1010.0))
    assert table.join({"k": 1, "ts": 1005}).right["v"] == "t1"  # type: ignore[union-attr]
    assert table.join({"k": 1, "ts": 1000}).right["v"] == "t1"  # type: ignore[union-attr]
    assert table.join({"k": 1, "ts": 1010}).right["v"] == "t2"  # type: ignore[union-attr]
    assert table.join({"k": 1, "ts": 1050}).right["v"] == "t2"  # type: ignore[union-attr]
    assert table.join({"k": 1, "ts": 999}) is None  # before the oldest version: no row
    assert table.counts.pairs == 4 and table.counts.unmatched == 1


def test_latest_joins_the_current_row_in_arrival_order_whatever_the_times():
    """``as_of: latest``: the last record read is the row (offset order, what a compacted
    topic keeps), even when its timestamp is older."""
    table = VersionedTable(spec(as_of="latest"))
    key = key_text([1])
    table.update(TableRecord(key, row(1, "a"), 1010.0))
    table.update(TableRecord(key, row(1, "b"), 1000.0))
    assert table.join({"k": 1, "ts": 1005}).right["v"] == "b"  # type: ignore[union-attr]
    assert table.join({"k": 1}).right["v"] == "b"  # type: ignore[union-attr]  # no time needed
    table.update(TableRecord(key, None, 1020.0))
    assert table.join({"k": 1, "ts": 1005}) is None
    assert key not in table.rows


def test_a_tombstone_is_a_version_no_row_from_its_time_on():
    table = VersionedTable(spec(type="left"))
    key = key_text(["a"])
    table.update(TableRecord(key, row("a", 1), 1000.0))
    table.update(TableRecord(key, None, 1010.0))
    table.update(TableRecord(key, row("a", 2), 1020.0))
    assert table.join({"k": "a", "ts": 1005}).right == row("a", 1)  # type: ignore[union-attr]
    joined = table.join({"k": "a", "ts": 1015})
    assert joined is not None and joined.right is None  # left: emitted alone
    assert table.join({"k": "a", "ts": 1020}).right == row("a", 2)  # type: ignore[union-attr]


def test_versions_are_kept_back_to_the_horizon_and_a_stream_record_beyond_it_finds_no_row():
    """Retention: table time minus ``history``. The version valid at the horizon stays;
    older ones go; a stream record older than the horizon joins as "no row" (also while
    the old version is still stored), a table record older than it is dropped."""
    table = VersionedTable(spec(type="left"))
    key = key_text([1])
    for t in (1000.0, 1050.0, 1120.0, 1200.0):
        table.update(TableRecord(key, row(1, t), t))
    # table time 1200, horizon 1100: the version of 1050 is valid at 1100 and stays.
    assert [v[0] for v in table.rows[key]["v"]] == [1050.0, 1120.0, 1200.0]
    assert table.join({"k": 1, "ts": 1100}).right["v"] == 1050.0  # type: ignore[union-attr]
    beyond = table.join({"k": 1, "ts": 1099})
    assert beyond is not None and beyond.right is None and table.counts.beyond_history == 1
    assert not table.update(TableRecord(key, row(1, "old"), 1099.0))
    assert table.counts.table_late == 1
    assert table.join({"k": 1, "ts": 1110}).right["v"] == 1050.0  # type: ignore[union-attr]


def test_keys_that_are_not_updated_again_are_pruned_as_table_time_passes():
    """The pruning index: another key's updates move table time, and the old versions
    of a key updated no more are dropped; a key whose last version is an old tombstone
    leaves the table."""
    table = VersionedTable(spec())
    a, b, c = key_text([1]), key_text([2]), key_text([3])
    table.update(TableRecord(a, row(1, "x"), 1000.0))
    table.update(TableRecord(a, row(1, "y"), 1010.0))
    table.update(TableRecord(b, row(2, "x"), 1000.0))
    table.update(TableRecord(b, None, 1020.0))
    table.update(TableRecord(c, row(3, "z"), 1200.0))  # horizon 1100
    assert table.rows[a]["v"] == [[1010.0, row(1, "y")]]
    assert b not in table.rows
    assert table.rows[c]["v"] == [[1200.0, row(3, "z")]]


def test_the_pruning_index_is_rebuilt_from_stored_rows():
    """After a restore the index comes from the rows (a restart, a rebalance)."""
    first = VersionedTable(spec())
    key = key_text([1])
    first.update(TableRecord(key, row(1, "x"), 1000.0))
    first.update(TableRecord(key, row(1, "y"), 1010.0))
    restored = VersionedTable(spec(), dict(first.rows), first.table_time)
    restored.update(TableRecord(key_text([9]), row(9, "z"), 1500.0))
    assert restored.rows[key]["v"] == [[1010.0, row(1, "y")]]


def test_pure_version_helpers():
    versions: list = []
    for t, v in ((5.0, "b"), (1.0, "a"), (9.0, "c"), (5.0, "b2")):
        insert_version(versions, t, {"v": v})
    assert versions == [[1.0, {"v": "a"}], [5.0, {"v": "b2"}], [9.0, {"v": "c"}]]
    assert version_at(versions, 0.5) is None
    assert version_at(versions, 4.9) == {"v": "a"}
    assert version_at(versions, 5.0) == {"v": "b2"}
    assert version_at(versions, math.inf) == {"v": "c"}
    assert prune(versions, 6.0) == versions[1:]
    assert prune(versions, 1.0) == versions
    assert prune([[1.0, None]], 2.0) == []
    assert prune([[1.0, None]], 0.5) == [[1.0, None]]
    assert prune([[1.0, {"v": 1}]], 1e9) == [[1.0, {"v": 1}]]  # a live row is kept however old


def test_lookup_equals_a_brute_force_fold_of_random_updates():
    """Random updates (out of order within the history) and lookups: each stream record
    joins the row of the latest update with time <= its own among all updates applied
    before it, unless it or the update is beyond the horizon."""
    rng = random.Random(7)
    s = spec(type="left", history=50.0)
    table = VersionedTable(s)
    applied: list[tuple[int, float, dict | None]] = []
    table_time = -math.inf
    for step in range(3000):
        k = rng.randrange(5)
        t = 1000 + step * 0.5 + rng.uniform(-30, 5)
        if rng.random() < 0.5:
            value = None if rng.random() < 0.15 else row(k, step)
            ok = table.update(TableRecord(key_text([k]), value, t))
            assert ok == (t >= table_time - 50.0)
            if ok:
                applied.append((k, t, value))
                table_time = max(table_time, t)
        else:
            joined = table.join({"k": k, "ts": t})
            if t < table_time - 50.0:
                want = None
            else:
                candidates = [(ut, i) for i, (uk, ut, _) in enumerate(applied) if uk == k and ut <= t]
                # the last applied of the greatest time wins (same time: replaced)
                want = applied[max(candidates)[1]][2] if candidates else None
            assert joined is not None and joined.right == want, (step, k, t)


def test_table_records_json_and_debezium():
    s = spec(table_key=("id",))
    assert table_record(s, b"1", b'{"id": 1, "n": "a"}', 5.0) == TableRecord("1", {"id": 1, "n": "a"}, 5.0)
    assert table_record(s, b'{"id": 1}', None, 6.0) == TableRecord("1", None, 6.0)
    # b"1": the number 1, or the text "1" as a text key is written (both are tried).
    assert table_record(s, b"1", None, 6.0) == TableRecord("1", None, 6.0, '"1"')
    assert table_record(spec(table_key=("id",), on=("cid",)), b"abc", None, 1.0).key == '"abc"'
    d = spec(table_key=("id",), format="debezium")
    assert table_record(d, None, {"op": "u", "after": {"id": 2, "n": "b"}}, 1.0).row == {"id": 2, "n": "b"}
    assert table_record(d, b'{"id": 2}', None, 1.0).row is None
    assert table_record(d, None, {"op": "d", "before": {"id": 2}}, 1.0) == TableRecord("2", None, 1.0)


@pytest.mark.parametrize("as_of", ["latest", "event_time"])
@pytest.mark.parametrize("raw", [b"42", b"4.5", b"true"])
def test_a_delete_keyed_by_plain_text_removes_the_row_of_that_text_key(as_of, raw):
    """A review finding (session 32): a text key is written as plain text (``b"42"``
    for ``"42"``), but a delete's message key was read as JSON first (the number 42),
    so it never named the row ``{"id": "42"}``, which went on joining."""
    s = spec(table_key=("id",), on=("cid",), as_of=as_of, type="inner")
    table = VersionedTable(s)
    text = raw.decode()
    table.update(table_record(s, raw, orjson.dumps({"id": text, "n": "a"}), 1000.0))
    assert table.join({"cid": text, "ts": 1001.0}) is not None
    table.update(table_record(s, raw, None, 1002.0))
    assert table.join({"cid": text, "ts": 1003.0}) is None
    # A row keyed by the number itself is still the one such a delete names first.
    numeric = VersionedTable(s)
    value = orjson.loads(raw)
    numeric.update(table_record(s, raw, orjson.dumps({"id": value, "n": "b"}), 1000.0))
    numeric.update(table_record(s, raw, orjson.dumps({"id": text, "n": "c"}), 1000.0))
    numeric.update(table_record(s, raw, None, 1002.0))
    assert numeric.join({"cid": value, "ts": 1003.0}) is None
    assert numeric.join({"cid": text, "ts": 1003.0}) is not None


@pytest.mark.parametrize("as_of", ["latest", "event_time"])
def test_a_null_key_matches_no_row(as_of):
    """A review finding (session 32): a row ``{"id": null}`` was stored under the key
    ``null`` and joined every stream record whose key was null. A null key matches
    nothing, as in SQL: such a row is dead-lettered, such a record is unmatched."""
    from operators.cdc import ChangeError

    s = spec(table_key=("id",), on=("cid",), as_of=as_of, type="left")
    with pytest.raises(ChangeError) as refused:
        table_record(s, b"null", b'{"id": null, "n": "ghost"}', 1000.0)
    assert refused.value.reason == "missing_key"
    table = VersionedTable(s)
    table.update(TableRecord("null", {"id": None, "n": "ghost"}, 1000.0))  # stored before the fix
    joined = table.join({"cid": None, "ts": 1001.0})
    assert joined is not None and joined.right is None
    assert VersionedTable(spec(table_key=("id",), on=("cid",), as_of=as_of, type="inner")).join(
        {"cid": None, "ts": 1001.0}) is None


def test_the_step_is_parsed_and_checked():
    steps = parse_steps([{"op": "join", "with_table": "customers", "on": "customer_id", "table_key": "id",
                          "as_of": "event_time", "history": "1h", "type": "left"}])
    ts, other, inline = steps[0].params
    assert (ts.on, ts.table_key, ts.as_of, ts.history, ts.type, other, inline) == (
        ("customer_id",), ("id",), "event_time", 3600.0, "left", "customers", None)
    for bad, param in (({"as_of": "now"}, "as_of"), ({"type": "outer"}, "type"), ({"history": "1h"}, "history"),
                       ({"within": "1m"}, "within"), ({"table_key": ["a", "b"]}, "table_key")):
        with pytest.raises(StepSpecError) as exc:
            parse_steps([{"op": "join", "with_table": "t", "on": "k", **bad}])
        assert exc.value.param == param


def test_over_http_the_batch_reads_both_lists_in_time_order():
    """``table_records`` inline: the stream record placed before a table update in time
    joins the earlier version; inner drops (``no_row``) what finds nothing; failures
    and late table records are named with their side and index."""
    body = [{"k": 1, "ts": 1005, "id": "s1"}, {"k": 1, "ts": 1015, "id": "s2"}, {"k": 2, "ts": 1015, "id": "s3"},
            {"k": 1, "id": "no time"}]
    table = [{"key": 1, "value": {"k": 1, "v": "t1"}, "timestamp": 1000},
             {"value": {"k": 1, "v": "t2"}, "timestamp": 1010},
             {"key": 1, "value": None, "timestamp": 1020},
             {"value": {"k": 3, "v": "late"}, "timestamp": 900},
             {"value": {"no": "key"}, "timestamp": 1000}]
    steps = parse_steps([{"op": "join", "table_records": table, "on": "k", "as_of": "event_time", "history": 60},
                         {"op": "filter", "where": "right.v != 'x'"}])
    result = run_batch(steps, body, MemoryContext())
    assert [(r["left"]["id"], r["right"]["v"], r["ts"]) for r in result.records] == [("s1", "t1", 1005),
                                                                                     ("s2", "t2", 1015)]
    assert {"index": 2, "side": "stream", "step": 0, "op": "join", "reason": "no_row"} in result.dropped
    assert {"index": 3, "side": "table", "step": 0, "op": "join", "reason": "late"} in result.dropped
    assert [(f["side"], f["index"]) for f in result.failures] == [("table", 4), ("stream", 3)]
    counts = result.counts[0].as_dict()
    assert counts["in"] == 4 and counts["out"] == 2 and counts["dropped"] == {"no_row": 1, "table_late": 1}


def test_over_http_latest_and_prefixes():
    table = [{"value": {"k": 1, "v": "a"}}, {"value": {"k": 1, "v": "b"}}]
    steps = parse_steps([{"op": "join", "table_records": table, "on": "k", "type": "left",
                          "prefix": {"right": "c_"}}])
    result = run_batch(steps, [{"k": 1, "x": 1}, {"k": 2, "x": 2}], MemoryContext())
    assert result.records == [{"k": 1, "x": 1, "c_k": 1, "c_v": "b"}, {"k": 2, "x": 2}]


def test_batch_counts():
    batch = BatchTableJoin(spec(type="left"))
    counts = batch.run([{"k": 1, "ts": 10}], [{"value": {"k": 1}, "timestamp": 5}])
    assert (counts.stream, counts.table, counts.pairs, counts.unmatched) == (1, 1, 1, 0)


@pytest.mark.parametrize("as_of", ["event_time", "latest"])
@pytest.mark.parametrize("ts", [True, {"a": 1}, [1], 1e308, "x", 10**30])
def test_odd_times_and_keys_over_http_are_failures_not_errors(as_of, ts):
    """Whatever JSON a client sends as times and keys, each record is answered (a
    failure with its side and index), never a server error."""
    steps = parse_steps([{"op": "join", "on": "k", "as_of": as_of, "type": "left", "table_records": [
        {"key": [1], "value": {"k": 1}, "timestamp": ts}, {"key": {"z": 1}, "value": None, "timestamp": ts},
        {"value": [1]}, 5, {"value": {"k": {"a": 1}}, "timestamp": 1}]}])
    result = run_batch(steps, [{"k": 1, "ts": ts}, {"k": [1]}, {"k": {"a": 1}, "ts": 1}], MemoryContext())
    answered = len(result.records) + sum(1 for d in result.dropped if d["side"] == "stream") + \
        sum(1 for f in result.failures if f["side"] == "stream")
    assert answered == 3
    assert {f["index"] for f in result.failures if f["side"] == "table"} >= {0, 1, 2, 3}
