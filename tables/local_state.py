"""Local RocksDB state under exactly_once: restored from the changelog at every start.

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
every table's local folders are deleted at worker init, before any store opens, as Kafka
Streams wipes an exactly-once store after an unclean shutdown. The price is a full
restore of each table at each start. Under at_least_once the local state is kept: its
writes follow their changelog acks, so it never holds more than the changelog.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from app import app, settings
from app.commit import exactly_once

log = logging.getLogger(__name__)


def discard_local_state(tabledir: Path, table_names: list[str]) -> list[Path]:
    """Delete the local RocksDB folders (``<name>-<partition>.db``, ``<name>-backups``)
    of the given tables; returns what was deleted."""
    gone: list[Path] = []
    patterns = [re.compile(rf"{re.escape(n)}-(\d+\.db|backups)") for n in table_names]
    if not tabledir.is_dir():
        return gone
    for path in tabledir.iterdir():
        if path.is_dir() and any(p.fullmatch(path.name) for p in patterns):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


@app.on_worker_init.connect
def exactly_once_state_from_changelog(sender: Any = None, **kwargs: Any) -> None:
    """Under exactly_once, delete the local state of every table of the app.

    Faust sends ``on_worker_init`` after autodiscovery, so every table is declared by
    then (windows, the aggregate API, pipelines' dedupe memory, the pattern engine)."""
    if not exactly_once(settings):
        return
    names = sorted(table.name for table in app.tables.values())
    gone = discard_local_state(Path(app.conf.tabledir), names)
    if gone:
        log.info("exactly_once: %d local table folders deleted, restoring from the changelogs", len(gone))


__all__ = ["discard_local_state", "exactly_once_state_from_changelog"]
