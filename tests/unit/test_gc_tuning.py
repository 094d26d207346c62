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
