"""Keep the cyclic garbage collector's full collections short: they run on the event loop.

A full (generation 2) collection walks every object the collector tracks,
on whichever thread triggered it, holding the GIL throughout.  In wsd that
is usually the event loop thread, so every fault that arrives meanwhile
waits.  The modules the daemon imports alone make about 60,000 tracked
objects, and one full collection of them took 55 to 60 ms on the 2-vCPU
development VM (docs/benchmarks.md, "Garbage collection").

What is alive once the daemon is set up (modules, classes, the
configuration, the store) lives as long as the process, so the collector
gains nothing by walking it again: :func:`freeze_startup_objects` moves it
to the permanent generation.  Reference counting still frees a frozen
object as soon as nothing refers to it; only a reference cycle among frozen
objects would no longer be collected.

Per-page state must not bring the walk back: the zstd tier keeps its pages
in exact tuples of bytes and numbers, which the collector stops tracking
(``wsd/storage/zstd_store.py``), and the page maps are numpy arrays.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_objects", "thaw_startup_objects"]


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections.

    Returns how many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_startup_objects() -> None:
    """Give the frozen objects back to the collector (``gc.unfreeze``)."""
    gc.unfreeze()
