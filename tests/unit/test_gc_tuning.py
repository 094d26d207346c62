"""app/gc_tuning.py: what start-up built is frozen, out of every collection's walk."""

import gc

from app.gc_tuning import freeze_heap


def test_freeze_heap_moves_live_objects_to_the_permanent_generation():
    try:
        kept = [object() for _ in range(10)]
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert kept
    finally:
        gc.unfreeze()


def test_gc_thresholds_setting_parses_and_refuses_bad_values():
    import pytest

    from app.settings import Settings, SettingsError

    assert Settings().gc_threshold_values() == (50_000, 20, 100)
    assert Settings(gc_thresholds="").gc_threshold_values() is None
    for bad in ("1,2", "a,b,c", "0,10,10", "700,10,-1"):
        with pytest.raises(SettingsError, match="gc_thresholds"):
            Settings(gc_thresholds=bad).validate()


def test_collect_if_due_runs_the_collection_cpython_would_have_run():
    from app.gc_tuning import collect_if_due

    was_enabled = gc.isenabled()
    gc.disable()  # so only collect_if_due collects here
    try:
        gc.collect()
        assert collect_if_due((10_000, 20, 100)) is None  # nothing due yet
        keep = [[i] for i in range(2_000)]  # tracked containers: count toward gen0
        assert collect_if_due((1_000, 20, 100)) == 0
        assert gc.get_count()[0] < 1_000 and gc.get_count()[1] >= 1
        keep += [[i] for i in range(2_000)]
        assert collect_if_due((1_000, 1, 100)) == 1  # gen0 passes since the last gen1 pass: due
        assert keep
    finally:
        if was_enabled:
            gc.enable()
