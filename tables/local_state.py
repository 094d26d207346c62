"""Local RocksDB state under exactly_once: kept after a clean stop, restored in full
from the changelog after any other.

A write through a table reaches the local RocksDB at once (or at the batch's flush) and
its changelog record goes out inside the batch's open transaction. After a kill -9 that
transaction is aborted, but the local RocksDB still holds the write. Faust's recovery
replays the changelog only past the last committed offset and never removes such
values, so the restored state keeps writes whose records and outputs were aborted:

- a window, whose state also records the source offsets it applied, skipped the
  replayed records as already counted, and their results were never sent again (325
  records of a count window, tests/integration/test_windows_exactly_once.py);
- a deduplicating pipeline drops the replayed records as duplicates of themselves: their
  outputs are lost (1,000 of 8,000; tests/chaos/test_pipeline_exactly_once.py, RocksDB kept).

The changelog, read read_committed, holds only committed state. So under exactly_once
the local folders of every table are deleted when the worker's app starts, before any
store opens, as Kafka Streams wipes an exactly-once store after an unclean shutdown,
unless the last stop was clean. Like Kafka Streams' checkpoint file, a **clean-shutdown marker**
(``<tabledir>/CLEAN_SHUTDOWN``) is written only after a stop whose final commit ended
every transaction that held anything (``transport.stopped_clean``); then the local state
equals the committed changelog up to its persisted offsets, and Faust's recovery only
reads what other owners wrote since. The marker is trusted only when:

- it is removed at the app's start, before any store opens (so a kill -9 of this run can never
  reuse it), and the removal is made durable (the directory is fsynced);
- it names this app id and the table (a table it does not name is restored in full);
- each table folder it names is, file for file (names, sizes, modification times), as
  it was when the marker was written: anything that wrote to the folder after the
  marker (an older version, a copy of another worker's folder) makes it stale.

Under at_least_once the local state is always kept: its writes follow their changelog
acks, so it never holds more than the changelog. The marker is written and removed the
same way, which costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import orjson

from app import app, settings
from app import transport as _transport
from app.commit import exactly_once

log = logging.getLogger(__name__)

MARKER = "CLEAN_SHUTDOWN"
#: What the start decided about the local state (logged when the app starts).
AT_START: list[str] = []


def table_folders(tabledir: Path, table_names: list[str]) -> dict[str, list[Path]]:
    """The local RocksDB folders (``<name>-<partition>.db``, ``<name>-backups``) of
    each of the given tables."""
    found: dict[str, list[Path]] = {n: [] for n in table_names}
    patterns = {n: re.compile(rf"{re.escape(n)}-(\d+\.db|backups)") for n in table_names}
    if not tabledir.is_dir():
        return found
    for path in sorted(tabledir.iterdir()):
        if path.is_dir():
            for name, pattern in patterns.items():
                if pattern.fullmatch(path.name):
                    found[name].append(path)
    return found


def discard_local_state(tabledir: Path, table_names: list[str]) -> list[Path]:
    """Delete the local RocksDB folders of the given tables; returns what was deleted."""
    gone: list[Path] = []
    for paths in table_folders(tabledir, table_names).values():
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def fingerprint(folders: list[Path]) -> list[list[Any]]:
    """Every file of the folders with its size and modification time (ns)."""
    out: list[list[Any]] = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                st = path.stat()
                out.append([str(path.relative_to(folder.parent)), st.st_size, st.st_mtime_ns])
    return out


def write_marker(tabledir: Path, app_id: str, table_names: list[str]) -> Path:
    """Record that the local state of these tables equals their committed changelogs."""
    folders = table_folders(tabledir, table_names)
    body = {"app_id": app_id,
            "tables": {name: fingerprint(paths) for name, paths in folders.items()}}
    path = tabledir / MARKER
    write_file_durably(path, orjson.dumps(body))
    return path


def write_file_durably(path: Path, body: bytes) -> None:
    """``path`` holds ``body`` once this returns, even after a machine crash: written
    to a temporary file, synced, renamed over it, the folder synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def take_marker(tabledir: Path, app_id: str, table_names: list[str]) -> set[str]:
    """Remove the marker (durably) and return the tables whose local state it vouches
    for: named in it, and their folders unchanged since it was written."""
    path = tabledir / MARKER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    path.unlink()
    _fsync_dir(tabledir)
    try:
        body = orjson.loads(raw)
        if body.get("app_id") != app_id:
            return set()
        recorded = body["tables"]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return set()
    folders = table_folders(tabledir, table_names)
    return {name for name in table_names
            if name in recorded and fingerprint(folders[name]) == recorded[name]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _table_names() -> list[str]:
    return sorted(table.name for table in app.tables.values())


def exactly_once_state_from_changelog() -> None:
    """Take the clean-shutdown marker; under exactly_once, delete the local state of
    every table it does not vouch for.

    Run when the worker's app starts (:func:`_decide_local_state`, one of
    ``App.start_checks``): every table is declared by then (windows, the aggregate API,
    pipelines' dedupe memory, the pattern engine) and no store has opened. Not at
    Faust's ``on_worker_init``, which every ``streametl`` command sends (``show-settings``,
    ``check-config``, ``create-topics``): a command run beside a worker, or before its
    start, took its marker and under exactly_once deleted its live table folders. Only
    the first call of a process decides."""
    if AT_START:
        return
    AT_START.append("local state decided")
    tabledir = Path(app.conf.tabledir)
    names = _table_names()
    trusted = take_marker(tabledir, settings.app_id, names) if tabledir.is_dir() else set()
    if not exactly_once(settings):
        return
    untrusted = [n for n in names if n not in trusted]
    gone = discard_local_state(tabledir, untrusted)
    # Logged once the worker's logging is set up (it is not yet at worker init).
    if trusted:
        AT_START.append(f"exactly_once: clean shutdown marker found, local state of {len(trusted)} tables kept")
    if untrusted:
        AT_START.append(f"exactly_once: no trusted clean shutdown marker for {len(untrusted)} tables: "
                        f"{len(gone)} local table folders deleted, restoring them from the changelogs")


async def _decide_local_state() -> None:
    exactly_once_state_from_changelog()


app.start_checks.append(_decide_local_state)


@app.task
async def _report_local_state() -> None:
    for line in AT_START[1:]:
        log.info("%s", line)


@app.on_before_shutdown.connect
async def marker_after_clean_stop(sender: Any = None, **kwargs: Any) -> None:
    """After the consumer stopped (its final commit done, tables stopped): write the
    marker if the stop was clean."""
    if not _transport.stopped_clean(app):
        log.warning("unclean stop: no clean shutdown marker written; the next start restores "
                    "the tables in full under exactly_once")
        return
    path = write_marker(Path(app.conf.tabledir), settings.app_id, _table_names())
    log.info("clean stop: clean shutdown marker written (%s)", path)


__all__ = ["MARKER", "discard_local_state", "fingerprint", "exactly_once_state_from_changelog", "write_file_durably",
           "marker_after_clean_stop", "take_marker", "table_folders", "write_marker"]
