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
