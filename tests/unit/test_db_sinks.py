"""The SQLite target end to end, without Kafka (issue 21): rows and offsets in one
transaction, compare-and-set offsets, table creation, column evolution."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from app.db_sinks import (
    Batch,
    OffsetConflict,
    SinkConfigError,
    UnknownColumns,
    parse_sink,
    target_for,
)
from operators.cdc import DELETE, TRUNCATE, UPSERT, Change


def spec(tmp_path, **extra):
    raw = {"name": "replica", "source": "customers", "type": "sqlite", "path": str(tmp_path / "r.db"),
           "table": "customers", "key": ["id"], "mode": "upsert", **extra}
    return parse_sink(raw, "sinks[0]")


def rows(tmp_path, table="customers"):
    db = sqlite3.connect(tmp_path / "r.db")
    try:
        return sorted(db.execute(f"SELECT * FROM {table}").fetchall())
    finally:
        db.close()


def apply(target, *batches):
    asyncio.run(run(target, batches))


async def run(target, batches):
    await target.open()
    try:
        await target.apply(list(batches))
    finally:
        await target.close()


def test_upserts_deletes_and_truncates_replicate_and_offsets_advance(tmp_path):
    target = target_for(spec(tmp_path))
    apply(target, Batch("t", 0, 0, 2, None, [
        Change(UPSERT, (1,), {"id": 1, "name": "a"}), Change(UPSERT, (2,), {"id": 2, "name": "b"}),
        Change(UPSERT, (1,), {"id": 1, "name": "a2"})]))
    assert rows(tmp_path) == [(1, "a2"), (2, "b")]
    apply(target, Batch("t", 0, 3, 3, 3, [Change(DELETE, (2,), None)]))
    assert rows(tmp_path) == [(1, "a2")]
    apply(target, Batch("t", 0, 4, 5, 4, [Change(TRUNCATE, None, None), Change(UPSERT, (5,), {"id": 5, "name": "e"})]))
    assert rows(tmp_path) == [(5, "e")]
    assert rows(tmp_path, "streametl_sink_offsets") == [("replica", "t", 0, 6)]
    assert [r[3:5] for r in rows(tmp_path, "streametl_sink_batches")] == [(0, 2), (3, 3), (4, 5)]


def test_a_batch_applied_elsewhere_first_is_refused_and_changes_nothing(tmp_path):
    target = target_for(spec(tmp_path))
    apply(target, Batch("t", 0, 0, 0, None, [Change(UPSERT, (1,), {"id": 1, "name": "a"})]))
    with pytest.raises(OffsetConflict):  # a zombie still thinks the stored offset is 0
        apply(target, Batch("t", 0, 0, 0, None, [Change(UPSERT, (1,), {"id": 1, "name": "zombie"})]))
    with pytest.raises(OffsetConflict):
        apply(target, Batch("t", 0, 1, 1, 0, [Change(UPSERT, (1,), {"id": 1, "name": "zombie"})]))
    assert rows(tmp_path) == [(1, "a")]
    assert rows(tmp_path, "streametl_sink_offsets") == [("replica", "t", 0, 1)]


def test_a_new_field_is_refused_unless_evolve_then_added(tmp_path):
    target = target_for(spec(tmp_path))
    apply(target, Batch("t", 0, 0, 0, None, [Change(UPSERT, (1,), {"id": 1, "name": "a"})]))
    with pytest.raises(UnknownColumns) as caught:
        apply(target, Batch("t", 0, 1, 1, 1, [Change(UPSERT, (2,), {"id": 2, "name": "b", "email": "x"})]))
    assert caught.value.columns == ["email"]
    evolving = target_for(spec(tmp_path, evolve=True))
    apply(evolving, Batch("t", 0, 1, 1, 1, [Change(UPSERT, (2,), {"id": 2, "name": "b", "email": "x"})]))
    assert rows(tmp_path) == [(1, "a", None), (2, "b", "x")]


def test_append_mode_inserts_every_record(tmp_path):
    target = target_for(spec(tmp_path, mode="append", key=[]))
    apply(target, Batch("t", 1, 0, 1, None, [Change(UPSERT, None, {"w": 1, "n": 3}), Change(UPSERT, None, {"w": 1, "n": 3})]))
    assert rows(tmp_path) == [(1, 3), (1, 3)]


@pytest.mark.parametrize("bad,named", [
    ({"type": "oracle"}, "type"), ({"mode": "merge"}, "mode"), ({"table": "x; drop"}, "table"),
    ({"key": []}, "key"), ({"path": None}, "path"), ({"columns": {"a": "TEXT); DROP"}}, "columns.a"),
])
def test_bad_declarations_name_the_field(tmp_path, bad, named):
    raw = {"name": "r", "source": "s", "type": "sqlite", "path": "x.db", "table": "t", "key": ["id"], **bad}
    with pytest.raises(SinkConfigError, match=named):
        parse_sink({k: v for k, v in raw.items() if v is not None}, "sinks[0]")


def test_iso_8601_text_goes_into_postgres_time_columns_as_times():
    import datetime

    from app.db_sinks import pg_value

    utc = datetime.UTC
    assert pg_value("2026-12-06T10:00:00Z", "timestamp with time zone") == datetime.datetime(2026, 12, 6, 10, tzinfo=utc)
    assert pg_value("2026-12-06T10:00:00+02:00", "timestamp without time zone") == datetime.datetime(2026, 12, 6, 8)
    assert pg_value("2026-12-06", "date") == datetime.date(2026, 12, 6)
    with pytest.raises(ValueError):  # refused: the record goes to the dead-letter topic
        pg_value("soon", "date")
