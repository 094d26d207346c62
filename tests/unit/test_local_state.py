"""Local table state under exactly_once (tables/local_state.py): which folders go."""

from __future__ import annotations

import asyncio

import pytest

import tables.local_state as local_state


def test_exactly_once_discards_only_the_named_tables_local_state(tmp_path):
    for name in ("window-t-0.db", "window-t-3.db", "window-t-backups", "window-t-x-0.db",
                 "window-tt-0.db", "aggregate-api-1.db", "pattern-state-0.db"):
        (tmp_path / name).mkdir()
    gone = local_state.discard_local_state(tmp_path, ["window-t", "aggregate-api"])
    assert sorted(p.name for p in gone) == ["aggregate-api-1.db", "window-t-0.db", "window-t-3.db",
                                            "window-t-backups"]
    assert listing(tmp_path) == ["pattern-state-0.db", "window-t-x-0.db",
                                                          "window-tt-0.db"]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_exactly_once_restores_every_tables_state_from_its_changelog(tmp_path, monkeypatch, guarantee):
    """Not only windows: a pipeline's dedupe memory and the pattern engine's state hold
    aborted writes after a kill -9 too, so every table of the app is restored."""
    import tables.patterns  # noqa: F401 - declares the pattern tables
    from app import app

    names = sorted(t.name for t in app.tables.values())
    assert {"pattern-state", "pattern-timers", "pattern-counts", "aggregate-api"} <= set(names)
    for name in names:
        (tmp_path / f"{name}-0.db").mkdir()
    (tmp_path / "unrelated-0.db").mkdir()
    # Killed under the same guarantee (under at_least_once its folders are kept).
    local_state.note_guarantee(tmp_path, guarantee == "exactly_once")
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee=guarantee))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    monkeypatch.setattr(local_state, "AT_START", [])  # a fresh process
    local_state.decide_local_state()
    left = listing(tmp_path)
    if guarantee == "exactly_once":
        assert left == ["unrelated-0.db"]
    else:
        assert len(left) == len(names) + 1


def listing(tabledir) -> list[str]:
    """The table folder's entries but the file naming the last run's guarantee."""
    return sorted(p.name for p in tabledir.iterdir() if p.name != local_state.GUARANTEE_FILE)


def fake_tables(tmp_path, names):
    for name in names:
        folder = tmp_path / f"{name}-0.db"
        folder.mkdir()
        (folder / "000001.log").write_bytes(b"x" * 10)


def test_a_marker_vouches_for_unchanged_folders_and_is_gone_once_taken(tmp_path):
    """The clean-shutdown marker: taken (removed) at start; it vouches only for the
    tables it names whose folders are file for file as when it was written."""
    fake_tables(tmp_path, ["window-a", "window-b", "window-c"])
    local_state.write_marker(tmp_path, "app1", ["window-a", "window-b"])
    (tmp_path / "window-b-0.db" / "000001.log").write_bytes(b"x" * 11)  # written after the marker
    trusted = local_state.take_marker(tmp_path, "app1", ["window-a", "window-b", "window-c"])
    assert trusted == {"window-a"}
    assert not (tmp_path / local_state.MARKER).exists()
    # Taken once: a second start (e.g. after a kill -9 of the first) finds none.
    assert local_state.take_marker(tmp_path, "app1", ["window-a"]) == set()


@pytest.mark.parametrize("content", [b"{not json", b'{"app_id": "other", "tables": {}}', b"[]"])
def test_a_foreign_or_broken_marker_vouches_for_nothing(tmp_path, content):
    fake_tables(tmp_path, ["window-a"])
    (tmp_path / local_state.MARKER).write_bytes(content)
    assert local_state.take_marker(tmp_path, "app1", ["window-a"]) == set()
    assert not (tmp_path / local_state.MARKER).exists()


def test_exactly_once_keeps_the_state_a_marker_vouches_for_and_only_once(tmp_path, monkeypatch):
    """A clean stop's marker keeps every table's local state at the next start (no full
    restore); that start removed the marker, so the start after it (as after a kill -9)
    restores every table in full."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    fake_tables(tmp_path, names)
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee="exactly_once"))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    local_state.write_marker(tmp_path, local_state.settings.app_id, names)
    monkeypatch.setattr(local_state, "AT_START", [])  # a fresh process
    local_state.decide_local_state()
    kept = sorted(f"{n}-0.db" for n in names)
    assert listing(tmp_path) == kept
    # A second call in the same process changes nothing.
    local_state.decide_local_state()
    assert listing(tmp_path) == kept
    monkeypatch.setattr(local_state, "AT_START", [])  # the next process (e.g. after a kill -9)
    local_state.decide_local_state()
    assert listing(tmp_path) == []


def test_a_command_beside_a_worker_neither_takes_its_marker_nor_deletes_its_tables(tmp_path, monkeypatch):
    """Every ``streametl`` command sends Faust's ``on_worker_init`` (``show-settings``,
    ``check-config``); only the worker's app start decides the local state."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    fake_tables(tmp_path, names)
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee="exactly_once"))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    marker = local_state.write_marker(tmp_path, local_state.settings.app_id, names)
    monkeypatch.setattr(local_state, "AT_START", [])  # a fresh process
    before = listing(tmp_path)
    app.on_worker_init.send()
    assert listing(tmp_path) == before and marker.exists()
    assert local_state._decide_local_state in app.start_checks


def age(folder, seconds):
    """Make every file of ``folder`` (and the folder) look last written ``seconds`` ago."""
    import os
    import time

    when = time.time() - seconds
    for path in (*folder.rglob("*"), folder):
        os.utime(path, (when, when))


def test_a_folder_unused_here_is_removed_once_unused_for_the_cleanup_delay(tmp_path):
    """Kafka Streams' state cleaner: a partition this worker neither owns nor keeps as a
    standby would, when it came back after the changelog dropped a deletion's tombstone
    (delete.retention.ms), keep the deleted key for ever. Its folder goes once this
    worker has seen it unused for the delay, whatever the folder's time (an open RocksDB
    keeps writing its log); one in use again starts over; backups stay."""
    for p in range(4):
        (tmp_path / f"dedupe-{p}.db").mkdir()
    (tmp_path / "dedupe-backups").mkdir()
    (tmp_path / "other-0.db").mkdir()  # a table not looked at
    unused = local_state.UnusedFolders()

    def due(in_use, now):
        return sorted(f"{name}-{p}" for name, p, _ in unused.due(tmp_path, {"dedupe": in_use}, now, delay=600))

    assert due({0, 1}, now=1000) == []  # 2 and 3 first seen unused
    assert due({0, 1, 3}, now=1300) == []  # 3 in use again
    assert due({0, 1}, now=1599) == []
    assert due({0, 1}, now=1600) == ["dedupe-2"]
    (tmp_path / "dedupe-2.db").rmdir()  # as the cleaner does
    assert due({0, 1}, now=2198) == []  # 3: seen unused again at 1599
    assert due({0, 1}, now=2199) == ["dedupe-3"]


def test_partitions_in_use_are_the_assigned_ones_of_rocksdb_tables():
    """Open but not assigned (a write that straddled its revocation reopened it) is not
    in use: such a folder is no longer fed by its changelog."""
    from types import SimpleNamespace

    from faust.types import TP

    def table(name, topic, dbs):
        return SimpleNamespace(name=name, data=SimpleNamespace(_dbs=dbs) if dbs is not None else object(),
                               changelog_topic=SimpleNamespace(get_topic_name=lambda: topic))

    tables = {"a": table("a", "a-changelog", {5: object()}), "m": table("m", "m-changelog", None)}
    assigned = {TP("a-changelog", 1), TP("src", 2), TP("m-changelog", 0)}
    assert local_state.partitions_in_use(tables, assigned) == {"a": {1}}


def test_the_cleaner_waits_for_the_first_assignment_and_for_a_rebalance_to_end(tmp_path, monkeypatch):
    """Before the first assignment, or during a rebalance, the folders the worker is
    about to get back are not assigned yet: none may go. Once assigned, a folder it
    does not have goes after the delay, and an open one is dropped from its store."""
    from types import SimpleNamespace

    from faust.types import TP

    (tmp_path / "t-0.db").mkdir()
    (tmp_path / "t-1.db").mkdir()
    open_dbs = {0: object(), 1: object()}
    table = SimpleNamespace(name="t", data=SimpleNamespace(_dbs=open_dbs),
                            changelog_topic=SimpleNamespace(get_topic_name=lambda: "t-changelog"))
    assignor = SimpleNamespace(assigned_actives=lambda: {TP("t-changelog", 0)}, assigned_standbys=set)
    fake = SimpleNamespace(rebalancing=False, consumer_generation_id=0, assignor=assignor,
                           tables={"t": table}, conf=SimpleNamespace(tabledir=tmp_path))
    monkeypatch.setattr(local_state, "app", fake)
    monkeypatch.setattr(local_state, "UNUSED", local_state.UnusedFolders())
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(state_cleanup_delay=0.001))

    async def main():
        assert local_state.remove_unused_folders() == []  # no assignment yet
        fake.consumer_generation_id = 3
        fake.rebalancing = True
        assert local_state.remove_unused_folders() == []
        fake.rebalancing = False
        local_state.remove_unused_folders()  # t-1 first seen unused
        await asyncio.sleep(0.01)
        assert local_state.remove_unused_folders() == [tmp_path / "t-1.db"]
        for _ in range(100):  # deleted in a thread
            if listing(tmp_path) == ["t-0.db"]:
                break
            await asyncio.sleep(0.01)
        assert listing(tmp_path) == ["t-0.db"]
        assert list(open_dbs) == [0]

    asyncio.run(main())


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_at_start_a_folder_last_written_too_long_ago_is_restored_in_full(tmp_path, monkeypatch, guarantee):
    """At start (the worker was stopped for longer than the changelogs keep tombstones),
    a folder is kept only if written within local_state_max_age, whatever the marker
    says: a fresh clean stop vouches for what the folder holds, not for how long ago
    it followed its changelog."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    fake_tables(tmp_path, names)
    old = names[0]
    age(tmp_path / f"{old}-0.db", 13 * 3600)
    (tmp_path / f"{names[1]}-2.db{local_state.DELETING}123").mkdir()  # a removal cut short
    local_state.write_marker(tmp_path, local_state.settings.app_id, names)  # a clean stop just now
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee=guarantee))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    monkeypatch.setattr(local_state, "AT_START", [])
    local_state.decide_local_state()
    left = listing(tmp_path)
    # The marker vouches for the others under exactly_once too.
    assert left == sorted(f"{n}-0.db" for n in names if n != old)


def start_worker(monkeypatch, tabledir, guarantee: str) -> None:
    """A worker process starting under ``guarantee`` with ``tabledir``: it decides the
    local state."""
    from app import app

    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tabledir))
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee=guarantee))
    monkeypatch.setattr(local_state, "AT_START", [])  # a fresh process
    local_state.decide_local_state()


@pytest.mark.parametrize("stop", ["killed", "clean"])
def test_an_at_least_once_start_after_an_exactly_once_run_keeps_only_what_the_marker_vouches_for(
        tmp_path, monkeypatch, stop):
    """A run killed under exactly_once leaves aborted writes in its folders; at_least_once
    keeps its folders, so switching the guarantee applied them as committed (a count
    counted twice). The first at_least_once start after an exactly_once run keeps only
    what a clean stop's marker vouches for; the starts after it keep their folders."""
    from app import app

    names = sorted(t.name for t in app.tables.values())

    def start(guarantee: str) -> None:
        start_worker(monkeypatch, tmp_path, guarantee)

    start("exactly_once")  # nothing there yet: this run's guarantee is noted
    fake_tables(tmp_path, names)
    if stop == "clean":
        local_state.write_marker(tmp_path, local_state.settings.app_id, names)
    start("at_least_once")
    kept = sorted(f"{n}-0.db" for n in names)
    assert listing(tmp_path) == (kept if stop == "clean" else [])
    fake_tables(tmp_path, [n for n in names if not (tmp_path / f"{n}-0.db").exists()])
    start("at_least_once")  # killed under at_least_once: its folders stay
    assert listing(tmp_path) == kept


def test_a_start_killed_while_it_discarded_an_exactly_once_runs_folders_leaves_them_to_the_next(
        tmp_path, monkeypatch):
    """The guarantee is noted only once the folders are gone: noted first, a start
    killed during the deletes (found by a review: an rmtree raising) left the next
    at_least_once start to keep them, the marker already taken."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    local_state.note_guarantee(tmp_path, True)  # killed under exactly_once
    fake_tables(tmp_path, names)

    def killed(tabledir, table_names):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(local_state, "discard_local_state", killed)
    with pytest.raises(KeyboardInterrupt):
        start_worker(monkeypatch, tmp_path, "at_least_once")
    monkeypatch.undo()
    start_worker(monkeypatch, tmp_path, "at_least_once")
    assert listing(tmp_path) == []


def test_folders_of_a_version_that_noted_no_guarantee_are_kept_only_if_the_marker_vouches(tmp_path, monkeypatch):
    """Without the file, the folders may be a killed exactly_once run's (a worker of the
    version before it): an at_least_once start keeps what a marker vouches for, and
    restores the rest. No folders: nothing to doubt."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    assert not local_state.last_run_may_have_been_exactly_once(tmp_path, names)
    fake_tables(tmp_path, names)
    assert local_state.last_run_may_have_been_exactly_once(tmp_path, names)
    local_state.write_marker(tmp_path, local_state.settings.app_id, names[:1])
    start_worker(monkeypatch, tmp_path, "at_least_once")
    assert listing(tmp_path) == [f"{names[0]}-0.db"]
    assert not local_state.last_run_may_have_been_exactly_once(tmp_path, names)
