"""Local table state under exactly_once (tables/local_state.py): which folders go."""

from __future__ import annotations

import pytest

import tables.local_state as local_state


def test_exactly_once_discards_only_the_named_tables_local_state(tmp_path):
    for name in ("window-t-0.db", "window-t-3.db", "window-t-backups", "window-t-x-0.db",
                 "window-tt-0.db", "aggregate-api-1.db", "pattern-state-0.db"):
        (tmp_path / name).mkdir()
    gone = local_state.discard_local_state(tmp_path, ["window-t", "aggregate-api"])
    assert sorted(p.name for p in gone) == ["aggregate-api-1.db", "window-t-0.db", "window-t-3.db",
                                            "window-t-backups"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pattern-state-0.db", "window-t-x-0.db",
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
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee=guarantee))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    monkeypatch.setattr(local_state, "AT_START", [])  # a fresh process
    local_state.decide_local_state()
    left = sorted(p.name for p in tmp_path.iterdir())
    if guarantee == "exactly_once":
        assert left == ["unrelated-0.db"]
    else:
        assert len(left) == len(names) + 1


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
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    # A second call in the same process changes nothing.
    local_state.decide_local_state()
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    monkeypatch.setattr(local_state, "AT_START", [])  # the next process (e.g. after a kill -9)
    local_state.decide_local_state()
    assert list(tmp_path.iterdir()) == []


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
    before = sorted(p.name for p in tmp_path.iterdir())
    app.on_worker_init.send()
    assert sorted(p.name for p in tmp_path.iterdir()) == before and marker.exists()
    assert local_state._decide_local_state in app.start_checks


def age(folder, seconds):
    """Make every file of ``folder`` (and the folder) look last written ``seconds`` ago."""
    import os
    import time

    when = time.time() - seconds
    for path in (*folder.rglob("*"), folder):
        os.utime(path, (when, when))


def test_a_folder_unused_here_is_removed_once_unwritten_for_the_cleanup_delay(tmp_path):
    """Kafka Streams' state cleaner: a partition this worker neither owns nor keeps as a
    standby would, when it came back after the changelog dropped a deletion's tombstone
    (delete.retention.ms), keep the deleted key for ever. Its folder goes once unused
    and unwritten for the delay; owned, open and recently written ones stay."""
    import time

    for p in range(5):
        folder = tmp_path / f"dedupe-{p}.db"
        folder.mkdir()
        (folder / "000001.sst").write_bytes(b"x")
        age(folder, 3600 if p != 3 else 5)
    (tmp_path / "dedupe-backups").mkdir()
    age(tmp_path / "dedupe-backups", 3600)
    in_use = {"dedupe": {0, 2}}  # 0 owned, 2 open (e.g. a standby)
    gone = local_state.unused_folders(tmp_path, in_use, time.time(), delay=600)
    assert sorted(p.name for p in gone) == ["dedupe-1.db", "dedupe-4.db"]  # 3: written 5 s ago


def test_partitions_in_use_are_the_open_and_the_assigned_ones_of_rocksdb_tables():
    from types import SimpleNamespace

    from faust.types import TP

    def table(name, topic, dbs):
        return SimpleNamespace(name=name, data=SimpleNamespace(_dbs=dbs) if dbs is not None else object(),
                               changelog_topic=SimpleNamespace(get_topic_name=lambda: topic))

    tables = {"a": table("a", "a-changelog", {5: object()}), "m": table("m", "m-changelog", None)}
    assigned = {TP("a-changelog", 1), TP("src", 2), TP("m-changelog", 0)}
    assert local_state.partitions_in_use(tables, assigned) == {"a": {1, 5}}


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_at_start_a_folder_that_caught_up_too_long_ago_is_restored_in_full(tmp_path, monkeypatch, guarantee):
    """At start (the worker was stopped for longer than the changelogs keep tombstones),
    a folder is kept only if it caught up within local_state_max_age: at its marker's
    time after a clean stop, else at its newest write."""
    from app import app

    names = sorted(t.name for t in app.tables.values())
    fake_tables(tmp_path, names)
    old, fresh = names[0], names[1]
    age(tmp_path / f"{old}-0.db", 13 * 3600)
    monkeypatch.setattr(local_state, "settings", local_state.settings.replace(processing_guarantee=guarantee))
    monkeypatch.setattr(type(app.conf), "tabledir", property(lambda conf: tmp_path))
    monkeypatch.setattr(local_state, "AT_START", [])
    local_state.decide_local_state()
    left = {p.name for p in tmp_path.iterdir()}
    if guarantee == "at_least_once":  # no marker: each folder's newest write
        assert f"{old}-0.db" not in left and f"{fresh}-0.db" in left
        assert len(left) == len(names) - 1
    # A clean stop 13 h ago: the marker's time counts, so every folder goes.
    fake_tables(tmp_path, [n for n in names if f"{n}-0.db" not in {p.name for p in tmp_path.iterdir()}])
    local_state.write_marker(tmp_path, local_state.settings.app_id, names)
    age(tmp_path / local_state.MARKER, 13 * 3600)
    monkeypatch.setattr(local_state, "AT_START", [])
    local_state.decide_local_state()
    assert list(tmp_path.iterdir()) == []
