"""Record transformations: deduplicate, normalize, enrich, filter, map.

Pure functions over JSON-like dicts. State (what deduplication remembers, the
reference data enrichment reads) is passed in, so the same code serves a live
pipeline (state in Faust tables) and an HTTP batch (state in a dict).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from operators.expr import EvalError, Expr


class RecordFailure(Exception):
    """This record cannot pass this step; the message says why (it is reported or
    dead-lettered, never dropped silently)."""


# ---------------------------------------------------------------- deduplicate


def dedupe_key(record: Mapping[str, Any], fields: tuple[str, ...] | None) -> str:
    """What identifies a record for deduplication.

    By the listed fields when given; else by ``event_id`` when the record has one; else
    by the whole content (a hash of its canonical JSON).
    """
    if fields:
        missing = [f for f in fields if f not in record]
        if missing:
            raise RecordFailure(f"dedupe field(s) missing: {missing}")
        return "f:" + orjson.dumps([record[f] for f in fields]).decode()
    if record.get("event_id") is not None:
        return f"id:{record['event_id']}"
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return "h:" + hashlib.blake2b(canonical, digest_size=16).hexdigest()


class Seen(NamedTuple):
    """When a key was first admitted: time (seconds) and position in the stream.

    A NamedTuple: built once per admitted record, where a frozen dataclass costs ~1 µs."""

    at: float
    seq: int


def is_duplicate(previous: Seen | Sequence[Any] | None, now: float, seq: int,
                 horizon_seconds: float | None, horizon_count: int | None) -> bool:
    """A record is a duplicate if its key was admitted within the horizon (time and/or
    count of records since); with no horizon, forever. ``previous`` is a ``Seen`` or
    the stored ``[at, seq]`` pair it was saved as."""
    if previous is None:
        return False
    if horizon_seconds is not None and now - previous[0] > horizon_seconds:
        return False
    if horizon_count is not None and seq - previous[1] > horizon_count:
        return False
    return True


# ---------------------------------------------------------------- normalize

_CAMEL_1 = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_CAMEL_2 = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_NON_WORD = re.compile(r"[^0-9a-zA-Z]+")


@functools.lru_cache(maxsize=4096)  # field names repeat record after record
def snake_case(name: str) -> str:
    """``User_ID``, ``userId``, ``HTTPStatus``, ``first name`` → ``user_id``,
    ``user_id``, ``http_status``, ``first_name``."""
    s = _CAMEL_2.sub("_", _CAMEL_1.sub("_", name))
    return _NON_WORD.sub("_", s).strip("_").lower() or name


def canonical_timestamp(value: Any) -> str:
    """ISO-8601 UTC with milliseconds (``2026-11-26T21:32:38.123Z``) from ISO-8601 text,
    epoch seconds or epoch milliseconds (numbers above 10^11 are taken as ms)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("z", "Z"))
            except ValueError:
                raise RecordFailure(f"not a timestamp: {value!r}") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)  # naive times are taken as UTC
            return _iso(dt.timestamp())
    # JSON numbers, by exact class: cheaper than isinstance checks, and a bool (whose
    # class is not int) is refused.
    if (value.__class__ is float or value.__class__ is int) and math.isfinite(value):
        return _iso(value / 1000.0 if abs(value) >= 1e11 else float(value))
    raise RecordFailure(f"not a timestamp: {value!r}")


def _iso(seconds: float) -> str:
    """What ``datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")``
    gives, as ``...Z``, with the date-time text of each whole second built once.

    Why: this runs once per timestamp field per record, and building a datetime costs
    ~3 µs; records of a stream share their seconds. The rounding is datetime's own:
    microseconds rounded half-even (carrying into the second), then cut to milliseconds.
    """
    global _last_second
    whole, micros = _whole_and_micros(seconds)
    if whole != _last_second[0]:  # consecutive records mostly share their second
        _last_second = (whole, _iso_second(int(whole)))
    return _last_second[1] + _MILLIS[micros // 1000]


def _whole_and_micros(seconds: float) -> tuple[float, int]:
    """(whole seconds, microseconds 0-999,999) of ``seconds``, the microseconds rounded
    half-even as datetime rounds them (carrying into the second): the one rounding of
    the ISO text (``_iso``) and of the epoch value (``epoch_seconds``)."""
    frac, whole = math.modf(seconds)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        return whole + 1, micros - 1_000_000
    if micros < 0:
        return whole - 1, micros + 1_000_000
    return whole, micros


#: (whole second, its text) of the last timestamp formatted.
_last_second: tuple[float, str] = (math.nan, "")
#: ``.000Z`` … ``.999Z``: a lookup where formatting cost ~0.2 µs per timestamp.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


@functools.lru_cache(maxsize=4096)
def _iso_second(whole: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of one whole epoch second."""
    try:
        dt = datetime.fromtimestamp(whole, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise RecordFailure(f"timestamp out of range: {whole!r}") from None
    return dt.isoformat()[:19]


def epoch_seconds(value: Any) -> float:
    """Epoch seconds from any timestamp form ``canonical_timestamp`` accepts, cut to
    the millisecond as its text is.

    JSON numbers are computed directly, with the same rounding as ``_iso`` and the
    same value ``datetime.timestamp()`` gives for that text (whole seconds and
    microseconds as integers, divided once). Why: the live join reads an event time
    per record, and the round trip through ISO text and a datetime was a sixth of its
    processing (docs/performance.md, "The live join")."""
    if (value.__class__ is float or value.__class__ is int) and math.isfinite(value):
        whole, micros = _whole_and_micros(value / 1000.0 if abs(value) >= 1e11 else float(value))
        _iso_second(int(whole))  # out of datetime's range: RecordFailure, as for text
        return (int(whole) * 1_000_000 + micros // 1000 * 1000) / 1_000_000
    iso = canonical_timestamp(value)
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration_seconds(value: Any, allow_zero: bool = False) -> float:
    """Seconds from a number or a string like ``90``, ``500ms``, ``60s``, ``10m``,
    ``1h``, ``1d``; ValueError when it is none, negative (or zero, unless allowed)."""
    if isinstance(value, bool):
        raise ValueError("must be a duration (seconds or a string like '10m')")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"must be a duration (seconds or a string like '10m'), not {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("must be a positive duration" if not allow_zero else "must not be negative")
    return seconds


SCHEMA_TYPES = ("string", "integer", "number", "boolean", "timestamp", "object", "array", "any")


@dataclass(frozen=True)
class FieldSchema:
    type: str = "any"
    required: bool = False
    default: Any = None
    has_default: bool = False


#: (schema type, Python class) pairs whose values pass unchanged (a float still needs
#: its finiteness checked; bool is not int by class).
_ALREADY_TYPED = frozenset({("integer", int), ("number", int), ("string", str), ("boolean", bool),
                            ("object", dict), ("array", list)})


def coerce(value: Any, type_name: str, name: str) -> Any:
    """``value`` as ``type_name``; numeric strings become numbers; else RecordFailure."""
    if (type_name, value.__class__) in _ALREADY_TYPED:  # most values already are
        return value
    if value is None or type_name == "any":
        return value
    if type_name == "string":
        if isinstance(value, (dict, list)):
            raise RecordFailure(f"field {name!r}: expected string, got {type(value).__name__}")
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if type_name in ("integer", "number"):
        if isinstance(value, bool):
            raise RecordFailure(f"field {name!r}: expected {type_name}, got boolean")
        if isinstance(value, str):
            try:
                value = float(value.strip()) if type_name == "number" or "." in value or "e" in value.lower() else int(value.strip())
            except ValueError:
                raise RecordFailure(f"field {name!r}: {value!r} is not a {type_name}") from None
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            raise RecordFailure(f"field {name!r}: expected {type_name}, got {type(value).__name__}")
        if type_name == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise RecordFailure(f"field {name!r}: {value!r} is not an integer")
            return int(value)
        return value
    if type_name == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise RecordFailure(f"field {name!r}: {value!r} is not a boolean")
    if type_name == "timestamp":
        return canonical_timestamp(value)
    if type_name == "object" and isinstance(value, dict):
        return value
    if type_name == "array" and isinstance(value, list):
        return value
    raise RecordFailure(f"field {name!r}: expected {type_name}, got {type(value).__name__}")


@dataclass(frozen=True)
class NormalizeSpec:
    snake_case: bool = True
    trim: bool = True
    lowercase: tuple[str, ...] = ()
    timestamps: tuple[str, ...] = ()
    schema: Mapping[str, FieldSchema] = field(default_factory=dict)


@functools.lru_cache(maxsize=1024)  # records of one stream share their field lists
def _normalized_names(keys: tuple[str, ...], to_snake_case: bool) -> tuple[str, ...] | None:
    """The output name of each field, in order, or None when every name stays as it
    is; RecordFailure if two collide."""
    names = tuple(snake_case(k) for k in keys) if to_snake_case else keys
    if len(set(names)) != len(names):
        seen: dict[str, str] = {}
        for key, name in zip(keys, names, strict=True):
            if name in seen:
                raise RecordFailure(f"fields {seen[name]!r} and {key!r} both normalize to {name!r}")
            seen[name] = key
    return None if names == keys else names


#: (field names, snake_case flag, their output names) of the last record normalized.
_last_fields: tuple[tuple[str, ...], bool | None, tuple[str, ...] | None] = ((), None, None)


def normalize(record: Mapping[str, Any], spec: NormalizeSpec) -> dict[str, Any]:
    """Field names to snake_case, strings trimmed, enum fields lower-cased, timestamps
    canonical, and the schema's types, defaults and required fields applied."""
    global _last_fields
    keys = tuple(record)
    # Consecutive records of a stream mostly have the same fields in the same order:
    # comparing with the last field list is cheaper than the cache's hashing.
    last_keys, last_snake, names = _last_fields
    if keys != last_keys or last_snake is not spec.snake_case:
        names = _normalized_names(keys, spec.snake_case)
        _last_fields = (keys, spec.snake_case, names)
    # ``__class__ is str``: JSON gives plain str; this runs for every field of every record.
    if names is None:
        if spec.trim:
            out = {k: (v.strip() if v.__class__ is str else v) for k, v in record.items()}
        else:
            out = dict(record)
    elif spec.trim:
        out = {n: (v.strip() if v.__class__ is str else v) for n, v in zip(names, record.values(), strict=True)}
    else:
        out = dict(zip(names, record.values(), strict=True))
    for name in spec.lowercase:
        value = out.get(name)
        if value.__class__ is str:
            out[name] = value.lower()
    for name in spec.timestamps:
        value = out.get(name)
        if value is not None:
            out[name] = canonical_timestamp(value)
    for name, fs in spec.schema.items():
        value = out.get(name)
        if value is None:
            if fs.has_default:
                out[name] = fs.default
                continue
            if fs.required:
                raise RecordFailure(f"required field {name!r} is missing")
            continue
        out[name] = coerce(value, fs.type, name)
    return out


# ---------------------------------------------------------------- enrich

Lookup = Callable[[str, str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class EnrichSpec:
    source: str | None = None  # reference data set name
    key: str | None = None  # record field whose value is the reference key
    fields: tuple[str, ...] | None = None  # which reference fields to copy (None = all)
    prefix: str = ""
    on_missing: str = "keep"  # keep | drop | fail
    overwrite: bool = False
    processing_time: str | None = None  # field to stamp with processing time


def enrich(record: Mapping[str, Any], spec: EnrichSpec, lookup: Lookup, now: float) -> dict[str, Any] | None:
    """The record joined with its reference row (a stream-table join), plus computed
    fields. Returns None when the row is missing and ``on_missing`` is ``drop``."""
    out = dict(record)
    if spec.source is not None and spec.key is not None:
        key_value = record.get(spec.key)
        row = None if key_value is None else lookup(spec.source, _key_text(key_value))
        if row is None:
            if spec.on_missing == "drop":
                return None
            if spec.on_missing == "fail":
                raise RecordFailure(f"no {spec.source!r} reference row for {spec.key}={key_value!r}")
        else:
            prefix, overwrite = spec.prefix, spec.overwrite
            for name in row if spec.fields is None else spec.fields:
                if name not in row:
                    continue
                target = prefix + name if prefix else name
                if overwrite or target not in out:
                    out[target] = row[name]
    if spec.processing_time:
        out[spec.processing_time] = _iso(now)
    return out


def _key_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


# ---------------------------------------------------------------- filter and map


def keep(record: Mapping[str, Any], where: Expr) -> bool:
    """Whether a record passes a filter; an evaluation error fails the record."""
    try:
        return bool(where.evaluate(record))
    except EvalError as exc:
        raise RecordFailure(f"filter {where.text!r}: {exc}") from None


@dataclass(frozen=True)
class MapSpec:
    set: tuple[tuple[str, Expr], ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    select: tuple[str, ...] | None = None


def map_record(record: Mapping[str, Any], spec: MapSpec) -> dict[str, Any]:
    """Computed fields (evaluated on the input record), then renames, drops, select."""
    out = dict(record)
    for name, expr in spec.set:
        try:
            out[name] = expr.evaluate(record)
        except EvalError as exc:
            raise RecordFailure(f"set {name}: {exc}") from None
    for old, new in spec.rename:
        if old in out:
            out[new] = out.pop(old)
    for name in spec.drop:
        out.pop(name, None)
    if spec.select is not None:
        out = {k: out[k] for k in spec.select if k in out}
    return out
