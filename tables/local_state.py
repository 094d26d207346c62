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

Under at_least_once the local state is kept: its writes follow their changelog acks, so
it never holds more than the changelog. The marker is written and removed the same way,
which costs nothing. Unless the last run was exactly_once (``<tabledir>/GUARANTEE``,
noted by each start once it decided), or nothing says which it was: its folders may
hold aborted writes, so the first at_least_once start after it keeps only what the
marker vouches for, as exactly_once does.

Under both guarantees a folder is only worth keeping while its changelog still holds
every deletion made since the folder last caught up: a compacted changelog drops a
tombstone once it is older than the topic's ``delete.retention.ms`` (Kafka's default,
24 h), and a folder that missed it keeps the deleted key for ever (a dedupe key that
drops a new record, a window emitted again). So, as Kafka Streams' state cleaner does:

- a running worker deletes the folders of table partitions it has neither owned nor
  kept as a standby for ``state_cleanup_delay`` (10 min);
- at start, a folder last written over ``local_state_max_age`` (12 h) ago is deleted and
  restored in full (an open RocksDB writes its folder at least every 10 minutes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from app import app, settings
from app import transport as _transport
from app.commit import exactly_once

log = logging.getLogger(__name__)

MARKER = "CLEAN_SHUTDOWN"
#: The suffix a folder being removed is renamed with (then deleted in a thread).
DELETING = ".deleting-"
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


def newest_write(folder: Path) -> float:
    """The latest modification time of the folder or anything in it (0 if it is gone)."""
    newest = 0.0
    for path in (folder, *folder.rglob("*")):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # RocksDB replaced a file meanwhile
            continue
    return newest


def partition_folders(tabledir: Path, table_names: list[str]) -> list[tuple[str, int, Path]]:
    """(table, partition, folder) of each ``<name>-<partition>.db`` folder of the given
    tables (not their backups)."""
    found = []
    for name, paths in table_folders(tabledir, table_names).items():
        for folder in paths:
            if folder.name.endswith(".db"):
                found.append((name, int(folder.name[len(name) + 1:-3]), folder))
    return found


def outdated_folders(tabledir: Path, table_names: list[str], now: float, max_age: float) -> list[Path]:
    """The partition folders of the given tables last written more than ``max_age``
    seconds ago. An open RocksDB writes its folder at least every 10 minutes (its
    statistics dump) and at its close, so this is at most that much earlier than the
    last time the folder followed its changelog (or the stop)."""
    return [folder for _, _, folder in partition_folders(tabledir, table_names)
            if now - newest_write(folder) > max_age]


class UnusedFolders:
    """When each table partition folder was first seen unused by this worker, so that a
    folder goes once unused for ``state_cleanup_delay``: by this worker's own look at
    its assignment, not by the folder's time (an open RocksDB keeps writing its log)."""

    def __init__(self) -> None:
        self.since: dict[Path, float] = {}

    def due(self, tabledir: Path, in_use: dict[str, set[int]], now: float, delay: float) -> list[tuple[str, int, Path]]:
        """(table, partition, folder) of the folders unused for ``delay`` seconds, given
        the partitions in use now per table (those not listed are not looked at);
        forgets them, and any folder in use again."""
        seen: dict[Path, float] = {}
        due = []
        for name, partition, folder in partition_folders(tabledir, list(in_use)):
            if partition in in_use[name]:
                continue
            since = seen[folder] = self.since.get(folder, now)
            if now - since >= delay:
                due.append((name, partition, folder))
                del seen[folder]
        self.since = seen
        return due


def partitions_in_use(tables: Any, assigned: set[Any]) -> dict[str, set[int]]:
    """Per RocksDB table: the partitions of its changelog in ``assigned`` (this worker's
    active and standby partitions). A partition open in the store but not assigned (a
    write that straddled its revocation reopened it) is not in use."""
    in_use: dict[str, set[int]] = {}
    for table in tables.values():
        if _transport.open_dbs(table) is None:  # not RocksDB: nothing on disk
            continue
        topic = table.changelog_topic.get_topic_name()
        in_use[table.name] = {tp.partition for tp in assigned if tp.topic == topic}
    return in_use


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _table_names() -> list[str]:
    return sorted(table.name for table in app.tables.values())


def decide_local_state() -> None:
    """Take the clean-shutdown marker; delete the folders that caught up too long ago to
    catch up again (``local_state_max_age``); under exactly_once, delete the local state
    of every table the marker does not vouch for.

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
    for leftover in tabledir.glob(f"*{DELETING}*"):  # a removal the last run did not finish
        shutil.rmtree(leftover, ignore_errors=True)
    names = _table_names()
    last_run_exactly_once = last_run_may_have_been_exactly_once(tabledir, names)
    trusted = take_marker(tabledir, settings.app_id, names)
    outdated = outdated_folders(tabledir, names, time.time(), settings.local_state_max_age)
    for folder in outdated:
        shutil.rmtree(folder, ignore_errors=True)
    if outdated:
        AT_START.append(f"{len(outdated)} local table folders last written over "
                        f"{settings.local_state_max_age:.0f} s ago (local_state_max_age): deleted, "
                        "restoring them from the changelogs")
    if exactly_once(settings):
        why = "exactly_once"
    elif last_run_exactly_once:
        why = "the last run was exactly_once, or is not known"
    else:
        note_guarantee(tabledir, exactly_once(settings))
        return
    untrusted = [n for n in names if n not in trusted]
    gone = discard_local_state(tabledir, untrusted)
    # Only now: a start killed before its folders were gone must discard them again.
    note_guarantee(tabledir, exactly_once(settings))
    # Logged once the worker's logging is set up (it is not yet at worker init).
    if trusted:
        AT_START.append(f"{why}: clean shutdown marker found, local state of {len(trusted)} tables kept")
    if untrusted:
        AT_START.append(f"{why}: no trusted clean shutdown marker for {len(untrusted)} tables: "
                        f"{len(gone)} local table folders deleted, restoring them from the changelogs")


#: The processing guarantee of the last run that started with this table folder, noted
#: once its start decided the local state. Why: a run killed under exactly_once leaves
#: aborted writes in its folders, and an at_least_once start, which keeps its folders,
#: would apply them as committed.
GUARANTEE_FILE = "GUARANTEE"


def last_run_may_have_been_exactly_once(tabledir: Path, table_names: list[str]) -> bool:
    """Whether the folders may come from an exactly_once run: it says so, or nothing
    says (folders of a version that noted no guarantee)."""
    try:
        return (tabledir / GUARANTEE_FILE).read_text().strip() == "exactly_once"
    except OSError:
        return any(table_folders(tabledir, table_names).values())


def note_guarantee(tabledir: Path, is_exactly_once: bool) -> None:
    """Note this run's guarantee (durably) for the next start."""
    guarantee = "exactly_once" if is_exactly_once else "at_least_once"
    path = tabledir / GUARANTEE_FILE
    try:
        if path.read_text().strip() == guarantee:
            return
    except OSError:
        pass
    write_file_durably(path, guarantee.encode())


async def _decide_local_state() -> None:
    decide_local_state()


app.start_checks.append(_decide_local_state)


UNUSED = UnusedFolders()


def remove_unused_folders() -> list[Path]:
    """Remove the folders of table partitions this worker has not had (active or
    standby) for ``state_cleanup_delay`` seconds; returns them. Nothing before its first
    assignment or while it rebalances (the folders it is about to get back are not
    assigned yet). No await between the look at the assignment and the renames: a
    partition cannot be assigned or opened in between; the renamed folders are deleted
    in a thread."""
    if app.rebalancing or app.consumer_generation_id <= 0:
        return []
    assignor = app.assignor
    assigned = assignor.assigned_actives() | assignor.assigned_standbys()
    tabledir = Path(app.conf.tabledir)
    due = UNUSED.due(tabledir, partitions_in_use(app.tables, assigned), time.monotonic(),
                     settings.state_cleanup_delay)
    tables = {table.name: table for table in app.tables.values()}
    gone = []
    for name, partition, folder in due:
        _transport.release_partition(tables[name], partition)
        doomed = folder.with_name(f"{folder.name}{DELETING}{time.time_ns()}")
        try:
            folder.rename(doomed)
        except FileNotFoundError:
            continue
        asyncio.get_running_loop().run_in_executor(None, functools.partial(shutil.rmtree, doomed, True))
        gone.append(folder)
    return gone


@app.timer(interval=max(1.0, min(60.0, settings.state_cleanup_delay / 2)))
async def _remove_unused_folders() -> None:
    for folder in remove_unused_folders():
        log.info("removed the local state of a table partition not assigned here for over %.0f s "
                 "(state_cleanup_delay): %s", settings.state_cleanup_delay, folder.name)


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


__all__ = ["MARKER", "decide_local_state", "discard_local_state", "fingerprint", "marker_after_clean_stop",
           "outdated_folders", "remove_unused_folders", "take_marker", "table_folders", "UnusedFolders",
           "write_file_durably", "write_marker"]
