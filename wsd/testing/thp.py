"""Shmem THP for kernel tests: the sysfs knobs, and a collapse made on demand (root, VM)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import time
from collections.abc import Iterator
from pathlib import Path

from wsd.kernel import map_shared

THP = Path("/sys/kernel/mm/transparent_hugepage")
SHMEM_ENABLED = THP / "shmem_enabled"
KHUGEPAGED = THP / "khugepaged"
HPAGE = 2 << 20
MADV_COLLAPSE = 25  # not in Python 3.11's mmap module


def _selected(knob: Path) -> str:
    """The bracketed choice of a sysfs knob like ``always [never] deny``."""
    return next(w[1:-1] for w in knob.read_text().split() if w.startswith("["))


@contextlib.contextmanager
def shmem_thp(setting: str) -> Iterator[None]:
    """``shmem_enabled`` set to ``setting`` (``always``, ``never``...), restored after."""
    old = _selected(SHMEM_ENABLED)
    SHMEM_ENABLED.write_text(setting + "\n")
    try:
        yield
    finally:
        SHMEM_ENABLED.write_text(old + "\n")


@contextlib.contextmanager
def eager_khugepaged(sleep_ms: int = 100, pages: int = 8192) -> Iterator[None]:
    """khugepaged waking every ``sleep_ms`` (default 10 s) to scan ``pages``: collapses
    then happen within a short test, not once a minute."""
    knobs = {
        "scan_sleep_millisecs": str(sleep_ms),
        "alloc_sleep_millisecs": str(sleep_ms),
        "pages_to_scan": str(pages),
    }
    old = {k: (KHUGEPAGED / k).read_text().strip() for k in knobs}
    try:
        for k, v in knobs.items():
            (KHUGEPAGED / k).write_text(v + "\n")
        yield
    finally:
        for k, v in old.items():
            (KHUGEPAGED / k).write_text(v + "\n")


def collapse(memfd: int, offset: int, attempts: int = 20) -> None:
    """Make the memfd's 2 MiB at ``offset`` one THP in the page cache, as khugepaged does.

    Through a mapping of our own (``MADV_COLLAPSE`` on it), so any other
    process mapping those pages has its PTEs for them unmapped, as when
    khugepaged collapses a range.  Needs shmem THP enabled (not ``never``),
    which also makes the kernel place the mapping 2 MiB-aligned.  Retries
    while the kernel says EAGAIN (pages briefly off the LRU).
    """
    for attempt in range(attempts):
        m = map_shared(memfd, HPAGE, offset)
        try:
            probe = ctypes.c_char.from_buffer(m)
            address = ctypes.addressof(probe)
            del probe  # an exported buffer would keep the mapping from closing
            if address % HPAGE:
                raise OSError(errno.EINVAL, f"mapping at {address:#x} is not 2 MiB-aligned")
            m.madvise(MADV_COLLAPSE)
            return
        except OSError as e:
            if e.errno != errno.EAGAIN or attempt == attempts - 1:
                raise
        finally:
            m.close()
        time.sleep(0.05)
