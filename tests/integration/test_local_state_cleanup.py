"""A running worker deletes the local state of table partitions it no longer uses
(tables/local_state.py, ``state_cleanup_delay``), against the real broker.

Such a folder, reused when its partition comes back after the changelog dropped a
deletion's tombstone (``delete.retention.ms``), would keep the deleted key for ever.
Here the worker's own folders stay, and a folder of a partition the worker does not
have (as left by an earlier owner of more partitions) goes once unwritten for the
delay."""

from __future__ import annotations

import os
import time

from tests.support import Worker, run, unique, wait_for


def test_a_worker_removes_the_folders_of_partitions_it_does_not_use_and_keeps_its_own():
    prefix = unique("lsc") + "."
    w = Worker(app_id=unique("lsc"), topic_prefix=prefix, env={"STREAMETL_STATE_CLEANUP_DELAY": "2"})
    try:
        w.start()

        async def own_folders() -> list:
            return sorted(w.data_dir.rglob("aggregate-api-*.db")) or None

        own = run(wait_for(own_folders, timeout=60, what="the worker's table folders"))
        assert len(own) == 4, own
        unused = own[0].parent / "aggregate-api-9.db"
        unused.mkdir()
        (unused / "000001.sst").write_bytes(b"x")
        an_hour_ago = time.time() - 3600
        for path in (unused / "000001.sst", unused):
            os.utime(path, (an_hour_ago, an_hour_ago))

        async def removed() -> bool:
            return not unused.exists()

        run(wait_for(removed, timeout=30, what="the unused folder removed"))
        assert all(folder.exists() for folder in own), "a folder of an owned partition was removed"
        assert "state_cleanup_delay" in w.log_tail(400)
    finally:
        w.stop()
