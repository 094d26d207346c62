"""Debezium-style change events into change records (pure: no Kafka, no database).

A change event is a JSON envelope, with or without Debezium's ``schema``/``payload``
wrapper, carrying ``op`` (``c`` create, ``u`` update, ``d`` delete, ``r`` snapshot
read, ``t`` truncate), ``before``, ``after`` and ``source`` (``ts_ms``, and ``lsn`` or
another position). A tombstone (a null value, which Debezium sends after a delete so
that compaction can drop the key) is a delete of the message key's row.

What a replica does with each: ``c``/``u``/``r`` upsert ``after`` by its key, ``d`` and
tombstones delete the key, ``t`` empties the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    (upserts only); ``ts_ms`` the source's event time, when it says."""

    op: str
    key: tuple[Any, ...] | None
    row: dict[str, Any] | None
    ts_ms: int | None = None


def _json(raw: bytes | Mapping[str, Any] | None, what: str) -> Any:
    if raw is None or isinstance(raw, Mapping):
        return raw
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
        return tuple(row[f] for f in key_fields)
    except KeyError as exc:
        raise ChangeError("missing_key", f"{what} has no key field {exc.args[0]!r}") from None


def parse_change(key: bytes | Mapping[str, Any] | None, value: bytes | Mapping[str, Any] | None,
                 key_fields: Sequence[str]) -> Change:
    """The change a Debezium record (message key and value) makes; ChangeError when the
    record cannot be one."""
    envelope = _unwrap(_json(value, "value"))
    if envelope is None:  # tombstone: the message key names the deleted row
        message_key = _unwrap(_json(key, "key"))
        if not isinstance(message_key, Mapping):
            raise ChangeError("missing_key", "a tombstone needs a JSON object key to name its row")
        return Change(DELETE, key_of(message_key, key_fields, "the tombstone's key"), None)
    if not isinstance(envelope, Mapping):
        raise ChangeError("not_an_envelope", "a change event must be a JSON object")
    op = _OPS.get(envelope.get("op"))  # type: ignore[arg-type]
    if op is None:
        raise ChangeError("unknown_op", f"op must be one of c, u, d, r, t; not {envelope.get('op')!r}")
    source = envelope.get("source") if isinstance(envelope.get("source"), Mapping) else {}
    ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
    ts_ms = ts_ms if isinstance(ts_ms, int) else None
    if op == TRUNCATE:
        return Change(TRUNCATE, None, None, ts_ms)
    if op == UPSERT:
        after = envelope.get("after")
        if not isinstance(after, Mapping):
            raise ChangeError("missing_after", f"op {envelope['op']!r} needs an 'after' row")
        return Change(UPSERT, key_of(after, key_fields, "the 'after' row"), dict(after), ts_ms)
    before = envelope.get("before")
    if isinstance(before, Mapping):
        return Change(DELETE, key_of(before, key_fields, "the 'before' row"), None, ts_ms)
    message_key = _unwrap(_json(key, "key"))
    if isinstance(message_key, Mapping):
        return Change(DELETE, key_of(message_key, key_fields, "the message key"), None, ts_ms)
    raise ChangeError("missing_key", "a delete needs a 'before' row or a JSON object key")


def plain_change(value: bytes | Mapping[str, Any] | None, key_fields: Sequence[str]) -> Change:
    """A plain JSON record (a pipeline's output) as an upsert of itself."""
    row = _json(value, "value")
    if not isinstance(row, Mapping):
        raise ChangeError("not_an_object", "a record written to a table must be a JSON object")
    key = key_of(row, key_fields, "the record") if key_fields else None
    return Change(UPSERT, key, dict(row))


def fold(changes: Sequence[Change]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The table a sequence of changes leaves behind (what a replica must equal)."""
    table: dict[tuple[Any, ...], dict[str, Any]] = {}
    for change in changes:
        if change.op == TRUNCATE:
            table.clear()
        elif change.op == DELETE:
            table.pop(change.key, None)  # type: ignore[arg-type]
        else:
            table[change.key] = dict(change.row or {})  # type: ignore[index]
    return table


def last_per_key(changes: Sequence[Change]) -> list[Change]:
    """The changes of a batch with only the last one of each key kept, in order, and
    cut at the last truncate (which is kept): a batch applied this way leaves the
    table as applying every change in order would, with one write per key."""
    start = 0
    for i, change in enumerate(changes):
        if change.op == TRUNCATE:
            start = i
    kept: dict[Any, Change] = {}
    head: list[Change] = []
    for change in changes[start:]:
        if change.op == TRUNCATE:
            head = [change]
            kept.clear()
            continue
        kept.pop(change.key, None)
        kept[change.key] = change
    return head + list(kept.values())


__all__ = ["DELETE", "TRUNCATE", "UPSERT", "Change", "ChangeError", "fold", "last_per_key",
           "parse_change", "plain_change"]
