"""Temporal stream-table joins: each stream record joined with the row its key has in a
table read from a changelog (a compacted topic of rows: the last record of a key is
its row, a tombstone deletes it). Pure: the table's rows live in a mapping the caller
gives (a dict for an HTTP batch and unit tests; a changelog-backed store for a live
pipeline, agents/table_join.py).

Semantics (docs/joins.md, "Stream-table joins", has the table):

- ``as_of: latest`` (Kafka Streams' KStream-KTable join): a stream record joins the
  row its key has when the record is processed; an update replaces the row in the
  order the table's records are read (offset order, what compaction keeps).
- ``as_of: event_time`` (Kafka Streams' versioned stores, KIP-889/KIP-914; Flink's
  event-time temporal join): the table keeps each key's versions, each valid from its
  record's timestamp until the next version's; a stream record at ``t`` joins the
  version valid at ``t`` (the latest version with a timestamp ``<= t``). A tombstone
  is a version too: "no row from here on".
- History: the table's time is the largest timestamp of a table record applied (per
  partition, live). Versions are kept back to the *horizon*, table time minus
  ``history``: the version valid at the horizon and every later one. A table record
  older than the horizon is dropped (``table_late``), as a versioned store drops a put
  older than its history retention. A stream record older than the horizon joins as
  if the key had no row (``beyond_history``), as KIP-914's timestamped lookup returns
  null there, whether or not the old versions are still stored: the answer does not
  depend on when pruning ran.
- A stream record earlier than its key's oldest version (within the history) finds
  no row. A table update that arrives after stream records it would have matched does
  not re-emit them (as in Kafka Streams: only the stream side triggers output).
- Types: ``inner`` emits a stream record only with a row; ``left`` emits it alone
  (``right`` null, or no prefixed fields) when there is none.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from operators.cdc import DELETE, TRUNCATE, ChangeError, parse_change
from operators.joins import Joined, event_time, join_key, merged
from operators.transform import RecordFailure, epoch_seconds

AS_OF = ("latest", "event_time")
TABLE_JOIN_TYPES = ("inner", "left")
TABLE_FORMATS = ("json", "debezium")

#: One version: [valid from (epoch seconds), row or None (a tombstone)].
Version = list


@dataclass(frozen=True)
class TableJoinSpec:
    """A parsed stream-table ``join`` step (operators.steps.parse_join)."""

    #: The stream record's key field(s).
    on: tuple[str, ...]
    #: The table row's key field(s), in the order of ``on`` (default: the same names).
    table_key: tuple[str, ...]
    as_of: str = "latest"
    #: How far back versions are kept (``as_of: event_time``), seconds.
    history: float = 86400.0
    type: str = "inner"
    time_field: str = "ts"
    #: How table records are written: plain JSON rows (null: a tombstone) or Debezium
    #: change events.
    format: str = "json"
    #: Flat output: each side's fields under its prefix; None: ``{"left": …, "right": …}``.
    prefixes: tuple[str, str] | None = None

    @property
    def versioned(self) -> bool:
        return self.as_of == "event_time"


@dataclass
class TableJoinCounts:
    """What a stream-table join did."""

    stream: int = 0
    table: int = 0
    pairs: int = 0
    #: stream records emitted alone (``left``) or dropped (``inner``) for want of a row
    unmatched: int = 0
    #: stream records older than the history horizon (counted in ``unmatched`` too)
    beyond_history: int = 0
    #: table records older than the history horizon, dropped
    table_late: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True, slots=True)
class TableRecord:
    """One record of the table's topic: the key (join key text), the row (None: a
    delete) and its time (epoch seconds)."""

    key: str
    row: dict[str, Any] | None
    time: float
    #: A delete's other reading of its message key (``_plain_text_key``), or None.
    alt_key: str | None = None


def key_text(values: Sequence[Any]) -> str:
    """The join key text of key values, as ``operators.joins.join_key`` writes it."""
    names = [str(i) for i in range(len(values))]
    return join_key(dict(zip(names, values, strict=True)), names)


def _message_key_values(key: Any, fields: Sequence[str]) -> tuple[Any, ...]:
    """Key values from a message key: a JSON object of the key fields, or (one key
    field) a JSON value or plain text."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        try:
            key = orjson.loads(raw)
        except orjson.JSONDecodeError:
            key = raw.decode("utf-8", "replace")
    if isinstance(key, Mapping):
        try:
            return tuple(key[f] for f in fields)
        except KeyError as exc:
            raise ChangeError("missing_key", f"the message key has no key field {exc.args[0]!r}") from None
    if key is None:
        raise ChangeError("missing_key", "a tombstone needs a message key to name its row")
    if len(fields) != 1:
        raise ChangeError("missing_key", f"a tombstone's key must be a JSON object of {list(fields)}")
    return (key,)


def _plain_text_key(key: Any, fields: Sequence[str]) -> str | None:
    """The join key text of a one-field message key read as plain text, when its bytes
    also read as a JSON number or boolean (``b"42"``): that is how a text key ``"42"``
    is written (docs/joins.md), and the row it names may be either. None otherwise."""
    if len(fields) != 1 or not isinstance(key, (bytes, bytearray, memoryview)):
        return None
    raw = bytes(key)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, (int, float)):  # bool too
        return key_text((raw.decode("utf-8", "replace"),))
    return None


def table_record(spec: TableJoinSpec, key: Any, value: Any, time: float) -> TableRecord:
    """A table topic's record (message key and value, bytes or decoded JSON) as a row
    change; ChangeError (with a dead-letter reason) when it cannot be one."""
    fields = spec.table_key
    if spec.format == "debezium":
        change = parse_change(key, value, fields)
        if change.op == TRUNCATE:
            raise ChangeError("unsupported_op", "a truncate cannot be applied to a join's table")
        assert change.key is not None
        return TableRecord(key_text(change.key), None if change.op == DELETE else change.row, time)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ChangeError("invalid_json", f"value is not JSON: {exc}") from None
    if value is None:
        return TableRecord(key_text(_message_key_values(key, fields)), None, time, _plain_text_key(key, fields))
    if not isinstance(value, dict):
        raise ChangeError("not_an_object", "a table row must be a JSON object (or null: a delete)")
    try:
        values = tuple(value[f] for f in fields)
    except KeyError as exc:
        raise ChangeError("missing_key", f"the row has no key field {exc.args[0]!r}") from None
    if any(v is None for v in values):
        # A null key matches nothing (as in SQL): no stream record could join the row.
        raise ChangeError("missing_key", f"the row's key field(s) {list(fields)} hold null")
    return TableRecord(key_text(values), value, time)


# ------------------------------------------------------------------ versions (pure)


def version_at(versions: Sequence[Version], t: float) -> dict[str, Any] | None:
    """The row valid at ``t``: that of the latest version with a time ``<= t`` (None:
    none, or a tombstone). ``versions`` is sorted by time."""
    row = None
    for valid_from, value in versions:
        if valid_from > t:
            break
        row = value
    return row


def insert_version(versions: list[Version], t: float, row: dict[str, Any] | None) -> None:
    """Add the version valid from ``t`` in time order; a version of the same time is
    replaced (the later record wins, as in a versioned store)."""
    i = len(versions)
    while i > 0 and versions[i - 1][0] > t:
        i -= 1
    if i > 0 and versions[i - 1][0] == t:
        versions[i - 1] = [t, row]
    else:
        versions.insert(i, [t, row])


def prune(versions: list[Version], horizon: float) -> list[Version]:
    """The versions a lookup at or after ``horizon`` can need: the one valid at the
    horizon and every later one; none when all that is left is a tombstone (the key
    has no row from the horizon on)."""
    first = 0
    while first + 1 < len(versions) and versions[first + 1][0] <= horizon:
        first += 1
    kept = versions[first:]
    if len(kept) == 1 and kept[0][1] is None and kept[0][0] <= horizon:
        return []
    return kept


def prunable_at(versions: Sequence[Version], history: float) -> float:
    """The table time from which ``prune`` removes something from ``versions``
    (inf: never, a single live row is kept however old)."""
    if len(versions) >= 2:
        return versions[1][0] + history
    if versions and versions[0][1] is None:
        return versions[0][0] + history
    return math.inf


# ------------------------------------------------------------------ one partition's table


class VersionedTable:
    """One partition's table and its join with the stream.

    ``rows`` maps a join key to ``{"v": [[t, row|None], …]}`` (JSON, so a store can
    persist it): one version under ``as_of: latest`` (deletes remove the key), every
    version back to the horizon under ``as_of: event_time``. ``table_time`` is the
    largest table record time applied. ``pruning`` indexes the keys by the table time
    at which old versions can go, rebuilt from ``rows`` (``rebuild_index``) after a
    restore."""

    def __init__(self, spec: TableJoinSpec, rows: MutableMapping[str, dict[str, list[Version]]] | None = None,
                 table_time: float = -math.inf) -> None:
        self.spec = spec
        self.rows = {} if rows is None else rows
        self.table_time = table_time
        self.counts = TableJoinCounts()
        self.pruning: list[tuple[float, str]] = []
        self.rebuild_index()

    def rebuild_index(self) -> None:
        if not self.spec.versioned:
            self.pruning = []
            return
        history = self.spec.history
        self.pruning = [(at, key) for key, value in self.rows.items()
                        if (at := prunable_at(value["v"], history)) != math.inf]
        heapq.heapify(self.pruning)

    @property
    def horizon(self) -> float:
        """Versions older than this are not kept (-inf under ``as_of: latest``)."""
        return self.table_time - self.spec.history if self.spec.versioned else -math.inf

    def update(self, record: TableRecord) -> bool:
        """Apply one table record; False when it is older than the horizon (dropped)."""
        self.counts.table += 1
        key, row, t = record.key, record.row, record.time
        alt = record.alt_key
        if alt is not None and key not in self.rows and alt in self.rows:
            key = alt  # a delete keyed b"42" of the row whose text key is "42"
        if not self.spec.versioned:
            if row is None:
                if self.rows.get(key) is not None:
                    del self.rows[key]
            else:
                self.rows[key] = {"v": [[t, row]]}
            return True
        if t < self.horizon:
            self.counts.table_late += 1
            return False
        current = self.rows.get(key)
        versions = [] if current is None else current["v"]
        insert_version(versions, t, row)
        if t > self.table_time:
            self.table_time = t
        self._store(key, prune(versions, self.horizon))
        self._prune_due()
        return True

    def _store(self, key: str, versions: list[Version]) -> None:
        if versions:
            self.rows[key] = {"v": versions}  # written back: a store sees the change
            at = prunable_at(versions, self.spec.history)
            if at != math.inf:
                heapq.heappush(self.pruning, (at, key))
        elif self.rows.get(key) is not None:
            del self.rows[key]

    def _prune_due(self) -> None:
        """Prune every key whose old versions the table time has passed, so keys that
        are not updated again do not keep their history for ever."""
        pruning, now, history = self.pruning, self.table_time, self.spec.history
        while pruning and pruning[0][0] <= now:
            _, key = heapq.heappop(pruning)
            current = self.rows.get(key)
            if current is None:
                continue
            versions = current["v"]
            if prunable_at(versions, history) > now:
                continue  # changed since: its own entry is in the index
            kept = prune(versions, self.horizon)
            if kept != versions:
                self._store(key, kept)

    def lookup(self, key: str, t: float) -> dict[str, Any] | None:
        """The row a stream record of ``key`` at ``t`` joins (None: none)."""
        current = self.rows.get(key)
        if current is None:
            return None
        versions = current["v"]
        if not self.spec.versioned:
            return versions[-1][1]
        return version_at(versions, t)

    def join(self, record: dict[str, Any]) -> Joined | None:
        """One stream record: the joined output (its right side None when the ``left``
        join has no row for it), or None when nothing is emitted. Raises RecordFailure
        when the record has no key or (``as_of: event_time``) no time."""
        spec = self.spec
        key = join_key(record, spec.on)
        # A null key matches no row, as in SQL (a left join emits the record unmatched).
        null_key = any(record[f] is None for f in spec.on)
        if spec.versioned:
            t = event_time(record, spec.time_field)
            if t < self.horizon:
                self.counts.beyond_history += 1
                row = None
            else:
                row = None if null_key else self.lookup(key, t)
        else:
            t = _time_or_none(record, spec.time_field)
            row = None if null_key else self.lookup(key, t)
        self.counts.stream += 1
        raw = record.get(spec.time_field)  # the output's time field, as the record wrote it
        if row is None:
            self.counts.unmatched += 1
            return Joined(record, None, t, raw) if spec.type == "left" else None
        self.counts.pairs += 1
        return Joined(record, row, t, raw)


def _time_or_none(record: Mapping[str, Any], time_field: str) -> float:
    """``as_of: latest`` needs no time; the output carries the record's when it has one."""
    try:
        return event_time(record, time_field)
    except RecordFailure:
        return math.nan


def output(joined: Joined, spec: TableJoinSpec) -> dict[str, Any]:
    """The output record: the stream record and its row, nested (``{"left": …,
    "right": …}``) or flat under the prefixes, as the interval join writes them; the
    time field is the stream record's own (written as it wrote it)."""
    out = merged(joined, spec)  # type: ignore[arg-type]
    if joined.left is not None and spec.time_field not in joined.left:
        del out[spec.time_field]
    return out


# ------------------------------------------------------------------ an HTTP batch


@dataclass
class BatchTableJoin:
    """The stream-table join of an HTTP batch: the stream records (the records the step
    receives) and the table's records given inline as ``{"key": …, "value": row or
    null, "timestamp": …}`` (``key`` may be left out when the value has the key
    fields; ``timestamp`` is required under ``as_of: event_time``).

    The two lists are read as a worker reads two topics in time order: the next record
    is the head with the smaller time, the table's first on a tie (so a version valid
    from ``t`` is there for a stream record at ``t``), each list keeping its own order.
    Under ``as_of: latest`` times are optional; a record without one does not wait for
    the other list (the table's records come first)."""

    spec: TableJoinSpec
    outputs: list[dict[str, Any]] = field(default_factory=list)
    #: (side, index in its input, reason) of each record that failed.
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    #: index of each stream record that was not emitted, with why (``no_row``,
    #: ``beyond_history``), and of each table record dropped as late.
    dropped: list[tuple[str, int, str]] = field(default_factory=list)

    def run(self, stream: Sequence[dict[str, Any]], table: Sequence[Any]) -> TableJoinCounts:
        joined = VersionedTable(self.spec)
        for side, index, item in self._arrivals(stream, table):
            if side == "table":
                if isinstance(item, TableRecord):
                    if not joined.update(item):
                        self.dropped.append(("table", index, "late"))
                continue
            beyond = joined.counts.beyond_history
            try:
                result = joined.join(item)
            except RecordFailure as exc:
                self.failures.append(("stream", index, str(exc)))
                continue
            if result is None:
                reason = "beyond_history" if joined.counts.beyond_history > beyond else "no_row"
                self.dropped.append(("stream", index, reason))
            else:
                self.outputs.append(output(result, self.spec))
        return joined.counts

    def _table_records(self, table: Sequence[Any]) -> Iterator[tuple[float, int, TableRecord]]:
        versioned = self.spec.versioned
        for i, item in enumerate(table):
            if not isinstance(item, dict) or not set(item) <= {"key", "value", "timestamp"} or "value" not in item:
                self.failures.append(("table", i, "a table record is {key, value, timestamp}"))
                continue
            raw_t = item.get("timestamp")
            if raw_t is None:
                if versioned:
                    self.failures.append(("table", i, "timestamp is required (as_of: event_time)"))
                    continue
                t = math.nan
            else:
                try:
                    t = epoch_seconds(raw_t)
                except (RecordFailure, ValueError, TypeError) as exc:
                    self.failures.append(("table", i, f"timestamp: {exc}"))
                    continue
            try:
                yield t, i, table_record(self.spec, item.get("key"), item["value"], t)
            except ChangeError as exc:
                self.failures.append(("table", i, str(exc)))

    def _arrivals(self, stream: Sequence[dict[str, Any]], table: Sequence[Any]
                  ) -> Iterator[tuple[str, int, Any]]:
        def stream_time(record: Any) -> float:
            try:
                return event_time(record, self.spec.time_field)
            except RecordFailure:
                return math.nan

        rows = list(self._table_records(table))
        records = [(stream_time(r), i, r) for i, r in enumerate(stream)]
        i = j = 0
        while i < len(records) or j < len(rows):
            # An unknown time (nan) compares as "not later": the table's record comes first.
            if j < len(rows) and (i == len(records) or not rows[j][0] > records[i][0]):
                _, index, item = rows[j]
                j += 1
                yield "table", index, item
            else:
                _, index, item = records[i]
                i += 1
                yield "stream", index, item


__all__ = ["AS_OF", "TABLE_FORMATS", "TABLE_JOIN_TYPES", "BatchTableJoin", "TableJoinCounts", "TableJoinSpec",
           "TableRecord", "VersionedTable", "insert_version", "key_text", "output", "prune", "prunable_at",
           "table_record", "version_at"]
