"""The steps of one eviction batch that touch guest memory, in the order that keeps it safe.

1. :func:`read_pages`: ``pread`` the pages from the memfd (never through the
   VMM's registered mapping, so reading faults nothing; RWP-FACTS fact 5);
2. the caller ``put``\\ s them and waits for ``sync``;
3. the caller records them as evicted (and persists the page map);
4. :func:`punch_and_wake`: punch the holes, then ``UFFDIO_WAKE`` each range.
   The wake is mandatory: a vCPU that blocked on one of these pages during the
   sync window stays blocked forever without it.  Woken, it re-faults as
   MISSING and is served from storage.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from wsd.kernel import Userfaultfd, data_ranges, pread_into, punch_hole
from wsd.vmm.protocol import Region


def runs(pages: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive pages in an ascending array."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def read_pages(memfd: int, region: Region, pages: npt.NDArray[np.int64]) -> dict[int, bytes]:
    """The bytes of ``pages`` (ascending), keyed by byte offset within the region.

    Blocking: run it in a thread.  One ``pread`` per run of consecutive pages.
    """
    ps = region.page_size
    out: dict[int, bytes] = {}
    for first, count in runs(pages):
        buf = bytearray(count * ps)
        pread_into(memfd, buf, region.offset + first * ps)
        view = memoryview(buf)
        for k in range(count):
            out[(first + k) * ps] = bytes(view[k * ps : (k + 1) * ps])
    return out


def punch_and_wake(
    uffd: Userfaultfd, memfd: int, region: Region, pages: npt.NDArray[np.int64]
) -> None:
    """Drop ``pages`` (ascending, already durable in storage) and wake their waiters."""
    ps = region.page_size
    spans = runs(pages)
    try:
        for first, count in spans:
            punch_hole(memfd, region.offset + first * ps, count * ps)
    finally:
        # Also after a failed punch: a waiter on a punched page must not stay
        # blocked, and one on an unpunched page just re-faults.
        for first, count in spans:
            uffd.wake(region.host_virt_addr + first * ps, count * ps)


def not_punched(memfd: int, region: Region, pages: npt.NDArray[np.int64]) -> list[int]:
    """Which of ``pages`` (ascending, just punched) still hold data in the memfd.

    A 4 KiB punch inside a shmem THP zeroes the range and then tries to split
    the huge page; when the split fails (the folio has extra references) the
    zeroed 4 KiB stays in the page cache instead of becoming a hole.  Costs one
    SEEK_DATA/SEEK_HOLE walk per run.
    """
    ps = region.page_size
    left: list[int] = []
    for first, count in runs(pages):
        start = region.offset + first * ps
        for b, e in data_ranges(memfd, start, start + count * ps):
            left.extend(range((b - region.offset) // ps, -(-(e - region.offset) // ps)))
    return left
