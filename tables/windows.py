"""Window state tables: one changelog-backed RocksDB table per configured window, and
one for the aggregate API.

Why a plain table and not Faust's windowed tables: Faust's ``.tumbling()`` /
``.hopping()`` cannot express sessions, count windows, merging or late-record routing.
Here each key's value is the JSON of all its open windows (``operators.windows``), so
every window type is stored the same way, and one put per key covers all its windows.

State is read and written through the one state store (``tables.store``): a
write-back cache per window, flushed by the commit protocol (``app.commit``).
"""

from __future__ import annotations

from typing import Any

import faust

from app import app, settings
from app.pipelines import pipeline_windows
from app.windows import WindowDef, load_window_defs
from tables.store import AtPartition, PartitionStore, as_current

#: Per-partition bookkeeping (stream time, late count) lives under this key prefix,
#: which no record key can produce (keys are UTF-8 text of a JSON scalar).
META_PREFIX = b"\x00meta:"


def meta_key(partition: int) -> bytes:
    """The key of one partition's bookkeeping value."""
    return META_PREFIX + str(partition).encode()


#: Keys and values are bytes we encode ourselves (orjson), never Faust's codecs.
RAW_SCHEMA = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw")


def _table(name: str) -> Any:
    return app.Table(
        name,
        default=None,
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        schema=RAW_SCHEMA,
        help=f"window state: {name}",
    )


#: Every configured window; a bad ``windows:`` section stops the worker at start
#: (WindowConfigError names the entry and field) rather than running half-configured.
WINDOW_DEFS: list[WindowDef] = load_window_defs() + pipeline_windows()
if len({d.name for d in WINDOW_DEFS}) != len(WINDOW_DEFS):
    raise ValueError(f"window names must be unique (pipeline window steps are named pipeline.<name>): "
                     f"{[d.name for d in WINDOW_DEFS]}")

#: name -> table holding that window's per-key state.
window_tables: dict[str, Any] = {d.name: _table(f"window-{d.name}") for d in WINDOW_DEFS}

#: window_id -> {"spec", "state", "st", "closed", "o"} of the aggregate API.
api_windows = _table("aggregate-api")

__all__ = ["META_PREFIX", "AtPartition", "PartitionStore", "WINDOW_DEFS", "api_windows", "as_current",
           "meta_key", "window_tables"]
