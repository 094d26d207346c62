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


def test_the_table_does_not_depend_on_where_batches_are_cut(tmp_path):
    """A review finding (session 32): ``u{id:1,a:1,b:2}`` then ``u{id:1,a:5}`` gave
    (1, 5, NULL) in one batch and (1, 5, 2) in two (an upsert writes the fields it has;
    the batch kept only a key's last change), and a delete followed by an upsert of the
    same key in one batch lost the delete. Random sequences, once as one batch and
    once a batch per change, leave the same table: the fold."""
    import random

    from operators.cdc import fold

    rng = random.Random(11)
    for n in range(25):
        changes = []
        for _ in range(rng.randint(1, 10)):
            key = (rng.randint(1, 3),)
            if rng.random() < 0.25:
                changes.append(Change(DELETE, key, None))
            else:
                fields = rng.sample(["a", "b", "c"], rng.randint(0, 3))
                changes.append(Change(UPSERT, key, {"id": key[0], **{f: rng.randint(0, 9) for f in fields}}))
        tables = []
        for cut in ("one", "each"):
            folder = tmp_path / f"{n}-{cut}"
            folder.mkdir()
            target = target_for(spec(folder, evolve=True, columns={"id": "INTEGER", "a": "INTEGER", "b": "INTEGER",
                                                                  "c": "INTEGER"}))
            if cut == "one":
                apply(target, Batch("t", 0, 0, len(changes) - 1, None, changes))
            else:
                apply(target, *[Batch("t", 0, i, i, i or None, [c]) for i, c in enumerate(changes)])
            db = sqlite3.connect(folder / "r.db")
            tables.append(sorted(db.execute("SELECT id, a, b, c FROM customers").fetchall()))
            db.close()
        want = sorted((k[0], r.get("a"), r.get("b"), r.get("c")) for k, r in fold(changes).items())
        assert tables[0] == tables[1] == want, changes


def test_append_mode_inserts_every_record(tmp_path):
    target = target_for(spec(tmp_path, mode="append", key=[]))
    apply(target, Batch("t", 1, 0, 1, None, [Change(UPSERT, None, {"w": 1, "n": 3}), Change(UPSERT, None, {"w": 1, "n": 3})]))
    assert rows(tmp_path) == [(1, 3), (1, 3)]


@pytest.mark.parametrize("bad,named", [
    ({"type": "oracle"}, "type"), ({"mode": "merge"}, "mode"), ({"table": "x; drop"}, "table"),
    ({"key": []}, "key"), ({"path": None}, "path"), ({"columns": {"a": "TEXT); DROP"}}, "columns.a"),
    ({"type": "postgres", "dsn": "postgresql://x", "columns": {"xmin": "TEXT"}}, "system column"),
])
def test_bad_declarations_name_the_field(tmp_path, bad, named):
    raw = {"name": "r", "source": "s", "type": "sqlite", "path": "x.db", "table": "t", "key": ["id"], **bad}
    with pytest.raises(SinkConfigError, match=named):
        parse_sink({k: v for k, v in raw.items() if v is not None}, "sinks[0]")


def test_postgres_values_fit_their_column_or_are_refused_never_converted_to_something_else():
    from app.db_sinks import pg_value

    assert pg_value("42", "bigint") == 42 and pg_value(7.0, "bigint") == 7
    assert pg_value("false", "boolean") is False and pg_value(1, "boolean") is True
    for value, column in [(10.5, "bigint"), (True, "bigint"), ("maybe", "boolean"), ("abc", "integer")]:
        with pytest.raises(ValueError):  # refused: the record goes to the dead-letter topic
            pg_value(value, column)
    # Time types go as text, cast by PostgreSQL (ISO 8601, 'infinity', zone names).
    assert pg_value("2026-12-06 10:00:00 UTC", "timestamp with time zone") == "2026-12-06 10:00:00 UTC"
    assert pg_value(1700000000, "date") == "1700000000"  # refused there, with PostgreSQL's message


def test_postgres_numeric_and_json_values_are_written_exactly():
    """Review findings (session 32): a NUMERIC value went through a float (0.1 stored
    as 0.1000000000000000055…, 12345678901234567 as …568), and a JSON column got the
    text of a string (``"123"`` stored as the number 123, ``"abc"`` refused)."""
    from decimal import Decimal

    from app.db_sinks import pg_value, plan_batch

    assert pg_value(12345678901234567, "numeric") == 12345678901234567
    assert pg_value(0.1, "numeric") == Decimal("0.1") and pg_value("12.34", "numeric") == Decimal("12.34")
    for bad in (True, "abc", {"a": 1}):
        with pytest.raises(ValueError):
            pg_value(bad, "numeric")
    for huge in ("1e140000", "1e-20000"):
        with pytest.raises(ValueError):  # asyncpg would wrap its weight (stored as 0)
            pg_value(huge, "numeric")
    assert pg_value(0.5, "double precision") == 0.5
    assert pg_value("123", "jsonb") == '"123"' and pg_value("abc", "json") == '"abc"'
    assert pg_value({"a": [1]}, "jsonb") == '{"a":[1]}' and pg_value(7, "jsonb") == "7"
    spec = parse_sink({"name": "r", "source": "s", "type": "postgres", "dsn": "postgresql://x", "table": "t",
                       "key": ["id"]}, "sinks[0]")
    plan = plan_batch(spec, [Change(UPSERT, (1,), {"id": 1, "doc": {"a": 1}, "s": "123"})], ["id", "doc", "s"],
                      "postgres", {})
    assert plan.steps[0][2] == [(1, {"a": 1}, "123")]  # made per column type by pg_value


def test_a_postgres_record_refused_for_its_value_is_not_merged_into_a_later_one():
    """A review finding on the merge (session 32): ``u{id:1,a:"bad",b:2}`` then
    ``u{id:1,a:5}`` (bigint columns) merged into the row (1, 5, 2), which passed; one
    change per batch refuses the first (dead-lettered) and leaves (1, 5, NULL). Each
    record's values are checked before the merge, so the batch is refused and the
    halving finds the record."""
    import contextlib

    from app.db_sinks import PostgresTarget, refused_by_database

    class Conn:
        written: list = []

        def transaction(self):
            return contextlib.AsyncExitStack()

        async def execute(self, sql, *args):
            return "INSERT 0 1"

        async def executemany(self, sql, params):
            self.written.extend(params)

    pg = parse_sink({"name": "r", "source": "s", "type": "postgres", "dsn": "postgresql://x", "table": "t",
                     "key": ["id"]}, "sinks[0]")
    target = PostgresTarget(pg)
    target._conn, target.columns = Conn(), {"id": "bigint", "a": "bigint", "b": "bigint"}
    batch = Batch("t", 0, 0, 1, None, [Change(UPSERT, (1,), {"id": 1, "a": "bad", "b": 2}),
                                       Change(UPSERT, (1,), {"id": 1, "a": 5})])
    with pytest.raises(ValueError) as refused:
        asyncio.run(target.apply([batch]))
    assert refused_by_database(refused.value) and Conn.written == []


def test_a_row_sqlite_can_never_take_is_refused_and_a_locked_database_retried():
    """A review finding (session 32): a record past SQLite's 2,000 columns was retried
    for ever (every OperationalError counted as the database being away)."""
    from app.db_sinks import refused_by_database

    assert refused_by_database(sqlite3.OperationalError("too many columns on customers"))
    assert not refused_by_database(sqlite3.OperationalError("database is locked"))
    assert not refused_by_database(OffsetConflict("applied elsewhere"))


def test_a_null_key_is_refused_not_written_as_a_row(tmp_path):
    """A review finding (session 32): SQLite takes NULL in a text primary key and NULLs
    never conflict, so each batch added one more row of a null key."""
    from operators.cdc import ChangeError, parse_change, plain_change

    for make in (lambda: plain_change(b'{"id": null, "n": 1}', ["id"]),
                 lambda: parse_change(b'{"id": null}', None, ["id"]),
                 lambda: parse_change(None, {"op": "c", "after": {"id": None, "n": 1}}, ["id"])):
        with pytest.raises(ChangeError) as refused:
            make()
        assert refused.value.reason == "missing_key"


def test_postgres_casts_text_for_the_types_it_parses_itself():
    from app.db_sinks import plan_batch

    spec = parse_sink({"name": "r", "source": "s", "type": "postgres", "dsn": "postgresql://x", "table": "t",
                       "key": ["id"]}, "sinks[0]")
    plan = plan_batch(spec, [Change(UPSERT, (1,), {"id": 1, "seen": "2026-12-06"})], ["id", "seen"], "postgres",
                      {"seen": "date"})
    assert plan.steps[0][0].startswith('INSERT INTO "t" ("id", "seen") VALUES ($1, $2::text::date)')


def test_field_names_that_cannot_be_columns():
    from app.db_sinks import bad_column_names

    assert bad_column_names(["Amount", "note", "NOTE", ""], ["amount"], "sqlite") == ["Amount", "NOTE", ""]
    assert bad_column_names(["Amount", "x" * 64, "xmin", "ok"], ["amount"], "postgres") == ["x" * 64, "xmin"]


def test_a_dead_connection_is_dropped_when_it_will_not_close():
    from app.db_sinks import PostgresTarget

    class Conn:
        terminated = False

        async def close(self, timeout=None):
            raise TimeoutError

        def terminate(self):
            Conn.terminated = True

    target = PostgresTarget(parse_sink({"name": "r", "source": "s", "type": "postgres", "dsn": "postgresql://x",
                                        "table": "t", "key": ["id"]}, "sinks[0]"))
    target._conn = Conn()
    asyncio.run(target.close())
    assert Conn.terminated and target._conn is None
