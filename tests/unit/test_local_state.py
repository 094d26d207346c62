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
    local_state.exactly_once_state_from_changelog()
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
    local_state.exactly_once_state_from_changelog()
    kept = sorted(f"{n}-0.db" for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    # A second call in the same process changes nothing.
    local_state.exactly_once_state_from_changelog()
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    monkeypatch.setattr(local_state, "AT_START", [])  # the next process (e.g. after a kill -9)
    local_state.exactly_once_state_from_changelog()
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
