"""Debezium-style change events into change records (pure: no Kafka, no database).

A change event is a JSON envelope, with or without Debezium's ``schema``/``payload``
wrapper, carrying ``op`` (``c`` create, ``u`` update, ``d`` delete, ``r`` snapshot
read, ``t`` truncate), ``before``, ``after`` and ``source`` (``ts_ms``, and ``lsn`` or
another position). A tombstone (a null value, which Debezium sends after a delete so
that compaction can drop the key) is a delete of the message key's row.

What a replica does with each: ``c``/``u``/``r`` upsert ``after`` by its key, ``d`` and
tombstones delete the key, ``t`` empties the table.

A pipeline's ``cdc`` step (operators/steps.py) reads its input with ``parse_change`` and
writes each change on as a Debezium-style envelope (``envelope``), keyed by its primary
key (``message_key``), so a database sink, a materialized table or another pipeline
reads the output as it reads Debezium's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

UPSERT, DELETE, TRUNCATE = "upsert", "delete", "truncate"
_OPS = {"c": UPSERT, "u": UPSERT, "r": UPSERT, "d": DELETE, "t": TRUNCATE}


class ChangeError(ValueError):
    """A record that is not a usable change event; ``reason`` names why (dead letter)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Change:
    """One change to apply: ``op`` is UPSERT, DELETE or TRUNCATE; ``key`` the primary
    key values in the order of the key fields (None for a truncate); ``row`` the new row
    (upserts only); ``ts_ms`` the source's event time, when it says. ``fields`` names
    the key fields and ``source_op`` is the event's own op letter (``c``, ``u``, ``r``,
    ``d``, ``t``; ``d`` for a tombstone): what a pipeline writes on (not compared)."""

    op: str
    key: tuple[Any, ...] | None
    row: dict[str, Any] | None
    ts_ms: int | None = None
    fields: tuple[str, ...] = field(default=(), compare=False)
    source_op: str = field(default="", compare=False)


def _json(raw: bytes | Mapping[str, Any] | None, what: str) -> Any:
    if raw is None or isinstance(raw, Mapping):
        return raw
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return raw  # already decoded (POST /api/v1/process gives JSON values)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ChangeError("invalid_json", f"{what} is not JSON: {exc}") from None


def _unwrap(value: Any) -> Any:
    """Debezium's JSON converter with schemas on wraps everything in schema/payload."""
    if isinstance(value, Mapping) and "payload" in value and "schema" in value:
        return value["payload"]
    return value


def key_of(row: Mapping[str, Any], key_fields: Sequence[str], what: str) -> tuple[Any, ...]:
    try:
        key = tuple(row[f] for f in key_fields)
    except KeyError as exc:
        raise ChangeError("missing_key", f"{what} has no key field {exc.args[0]!r}") from None
    if None in key:
        # A null key names no row: SQLite would add one per batch (NULLs never conflict).
        raise ChangeError("missing_key", f"{what} has a null key field: {list(key_fields)}")
    return key


def _key_fields(message_key: Any, key_fields: Sequence[str] | None, what: str) -> tuple[str, ...]:
    """The key fields: those named, else the fields of the message key (a JSON object,
    as Debezium keys its messages by the primary key)."""
    if key_fields is not None:
        return tuple(key_fields)
    if isinstance(message_key, Mapping) and message_key:
        return tuple(message_key)
    raise ChangeError("missing_key", f"{what} needs its key: name the key fields (key: [...]) "
                                     "or key the message by a JSON object")


def parse_change(key: bytes | Mapping[str, Any] | None, value: bytes | Mapping[str, Any] | None,
                 key_fields: Sequence[str] | None) -> Change:
    """The change a Debezium record (message key and value) makes; ChangeError when the
    record cannot be one. ``key_fields`` None: the message key's fields are the key."""
    envelope = _unwrap(_json(value, "value"))
    if envelope is None:  # tombstone: the message key names the deleted row
        message_key = _unwrap(_json(key, "key"))
        if not isinstance(message_key, Mapping):
            raise ChangeError("missing_key", "a tombstone needs a JSON object key to name its row")
        fields = _key_fields(message_key, key_fields, "a tombstone")
        return Change(DELETE, key_of(message_key, fields, "the tombstone's key"), None, None, fields, "d")
    if not isinstance(envelope, Mapping):
        raise ChangeError("not_an_envelope", "a change event must be a JSON object")
    letter = envelope.get("op")
    op = _OPS.get(letter)  # type: ignore[arg-type]
    if op is None:
        raise ChangeError("unknown_op", f"op must be one of c, u, d, r, t; not {letter!r}")
    source = envelope.get("source") if isinstance(envelope.get("source"), Mapping) else {}
    ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
    ts_ms = ts_ms if isinstance(ts_ms, int) and not isinstance(ts_ms, bool) else None
    if op == TRUNCATE:
        return Change(TRUNCATE, None, None, ts_ms, (), "t")
    if op == UPSERT:
        after = envelope.get("after")
        if not isinstance(after, Mapping):
            raise ChangeError("missing_after", f"op {letter!r} needs an 'after' row")
        fields = tuple(key_fields) if key_fields is not None else \
            _key_fields(_unwrap(_json(key, "key")), None, f"op {letter!r}")
        return Change(UPSERT, key_of(after, fields, "the 'after' row"), dict(after), ts_ms, fields, letter)
    before = envelope.get("before")
    if isinstance(before, Mapping) and key_fields is not None:
        return Change(DELETE, key_of(before, key_fields, "the 'before' row"), None, ts_ms, tuple(key_fields), "d")
    message_key = _unwrap(_json(key, "key"))
    if isinstance(message_key, Mapping):
        fields = _key_fields(message_key, key_fields, "a delete")
        return Change(DELETE, key_of(message_key, fields, "the message key"), None, ts_ms, fields, "d")
    raise ChangeError("missing_key", "a delete needs a 'before' row or a JSON object key")


def key_row(change: Change) -> dict[str, Any]:
    """The change's primary key as a row: key field -> value."""
    return dict(zip(change.fields, change.key or (), strict=True))


def envelope(change: Change, row: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Debezium-style event a pipeline writes for ``change``: an upsert carries
    ``row`` (the row after the pipeline's steps) as ``after``, a delete its key as
    ``before``; ``source.ts_ms`` is the input's event time when it had one."""
    out: dict[str, Any]
    if change.op == UPSERT:
        out = {"op": change.source_op or "c", "before": None, "after": dict(row if row is not None else change.row or {})}
    elif change.op == DELETE:
        out = {"op": "d", "before": key_row(change), "after": None}
    else:
        out = {"op": "t", "before": None, "after": None}
    if change.ts_ms is not None:
        out["source"] = {"ts_ms": change.ts_ms}
    return out


def message_key(change: Change) -> bytes | None:
    """The message key of a change written on: its primary key as a JSON object (what
    Debezium keys by, so one key's changes stay in one partition, in order); None for a
    truncate."""
    if change.op == TRUNCATE:
        return None
    return orjson.dumps(key_row(change))


def delete_of(change: Change) -> Change:
    """A delete of ``change``'s key (a row a pipeline's step dropped leaves the table)."""
    return Change(DELETE, change.key, None, change.ts_ms, change.fields, "d")


def plain_change(value: bytes | Mapping[str, Any] | None, key_fields: Sequence[str]) -> Change:
    """A plain JSON record (a pipeline's output) as an upsert of itself."""
    row = _json(value, "value")
    if not isinstance(row, Mapping):
        raise ChangeError("not_an_object", "a record written to a table must be a JSON object")
    key = key_of(row, key_fields, "the record") if key_fields else None
    return Change(UPSERT, key, dict(row))


def fold(changes: Sequence[Change]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The table a sequence of changes leaves behind (what a replica must equal). An
    upsert writes the fields it has and keeps the row's others, as the sinks' ``INSERT
    … ON CONFLICT DO UPDATE`` does (a Debezium row has every field)."""
    table: dict[tuple[Any, ...], dict[str, Any]] = {}
    for change in changes:
        if change.op == TRUNCATE:
            table.clear()
        elif change.op == DELETE:
            table.pop(change.key, None)  # type: ignore[arg-type]
        else:
            table[change.key] = {**table.get(change.key, {}), **(change.row or {})}  # type: ignore[index, arg-type]
    return table


def last_per_key(changes: Sequence[Change]) -> list[Change]:
    """A batch's changes with at most two per key, cut at the last truncate (kept
    first), that leave the table as applying every change in order would: a key's last
    delete when it is its last change, or when upserts follow it (then that delete
    first, to start the row anew), and the upserts after it merged into one (later
    fields over earlier ones: an upsert keeps the fields it does not have). Deletes
    come before upserts; changes of different keys are independent."""
    start = 0
    for i, change in enumerate(changes):
        if change.op == TRUNCATE:
            start = i
    head: list[Change] = []
    deleted: dict[Any, Change] = {}  # key -> its last delete
    upserts: dict[Any, Change] = {}  # key -> the upserts since it, merged
    for change in changes[start:]:
        if change.op == TRUNCATE:
            head = [change]
            deleted.clear()
            upserts.clear()
        elif change.op == DELETE:
            upserts.pop(change.key, None)
            deleted[change.key] = change
        else:
            before = upserts.get(change.key)
            if before is not None:
                change = replace(change, row={**(before.row or {}), **(change.row or {})})
            upserts[change.key] = change
    return head + list(deleted.values()) + list(upserts.values())


__all__ = ["DELETE", "TRUNCATE", "UPSERT", "Change", "ChangeError", "delete_of", "envelope", "fold",
           "key_row", "last_per_key", "message_key", "parse_change", "plain_change"]
