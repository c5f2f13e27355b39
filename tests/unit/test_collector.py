"""Startup objects frozen out of the garbage collector's full collections, and back."""

from __future__ import annotations

import gc

from wsd.collector import freeze_startup_objects, thaw_startup_objects


def test_freeze_exempts_what_exists_and_thaw_gives_it_back() -> None:
    alive = [[] for _ in range(1000)]  # tracked containers
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() >= len(alive)
        # A full collection no longer walks them: what it sees is what came after.
        assert len(gc.get_objects(generation=2)) < frozen
    finally:
        thaw_startup_objects()
    assert gc.get_freeze_count() == 0
    assert alive
