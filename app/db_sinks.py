"""Database sinks: their declaration and the two databases they write to.

A sink replicates a topic into a table, exactly once in effect: each batch's rows and
the offsets it consumed commit in one database transaction, and a sink resumes from the
offsets stored there (Kafka Connect's JDBC sink and Flink's two-phase sinks keep the same
rule). The offset update is a compare-and-set on the offset the batch started from, so
a worker that lost its partitions in a rebalance (or a zombie) cannot apply a batch the
new owner has already applied: its transaction changes no offset row and is rolled back.
Every applied batch also leaves a row in ``streametl_sink_batches`` (partition, first
and last offset), an audit trail in which a gap or an overlap would show.

- ``mode: upsert`` replicates changes: insert or update by ``key``, delete on deletes,
  empty the table on a truncate. Within a batch only each key's last change is written.
- ``mode: append`` inserts every record (window results, alerts, joins).

SQLite (stdlib ``sqlite3``, in a thread) needs no server; PostgreSQL comes through
``asyncpg``. A missing table is created from the declared ``columns`` or the first rows;
a new field in the stream is added as a column when ``evolve: true``, otherwise the
record goes to the dead-letter topic (:class:`UnknownColumns`). A write the database
refuses for what it writes (``refused_by_database``) sends its record there too; any
other failure (the database away, locked, restarting) is retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from operators.cdc import DELETE, TRUNCATE, Change, last_per_key

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: ``table``: a materialized table, kept by every worker in a local SQLite file and read
#: over HTTP (``GET /api/v1/tables/{name}/{key}``); the others write to a database.
TYPES = ("postgres", "sqlite", "table")
MODES = ("upsert", "append")
FORMATS = ("debezium", "json")
OFFSETS_TABLE = "streametl_sink_offsets"
#: Seconds a PostgreSQL statement may take: a batch is at most 5,000 rows, but a
#: truncate deletes the whole table; past this the connection is taken for half-open.
COMMAND_TIMEOUT = 600.0
BATCHES_TABLE = "streametl_sink_batches"


class SinkConfigError(ValueError):
    """A ``sinks:`` entry (or a pipeline's database sink) is invalid."""


class UnknownColumns(ValueError):
    """Rows carry fields the table has no column for, and ``evolve`` is off."""

    def __init__(self, columns: Sequence[str]) -> None:
        super().__init__(f"no column for field(s) {', '.join(columns)} (set evolve: true to add them)")
        self.columns = list(columns)


class OffsetConflict(RuntimeError):
    """Another consumer applied this partition's batch first (a rebalance or a zombie)."""


class BadColumnName(ValueError):
    """A field's name cannot be a column of its own: empty; in PostgreSQL longer than it
    keeps a column name (63 bytes: it would be cut) or a system column's (``xmin``...);
    in SQLite another column's but for case (SQLite's names ignore case)."""


PG_SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"})


def bad_column_names(names: Iterable[str], existing: Iterable[str], dialect: str) -> list[str]:
    """Those of ``names`` (fields about to become columns) that cannot (see
    :class:`BadColumnName`)."""
    bad, seen = [], {c.lower() for c in existing} if dialect == "sqlite" else set()
    for name in names:
        if not name or "\x00" in name:
            bad.append(name)
        elif dialect == "postgres" and (len(name.encode()) > 63 or name in PG_SYSTEM_COLUMNS):
            bad.append(name)
        elif dialect == "sqlite":
            if name.lower() in seen:
                bad.append(name)
            seen.add(name.lower())
    return bad


#: PostgreSQL's SQLSTATE classes of a statement refused for its values: data exception
#: (a value of the wrong type or range), integrity constraint violation (not null,
#: unique, check), program limit exceeded (a row too large).
PG_REFUSED_CLASSES = ("22", "23", "54")
#: ... except a foreign key violation: the row it refers to may come later (another
#: partition, another sink), so it is retried.
PG_RETRIED = ("23503",)


def refused_by_database(exc: BaseException) -> bool:
    """Whether a write failed for what it writes (a value, a key, a constraint), so that
    writing it again fails again: its records go to the dead-letter topic. Anything
    else (the database away, locked, restarting, a permission) is retried."""
    if isinstance(exc, sqlite3.OperationalError):
        # Retried (locked, busy, disk I/O), except a row SQLite can never take.
        return str(exc).startswith("too many columns")
    if isinstance(exc, OffsetConflict):
        return False
    if isinstance(exc, (ValueError, TypeError, OverflowError, sqlite3.IntegrityError, sqlite3.DataError)):
        return True  # includes asyncpg's refusal of an argument (a ValueError)
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in PG_REFUSED_CLASSES and sqlstate not in PG_RETRIED


def refusal_reason(exc: BaseException) -> str:
    """The ``dlq.reason`` of a record refused by ``exc``."""
    if isinstance(exc, UnknownColumns):
        return "unknown_column"
    if isinstance(exc, BadColumnName):
        return "bad_column_name"
    return "refused_by_database"


@dataclass(frozen=True)
class SinkSpec:
    name: str
    source: str
    type: str
    table: str
    key: tuple[str, ...]
    mode: str = "upsert"
    format: str = "json"
    dsn: str | None = None
    path: str | None = None
    evolve: bool = False
    columns: Mapping[str, str] = field(default_factory=dict)


def _identifier(value: Any, where: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise SinkConfigError(f"{where}: must be a SQL identifier (letters, digits, _), not {value!r}")
    return value


def parse_sink(raw: Any, where: str, *, name: str | None = None, source: str | None = None) -> SinkSpec:
    """One sink declaration: a ``sinks:`` entry, or a pipeline's ``sink:`` mapping
    (then ``name`` and ``source`` come from the pipeline)."""
    if not isinstance(raw, Mapping):
        raise SinkConfigError(f"{where}: must be a mapping")
    allowed = {"name", "source", "type", "table", "key", "mode", "format", "dsn", "path", "evolve", "columns"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SinkConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {sorted(allowed)}")
    name = name or raw.get("name")
    source = source or raw.get("source")
    if not isinstance(name, str) or not name:
        raise SinkConfigError(f"{where}.name: required")
    if not isinstance(source, str) or not source:
        raise SinkConfigError(f"{where}.source: required (a topic)")
    kind = raw.get("type")
    if kind not in TYPES:
        raise SinkConfigError(f"{where}.type: must be one of {', '.join(TYPES)}")
    mode = raw.get("mode", "upsert")
    if mode not in MODES:
        raise SinkConfigError(f"{where}.mode: must be one of {', '.join(MODES)}")
    fmt = raw.get("format", "json")
    if fmt not in FORMATS:
        raise SinkConfigError(f"{where}.format: must be one of {', '.join(FORMATS)}")
    key = raw.get("key", [])
    key = [key] if isinstance(key, str) else key
    if not isinstance(key, list):
        raise SinkConfigError(f"{where}.key: a column name or a list of them")
    key = tuple(_identifier(k, f"{where}.key") for k in key)
    if mode == "upsert" and not key:
        raise SinkConfigError(f"{where}.key: mode upsert needs the key column(s)")
    columns = raw.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise SinkConfigError(f"{where}.columns: a mapping of column name to SQL type")
    for column, sql_type in columns.items():
        _identifier(column, f"{where}.columns")
        if not isinstance(sql_type, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9 ()_,]*", sql_type):
            raise SinkConfigError(f"{where}.columns.{column}: not a SQL type: {sql_type!r}")
    if kind == "postgres" and not isinstance(raw.get("dsn"), str):
        raise SinkConfigError(f"{where}.dsn: required for a postgres sink")
    if kind == "postgres" and PG_SYSTEM_COLUMNS & {*key, *columns}:
        raise SinkConfigError(f"{where}.columns: {sorted(PG_SYSTEM_COLUMNS & {*key, *columns})[0]} is a "
                              "PostgreSQL system column's name")
    if kind == "sqlite" and not isinstance(raw.get("path"), str):
        raise SinkConfigError(f"{where}.path: required for a sqlite sink")
    if kind == "table":
        if mode != "upsert":
            raise SinkConfigError(f"{where}.mode: a materialized table is upsert")
        if not IDENTIFIER.fullmatch(name):
            raise SinkConfigError(f"{where}.name: a materialized table's name must be a SQL identifier")
    table = raw.get("table", name) if kind == "table" else raw.get("table")
    return SinkSpec(name=name, source=source, type=kind, table=_identifier(table, f"{where}.table"),
                    key=key, mode=mode, format=fmt, dsn=raw.get("dsn"), path=raw.get("path"),
                    evolve=bool(raw.get("evolve", False)), columns=dict(columns))


def parse_sinks(raw: Any) -> list[SinkSpec]:
    """The ``sinks:`` section."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SinkConfigError("sinks: must be a list of sink entries")
    specs = [parse_sink(entry, f"sinks[{i}]") for i, entry in enumerate(raw)]
    names = [s.name for s in specs]
    for n in names:
        if names.count(n) > 1:
            raise SinkConfigError(f"sinks: the name {n!r} is used twice")
    return specs


# --- SQL (pure) ----------------------------------------------------------------------

def quote(identifier: str) -> str:
    """A column or table name in SQL: field names come from the stream, so a double
    quote in one is doubled (SQL's escape, in both databases)."""
    return '"' + identifier.replace('"', '""') + '"'


def sql_type(value: Any, dialect: str) -> str:
    """The column type a first value suggests."""
    if isinstance(value, bool):
        return "BOOLEAN" if dialect == "postgres" else "INTEGER"
    if isinstance(value, int):
        return "BIGINT" if dialect == "postgres" else "INTEGER"
    if isinstance(value, float):
        return "DOUBLE PRECISION" if dialect == "postgres" else "REAL"
    if isinstance(value, (dict, list)):
        return "JSONB" if dialect == "postgres" else "TEXT"
    return "TEXT"


def column_value(value: Any) -> Any:
    """A row value as the database driver takes it (objects and lists as JSON text)."""
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return value


@dataclass
class Plan:
    """What one batch does to the table, in order: each step is (sql, the columns its
    parameters go to, [params...])."""

    steps: list[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]] = field(default_factory=list)
    rows: int = 0


def plan_batch(spec: SinkSpec, changes: Sequence[Change], columns: Sequence[str], dialect: str,
               casts: Mapping[str, str] | None = None) -> Plan:
    """The statements that apply ``changes`` (already limited to known columns);
    ``casts``: the PostgreSQL type a column's text is cast to."""
    casts = casts or {}

    def ph(i: int, column: str) -> str:
        if dialect != "postgres":
            return "?"
        cast = casts.get(column)
        return f"${i}::text::{cast}" if cast else f"${i}"

    table = quote(spec.table)
    plan = Plan()
    if spec.mode == "append":
        changes = [c for c in changes if c.row is not None]
    else:
        changes = last_per_key(changes)
    upserts: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    deletes: list[tuple[Any, ...]] = []

    def flush() -> None:
        # Deletes first: a key's delete in ``last_per_key`` is its last change or comes
        # before its upsert (the row started anew).
        if deletes:
            where = " AND ".join(f"{quote(k)} = {ph(i + 1, k)}" for i, k in enumerate(spec.key))
            plan.steps.append((f"DELETE FROM {table} WHERE {where}", spec.key, list(deletes)))
        for cols, params in upserts.items():
            names = ", ".join(quote(c) for c in cols)
            values = ", ".join(ph(i + 1, c) for i, c in enumerate(cols))
            sql = f"INSERT INTO {table} ({names}) VALUES ({values})"
            if spec.mode == "upsert":
                updates = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in cols if c not in spec.key)
                conflict = ", ".join(quote(k) for k in spec.key)
                sql += f" ON CONFLICT ({conflict}) " + (f"DO UPDATE SET {updates}" if updates else "DO NOTHING")
            plan.steps.append((sql, cols, params))
        upserts.clear()
        deletes.clear()

    # PostgreSQL's values are made per column type (``pg_value``): a JSON column needs
    # the value itself, not objects already turned into text.
    made = (lambda v: v) if dialect == "postgres" else column_value
    for change in changes:
        if change.op == TRUNCATE:
            flush()
            plan.steps.append((f"DELETE FROM {table}", (), [()]))
        elif change.op == DELETE:
            deletes.append(tuple(change.key or ()))
        else:
            row = change.row or {}
            cols = tuple(c for c in columns if c in row)
            upserts.setdefault(cols, []).append(tuple(made(row[c]) for c in cols))
        plan.rows += 1
    flush()
    return plan


def create_table_sql(spec: SinkSpec, columns: Mapping[str, str]) -> str:
    cols = ", ".join(f"{quote(c)} {t}" for c, t in columns.items())
    key = f", PRIMARY KEY ({', '.join(quote(k) for k in spec.key)})" if spec.key and spec.mode == "upsert" else ""
    return f"CREATE TABLE IF NOT EXISTS {quote(spec.table)} ({cols}{key})"


def needed_columns(spec: SinkSpec, changes: Iterable[Change], dialect: str) -> dict[str, str]:
    """Every field the batch's rows (and keys) carry, with a type from its first value."""
    found: dict[str, str] = {k: spec.columns.get(k, "TEXT") for k in spec.key}
    for change in changes:
        for name, value in (change.row or {}).items():
            if name not in found or (found[name] == "TEXT" and value is not None and name not in spec.columns):
                found[name] = spec.columns.get(name) or sql_type(value, dialect)
    for name, declared in spec.columns.items():
        found.setdefault(name, declared)
    return found


# --- the databases -------------------------------------------------------------------

@dataclass
class Batch:
    """One partition's slice of a consumed batch: its changes, its offsets, and the
    next offset the stored one must equal (compare-and-set)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    expected_next: int | None
    changes: list[Change]


class Target:
    """One database table plus the sink's offset and audit tables."""

    dialect = ""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.columns: dict[str, str] = {}

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def reload_columns(self) -> None:
        """Read the table's columns again (someone may have changed them)."""

    async def ensure_table(self, batches: Sequence[Batch]) -> None:
        """Create the table, or add the columns ``evolve`` allows, for every row of
        ``batches`` (in a transaction of its own): the halving that looks for refused
        records then writes each part into the table the whole batch would have made."""
        # Rows with a field that cannot be a column are left to the halving.
        columns = self.columns
        fine = [dataclasses.replace(b, changes=[
                    c for c in b.changes
                    if not bad_column_names([f for f in c.row or () if f not in columns], columns, self.dialect)])
                for b in batches]
        try:
            ddl, _ = self.prepare(fine)
        except ValueError:  # UnknownColumns, BadColumnName (names that clash between rows)
            return
        if not ddl:
            return
        try:
            await self._execute_ddl(ddl)
        except Exception as exc:
            if not refused_by_database(exc):
                raise  # the database is away: retried
            # Refused (too many columns...): the halving finds the rows that ask for it.

    async def _execute_ddl(self, ddl: list[str]) -> None: ...
    async def read_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]: ...
    async def apply(self, batches: Sequence[Batch]) -> None: ...

    def prepare(self, batches: Sequence[Batch]) -> tuple[list[str], list[str]]:
        """DDL the batch needs (create or add columns); UnknownColumns when it needs
        columns that evolve does not allow."""
        changes = [c for b in batches for c in b.changes]
        ddl: list[str] = []
        if not self.columns and not any(c.row for c in changes):
            return ddl, []  # no table and no row to make one from: deletes are no-ops
        needed = needed_columns(self.spec, changes, self.dialect)
        bad = bad_column_names([c for c in needed if c not in self.columns], self.columns, self.dialect)
        if bad:
            raise BadColumnName(f"field name that cannot be a column: {bad[0][:80]!r}")
        if not self.columns:
            self.columns = dict(needed)
            ddl.append(create_table_sql(self.spec, self.columns))
            return ddl, []
        # A declared column no row carries is not needed by this batch.
        carried = {name for c in changes for name in (c.row or ())} | set(self.spec.key)
        new = [c for c in needed if c not in self.columns and c in carried]
        if new and not self.spec.evolve:
            raise UnknownColumns(new)
        for column in new:
            self.columns[column] = needed[column]
            ddl.append(f"ALTER TABLE {quote(self.spec.table)} ADD COLUMN {quote(column)} {needed[column]}")
        return ddl, new


BOOKKEEPING = [
    f"CREATE TABLE IF NOT EXISTS {OFFSETS_TABLE} (sink TEXT NOT NULL, topic TEXT NOT NULL, "
    "partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, PRIMARY KEY (sink, topic, partition))",
    f"CREATE TABLE IF NOT EXISTS {BATCHES_TABLE} (sink TEXT NOT NULL, topic TEXT NOT NULL, "
    "partition INTEGER NOT NULL, first_offset BIGINT NOT NULL, last_offset BIGINT NOT NULL, "
    "records INTEGER NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
]


class SqliteTarget(Target):
    dialect = "sqlite"

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _run(self, fn: Any) -> Any:
        with self._lock:
            return fn(self._db)

    async def open(self) -> None:
        def connect() -> None:
            if self.spec.path:
                Path(self.spec.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.spec.path or ":memory:", timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            for ddl in BOOKKEEPING:
                self._db.execute(ddl)
            self.columns = self._table_columns(self._db)
        await asyncio.to_thread(connect)

    def _table_columns(self, db: sqlite3.Connection) -> dict[str, str]:
        info = db.execute(f"PRAGMA table_info({quote(self.spec.table)})").fetchall()
        return {row[1]: row[2] for row in info}

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.to_thread(self._run, lambda db: db.close())
            self._db = None

    async def reload_columns(self) -> None:
        if self._db is not None:
            self.columns = await asyncio.to_thread(self._run, self._table_columns)

    async def get(self, key: Sequence[Any]) -> dict[str, Any] | None:
        """The row with this key, or None."""
        if self._db is None or not self.columns:
            return None
        where = " AND ".join(f"{quote(k)} = ?" for k in self.spec.key)
        sql = f"SELECT * FROM {quote(self.spec.table)} WHERE {where}"
        rows = await asyncio.to_thread(self._run, lambda db: _dicts(db.execute(sql, tuple(key))))
        return rows[0] if rows else None

    async def scan(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows whose first key column starts with ``prefix``, in key order."""
        if self._db is None or not self.columns:
            return []
        first = quote(self.spec.key[0])
        order = ", ".join(quote(k) for k in self.spec.key)
        sql = (f"SELECT * FROM {quote(self.spec.table)} WHERE substr(CAST({first} AS TEXT), 1, ?) = ? "
               f"ORDER BY {order} LIMIT ?")
        return await asyncio.to_thread(self._run, lambda db: _dicts(db.execute(sql, (len(prefix), prefix, limit))))

    async def read_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        wanted = set(partitions)
        rows = await asyncio.to_thread(self._run, lambda db: db.execute(
            f"SELECT partition, next_offset FROM {OFFSETS_TABLE} WHERE sink = ? AND topic = ?",
            (self.spec.name, topic)).fetchall())
        return {p: n for p, n in rows if p in wanted}

    async def apply(self, batches: Sequence[Batch]) -> None:
        ddl, _ = self.prepare(batches)
        await asyncio.to_thread(self._run, lambda db: self._apply(db, ddl, batches))

    async def _execute_ddl(self, ddl: list[str]) -> None:
        await asyncio.to_thread(self._run, lambda db: self._apply(db, ddl, ()))

    def _apply(self, db: sqlite3.Connection, ddl: list[str], batches: Sequence[Batch]) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in ddl:
                db.execute(statement)
            for batch in batches:
                claim_sqlite(db, self.spec.name, batch)
                if not self.columns:
                    continue
                plan = plan_batch(self.spec, batch.changes, list(self.columns), self.dialect)
                for sql, _, params in plan.steps:
                    db.executemany(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            if ddl:
                self.columns = self._table_columns(db)  # read again: the DDL did not happen
            raise


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def claim_sqlite(db: sqlite3.Connection, sink: str, batch: Batch) -> None:
    """Compare-and-set the partition's stored offset; OffsetConflict when it moved."""
    new = batch.last_offset + 1
    if batch.expected_next is None:
        cur = db.execute(f"INSERT INTO {OFFSETS_TABLE} (sink, topic, partition, next_offset) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT DO NOTHING", (sink, batch.topic, batch.partition, new))
    else:
        cur = db.execute(f"UPDATE {OFFSETS_TABLE} SET next_offset = ? WHERE sink = ? AND topic = ? "
                         "AND partition = ? AND next_offset = ?",
                         (new, sink, batch.topic, batch.partition, batch.expected_next))
    if cur.rowcount != 1:
        raise OffsetConflict(f"{batch.topic}[{batch.partition}] was applied past {batch.expected_next} elsewhere")
    db.execute(f"INSERT INTO {BATCHES_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
               (sink, batch.topic, batch.partition, batch.first_offset, batch.last_offset,
                len(batch.changes), time.time()))


class PostgresTarget(Target):
    dialect = "postgres"

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self._conn: Any = None

    async def open(self) -> None:
        import asyncpg

        # A statement that hangs (a half-open connection, a lock held elsewhere) fails
        # after COMMAND_TIMEOUT and is retried on a new connection.
        self._conn = await asyncpg.connect(self.spec.dsn, timeout=10, command_timeout=COMMAND_TIMEOUT)
        for ddl in BOOKKEEPING:
            await self._conn.execute(ddl)
        self.columns = await self._read_columns()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=5)
            except Exception:  # a dead or half-open connection: dropped without a goodbye
                conn.terminate()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def read_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        rows = await self._conn.fetch(
            f"SELECT partition, next_offset FROM {OFFSETS_TABLE} WHERE sink = $1 AND topic = $2 "
            "AND partition = ANY($3::int[])", self.spec.name, topic, list(partitions))
        return {r["partition"]: r["next_offset"] for r in rows}

    async def apply(self, batches: Sequence[Batch]) -> None:
        ddl, _ = self.prepare(batches)
        try:
            async with self._conn.transaction():
                if ddl:
                    await self._alter(ddl)
                casts = {c: t for c, t in self.columns.items() if t.lower() in TEXT_CAST_TYPES}
                for batch in batches:
                    await self._claim(batch)
                    if not self.columns:
                        continue
                    # Each record's values are checked against their columns before a
                    # key's upserts are merged (``last_per_key``): a refused record must
                    # be found by the halving and dead-lettered, not merged into a row
                    # that passes.
                    for change in batch.changes:
                        for c, v in (change.row or {}).items():
                            pg_value(v, self.columns.get(c, "text").lower())
                    plan = plan_batch(self.spec, batch.changes, list(self.columns), self.dialect, casts)
                    for sql, cols, params in plan.steps:
                        types = [self.columns.get(c, "text").lower() for c in cols]
                        await self._conn.executemany(sql, [[pg_value(v, t) for v, t in zip(p, types, strict=True)]
                                                           for p in params])
        except BaseException:
            if ddl:
                await self.reload_columns()
            raise

    async def reload_columns(self) -> None:
        self.columns = {}
        if self.connected:
            self.columns = await self._read_columns()

    async def _read_columns(self) -> dict[str, str]:
        rows = await self._conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1 "
            "AND table_schema = current_schema() ORDER BY ordinal_position", self.spec.table)
        return {r["column_name"]: r["data_type"] for r in rows}

    async def _alter(self, ddl: list[str]) -> None:
        """Run ``ddl`` in the open transaction, then take the columns' types as
        PostgreSQL names them (a declared "BIGINT NOT NULL" is "bigint"): pg_value
        converts by them."""
        for statement in ddl:
            await self._conn.execute(statement)
        self.columns = await self._read_columns()

    async def _execute_ddl(self, ddl: list[str]) -> None:
        try:
            async with self._conn.transaction():
                await self._alter(ddl)
        except BaseException:
            await self.reload_columns()
            raise

    async def _claim(self, batch: Batch) -> None:
        new = batch.last_offset + 1
        if batch.expected_next is None:
            status = await self._conn.execute(
                f"INSERT INTO {OFFSETS_TABLE} (sink, topic, partition, next_offset) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING", self.spec.name, batch.topic, batch.partition, new)
        else:
            status = await self._conn.execute(
                f"UPDATE {OFFSETS_TABLE} SET next_offset = $1 WHERE sink = $2 AND topic = $3 "
                "AND partition = $4 AND next_offset = $5",
                new, self.spec.name, batch.topic, batch.partition, batch.expected_next)
        if not status.endswith(" 1"):
            raise OffsetConflict(f"{batch.topic}[{batch.partition}] was applied past {batch.expected_next} elsewhere")
        await self._conn.execute(
            f"INSERT INTO {BATCHES_TABLE} VALUES ($1, $2, $3, $4, $5, $6, $7)", self.spec.name, batch.topic,
            batch.partition, batch.first_offset, batch.last_offset, len(batch.changes), time.time())


def pg_value(value: Any, column_type: str) -> Any:
    """A value as asyncpg takes it for a column of this type: asyncpg checks Python
    types strictly (an int into a text column is refused), a JSON stream is not. A value
    that does not fit the type raises ValueError (the record is refused), never one
    converted to something else."""
    if value is None:
        return None
    if column_type in {"jsonb", "json"}:
        return orjson.dumps(value).decode()  # a string stays a JSON string ("123" is not 123)
    if column_type in {"text", "character varying"} or column_type.startswith(("varchar", "char")):
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if column_type in {"bigint", "integer", "smallint", "int", "int4", "int8"}:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    if column_type == "numeric" or column_type.startswith(("numeric", "decimal")):
        # Exact: from the value's text (a float would carry its binary error: 0.1 as
        # 0.1000000000000000055…, 12345678901234567 as …568).
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"not a number: {value!r}")
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        if number.is_finite() and not -NUMERIC_SCALE_DIGITS <= number.adjusted() < NUMERIC_DIGITS:
            # Past what a numeric holds (asyncpg would wrap the weight, not refuse it).
            raise ValueError(f"out of numeric's range: {value!r}")
        return number
    if column_type in {"double precision", "real", "float8", "float4"}:
        if isinstance(value, bool):
            raise ValueError(f"not a number: {value!r}")
        return float(value)
    if column_type == "boolean":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[word]
        raise ValueError(f"not a boolean: {value!r}")
    if column_type in TEXT_CAST_TYPES:
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    return column_value(value)


#: A PostgreSQL numeric's digits before and after the decimal point, at most.
NUMERIC_DIGITS, NUMERIC_SCALE_DIGITS = 131072, 16383

BOOLEAN_WORDS = {"true": True, "t": True, "yes": True, "y": True, "on": True, "1": True,
                 "false": False, "f": False, "no": False, "n": False, "off": False, "0": False}

#: Column types (as information_schema names them) whose values go to PostgreSQL as
#: text, cast there (``$1::text::date``): it parses them by its own rules (ISO 8601,
#: ``infinity``, time zone names...), which asyncpg's codecs, taking only Python
#: objects, do not.
TEXT_CAST_TYPES = frozenset({
    "date", "time without time zone", "time with time zone", "timestamp without time zone",
    "timestamp with time zone", "interval", "bytea", "uuid", "inet", "cidr", "macaddr", "money",
})


def target_for(spec: SinkSpec) -> Target:
    """The database a sink writes to (a materialized table's spec carries its local path)."""
    return PostgresTarget(spec) if spec.type == "postgres" else SqliteTarget(spec)


__all__ = ["BadColumnName", "Batch", "OffsetConflict", "PostgresTarget", "SinkConfigError", "SinkSpec", "SqliteTarget", "Target",
           "UnknownColumns", "parse_sink", "parse_sinks", "plan_batch", "refusal_reason", "refused_by_database",
           "target_for"]
