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
    local_state.exactly_once_state_from_changelog()
    left = sorted(p.name for p in tmp_path.iterdir())
    if guarantee == "exactly_once":
        assert left == ["unrelated-0.db"]
    else:
        assert len(left) == len(names) + 1
