"""``PAGEMAP_SCAN`` on ``/proc/<pid>/pagemap``, results as numpy arrays.

The ioctl walks a virtual range of the target mm and reports runs of pages
whose ``PAGE_IS_*`` categories match.  ``category_inverted`` flips bits before
matching, ``category_mask`` requires all of its bits, ``category_anyof_mask``
at least one, and ``return_mask`` picks which bits are reported.  When the
output vector fills up (or ``max_pages`` is reached) the kernel stops early and
says where in ``walk_end``; :meth:`Pagemap.scan` resumes from there so callers
always see the whole range.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from wsd.pages import mark_runs

from . import ioctl_numbers as nr
from ._ffi import ffi, libc
from .errors import AddressRange, FeatureUnavailable, oserror
from .fds import OwnedFd

__all__ = ["REGION_DTYPE", "PageCategory", "Pagemap", "ScanFlag", "ScanResult"]


class PageCategory(enum.IntFlag):
    """``PAGE_IS_*``."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
    GUARD = 1 << 8
    ACCESSED = 1 << 9  # Linux 7.3: not RWP-protected since the last RWPROTECT


class ScanFlag(enum.IntFlag):
    """``PM_SCAN_*``."""

    WP_MATCHING = 1 << 0
    CHECK_WPASYNC = 1 << 1


REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
assert REGION_DTYPE.itemsize == ffi.sizeof("struct page_region")

Regions = npt.NDArray[np.void]


class ScanQuery(TypedDict, total=False):
    """What :meth:`Pagemap.scan` passes on to :meth:`Pagemap.scan_calls`."""

    category_mask: PageCategory
    inverted: PageCategory
    anyof: PageCategory
    return_mask: PageCategory | None
    flags: ScanFlag
    max_pages: int


# max_pages counts base pages, whatever the mapping granularity.
_BASE_PAGE = np.uint64(os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class ScanResult:
    """Matching page runs of one scan: a structured array of (start, end, categories)."""

    regions: Regions
    walk_end: int

    @property
    def starts(self) -> npt.NDArray[np.uint64]:
        return self.regions["start"]

    @property
    def ends(self) -> npt.NDArray[np.uint64]:
        return self.regions["end"]

    @property
    def categories(self) -> npt.NDArray[np.uint64]:
        return self.regions["categories"]

    def __len__(self) -> int:
        return len(self.regions)

    def page_count(self, page_size: int) -> int:
        return int(((self.ends - self.starts) // np.uint64(page_size)).sum())

    def page_indices(self, base: int, page_size: int) -> npt.NDArray[np.int64]:
        """Indices ``(addr - base) // page_size`` of every matching page, ascending."""
        first = ((self.starts - np.uint64(base)) // np.uint64(page_size)).astype(np.int64)
        counts = ((self.ends - self.starts) // np.uint64(page_size)).astype(np.int64)
        if not len(first):
            return np.empty(0, dtype=np.int64)
        # Expand runs without a Python loop: an arange, shifted per run.
        offsets = np.repeat(first - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        return np.arange(int(counts.sum()), dtype=np.int64) + offsets

    def bitmap(
        self,
        base: int,
        npages: int,
        page_size: int,
        *,
        out: npt.NDArray[np.bool_] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """A boolean array of ``npages`` pages from ``base``, true where a page matched.

        ``out``, if given, must hold ``npages`` and is overwritten and returned.
        """
        if out is None:
            out = np.zeros(npages, dtype=np.bool_)
        elif out.shape != (npages,) or out.dtype != np.bool_:
            raise ValueError(f"out is {out.dtype} of shape {out.shape}, expected ({npages},) bool")
        else:
            out.fill(False)
        self.mark(base, page_size, out)
        return out

    def mark(self, base: int, page_size: int, out: npt.NDArray[np.bool_]) -> None:
        """Set ``out[i]`` for every matching page ``i`` (counted from ``base``); others stay.

        Only ``out`` between this result's first and last matching page is
        written, so the results of successive calls of :meth:`Pagemap.scan_calls`
        can be marked into one bitmap.  One C loop (:func:`wsd.pages.mark_runs`):
        numpy needed several passes and temporaries the size of the hot set.
        """
        mark_runs(self.regions, base, page_size, out)


def _merge_adjacent(regions: Regions) -> Regions:
    """Join runs that touch and share categories (a resume can split one run in two)."""
    if len(regions) < 2:
        return regions
    joins = (regions["start"][1:] == regions["end"][:-1]) & (
        regions["categories"][1:] == regions["categories"][:-1]
    )
    if not joins.any():
        return regions
    keep = np.concatenate(([True], ~joins))
    merged = regions[keep].copy()
    # The end of each kept run is the end of the last run folded into it.
    last_of_group = np.concatenate((np.flatnonzero(keep)[1:] - 1, [len(regions) - 1]))
    merged["end"] = regions["end"][last_of_group]
    return merged


class Pagemap(OwnedFd):
    """An open ``/proc/<pid>/pagemap``.  Reading another process's needs ptrace access."""

    def __init__(self, fd: int, pid: int | None = None) -> None:
        super().__init__(fd)
        self.pid = pid

    @classmethod
    def open(cls, pid: int | str = "self", *, proc: Path = Path("/proc")) -> Self:
        path = proc / str(pid) / "pagemap"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise oserror(
                "open",
                e.errno or errno.EIO,
                pid=pid if isinstance(pid, int) else None,
                detail=str(path),
            ) from e
        return cls(fd, pid if isinstance(pid, int) else None)

    def scan(
        self, start: int, length: int, *, vec_len: int = 4096, **query: Unpack[ScanQuery]
    ) -> ScanResult:
        """Scan ``[start, start + length)``; see the module docstring for the masks.

        ``return_mask`` defaults to ``category_mask | anyof``.  With
        ``max_pages`` the scan stops after that many pages and ``walk_end``
        tells where; otherwise the walk is resumed until the range ends.
        """
        chunks: list[Regions] = []
        walk_end = start
        vec = np.empty(vec_len, dtype=REGION_DTYPE)
        for res in self.scan_calls(start, length, vec=vec, **query):
            chunks.append(res.regions.copy())
            walk_end = res.walk_end
        if len(chunks) == 1:
            # One call: the kernel already joined runs with equal categories.
            return ScanResult(regions=chunks[0], walk_end=walk_end)
        return ScanResult(regions=_merge_adjacent(np.concatenate(chunks)), walk_end=walk_end)

    def scan_calls(
        self,
        start: int,
        length: int,
        *,
        vec: Regions,
        category_mask: PageCategory = PageCategory(0),
        inverted: PageCategory = PageCategory(0),
        anyof: PageCategory = PageCategory(0),
        return_mask: PageCategory | None = None,
        flags: ScanFlag = ScanFlag(0),
        max_pages: int = 0,
    ) -> Iterator[ScanResult]:
        """The results of each ``PAGEMAP_SCAN`` call of :meth:`scan`, into ``vec``.

        Each result is a view of ``vec`` (a ``REGION_DTYPE`` array), valid
        until the next one is asked for: memory stays bounded by ``vec``
        however fragmented the matching pages are.  A run may be split
        between two results.
        """
        if vec.dtype != REGION_DTYPE or vec.ndim != 1 or not len(vec):
            raise ValueError(f"vec must be a non-empty 1-d array of {REGION_DTYPE}")
        if return_mask is None:
            return_mask = category_mask | anyof
        end = start + length
        # Each call its own argument: a walk in a worker thread and a fault's
        # check on the loop may scan at once.
        arg = ffi.new("struct pm_scan_arg *")
        pos = start
        pages_left = max_pages
        vec_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(vec)))
        while True:
            arg.size = ffi.sizeof("struct pm_scan_arg")
            arg.flags = int(flags)
            arg.start = pos
            arg.end = end
            arg.walk_end = 0
            arg.vec = vec_addr
            arg.vec_len = len(vec)
            arg.max_pages = pages_left
            arg.category_inverted = int(inverted)
            arg.category_mask = int(category_mask)
            arg.category_anyof_mask = int(anyof)
            arg.return_mask = int(return_mask)
            n = libc.ioctl(self.fd, nr.PAGEMAP_SCAN, arg)
            if n < 0:
                err = ffi.errno
                if err == errno.ENOTTY:
                    raise FeatureUnavailable("PAGEMAP_SCAN", "Linux 6.7", err=err)
                raise oserror(
                    "PAGEMAP_SCAN",
                    err,
                    range=AddressRange(pos, end - pos),
                    pid=self.pid,
                    detail=f"categories {category_mask!r}",
                )
            found = vec[:n]
            covered = max(int(arg.walk_end), int(found["end"][-1]) if n else 0)
            done = False
            if max_pages:
                pages_left -= int(((found["end"] - found["start"]) // _BASE_PAGE).sum())
                done = pages_left <= 0
            if not done and n < len(vec):
                # The kernel stops a walk early only when the vector is full
                # (or max_pages is reached), so a vector with room left means
                # the walk reached the end.  walk_end alone cannot say so: see
                # below.  Without this, a complete walk was scanned again from
                # a stale walk_end (two PAGEMAP_SCAN calls a cycle).
                covered = end
            # Resume after whatever was covered.  The kernel walks in chunks and
            # flushes its bounce buffer (512 regions) between them; when a later
            # chunk completes the walk, walk_end keeps the stale stop address of
            # the earlier chunk (seen on 6.18), although regions past it were
            # reported.  Rescanning from there would report those twice.
            done = done or covered >= end or covered <= pos
            yield ScanResult(regions=found, walk_end=min(covered, end))
            if done:
                return
            pos = covered
