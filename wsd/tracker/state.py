"""Per-page working-set state of one guest memory region.

Pure policy: arrays in, arrays out.  No syscalls, no ioctl, no asyncio, no clock
of its own (every cycle passes ``now``).

Each page has three fields, kept as flat numpy arrays so one cycle costs a few
vectorised passes and no Python loop per page:

``age`` (uint8)
    Cycles since the page was last seen accessed, saturating at
    :data:`MAX_AGE` ("255 or more").  Every page starts at 0, so before ``k``
    cycles no age exceeds ``k``: ages are lower bounds until then, which is why
    estimates over longer horizons are reported as not yet valid.
``flags`` (uint8)
    ``RESIDENT`` (in the memfd at the last :meth:`RegionState.observe`, updated
    by eviction and fetch-back) and ``EVICTED`` (its bytes live in storage).
``generation`` (uint32)
    Moves on at each eviction and each removal by the VMM; storage tags each
    copy with it, so a copy (or a fetch, or a prepared eviction) from before
    either is recognisably stale.

That is 6 bytes per page: 1.5 MiB per GiB of 4 KiB pages, 3 KiB per GiB of
hugetlbfs 2 MiB pages.  See ``docs/tracker.md`` ("Tracker state").
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from wsd.pages import age_observe

__all__ = [
    "DEFAULT_AGE_EDGES",
    "DEFAULT_HORIZONS",
    "MAX_AGE",
    "AgeHistogram",
    "Granularity",
    "PageIndices",
    "RegionState",
    "WorkingSetEstimate",
]

MAX_AGE: Final = 255
DEFAULT_HORIZONS: Final = (1, 4, 16, 64)
DEFAULT_AGE_EDGES: Final = (1, 2, 4, 8, 16, 32, 64, 128, 255)

PAGE_4K: Final = 4096
HUGE_2M: Final = 2 * 1024 * 1024

_RESIDENT: Final = np.uint8(1)  # equal to True viewed as uint8: observe() ORs the bitmap in
_EVICTED: Final = np.uint8(2)
_NOT_RESIDENT: Final = np.uint8(0xFF ^ 1)

# Pages per vectorised step.  Large enough that numpy's per-call overhead is
# noise, small enough that the scratch buffers stay in cache and are never
# proportional to the region.
_CHUNK: Final = 1 << 17

PageIndices: TypeAlias = npt.NDArray[np.integer[Any]] | Sequence[int]


class Granularity(enum.StrEnum):
    """How finely the kernel reports and traps accesses in a region (RWP-FACTS 7, 8)."""

    PAGE_4K = "4k"
    """4 KiB mappings: exact per page."""
    HUGE_2M = "hugetlb-2m"
    """hugetlbfs: pages are 2 MiB; RWPROTECT must be 2 MiB-aligned."""
    THP_2M = "thp-2m"
    """4 KiB pages inside PMD-mapped THP: one 4 KiB touch marks the whole 2 MiB."""
    THP_2M_UNTRAPPABLE = "thp-2m-untrappable"
    """PMD-mapped shmem THP without MINOR co-registration: RWPROTECT zaps the
    PMD instead of protecting it and the next access remaps it with no fault,
    even in sync mode.  Accesses still show in scans, so ages and estimates are
    kept, but no page of such a region may ever be evicted."""

    @property
    def granule_bytes(self) -> int:
        """The smallest span one access marks."""
        return PAGE_4K if self is Granularity.PAGE_4K else HUGE_2M

    @property
    def page_size(self) -> int:
        """The page size a region of this granularity is tracked in."""
        return HUGE_2M if self is Granularity.HUGE_2M else PAGE_4K

    @property
    def evictable(self) -> bool:
        return self is not Granularity.THP_2M_UNTRAPPABLE


@dataclass(frozen=True)
class WorkingSetEstimate:
    """Pages touched within the last ``horizon`` intervals."""

    horizon: int
    pages: int | None
    """None until ``horizon`` intervals were observed: it would be an under-count."""
    page_size: int
    window_seconds: float | None
    """Wall time those ``horizon`` intervals spanned (intervals may vary)."""

    @property
    def valid(self) -> bool:
        return self.pages is not None

    @property
    def bytes(self) -> int | None:
        return None if self.pages is None else self.pages * self.page_size


@dataclass(frozen=True)
class AgeHistogram:
    """Resident pages by idle age.

    Bucket ``i`` holds ages in ``[lower_bounds[i], lower_bounds[i + 1])``; the
    last bucket is open-ended.  The buckets add up to every resident page.
    """

    edges: tuple[int, ...]
    pages: tuple[int, ...]
    page_size: int
    observed_cycles: int

    @property
    def lower_bounds(self) -> tuple[int, ...]:
        return (0, *self.edges)

    @property
    def bytes(self) -> tuple[int, ...]:
        return tuple(p * self.page_size for p in self.pages)

    @property
    def resident_bytes(self) -> int:
        return sum(self.pages) * self.page_size

    def idle_bytes(self, threshold: int) -> int | None:
        """Resident bytes idle for at least ``threshold`` cycles (0 or one of ``edges``).

        None while fewer than ``threshold`` cycles were observed: a page
        untouched since the start might have been idle for longer.
        """
        try:
            i = self.lower_bounds.index(threshold)
        except ValueError:
            raise ValueError(f"threshold {threshold} is not 0 or one of {self.edges}") from None
        if threshold > self.observed_cycles:
            return None
        return sum(self.pages[i:]) * self.page_size

    def cumulative(self) -> tuple[tuple[int, int | None], ...]:
        """``(threshold, idle_bytes(threshold))`` for every lower bound."""
        return tuple((t, self.idle_bytes(t)) for t in self.lower_bounds)


@dataclass(frozen=True)
class _IdleCounts:
    version: int
    pages_at_least_horizon: npt.NDArray[np.int64]
    resident_at_least_edge: npt.NDArray[np.int64]
    resident: int


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _CHUNK):
        yield slice(start, min(start + _CHUNK, n))


def _check_thresholds(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if any(not 1 <= v <= MAX_AGE for v in out) or any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError(f"{name} {out} must increase strictly within [1, {MAX_AGE}]")
    return out


class RegionState:
    """Ages, residency and eviction generations of the ``npages`` pages of one region.

    The tracker calls :meth:`observe` once per interval with the pages accessed
    in it and the pages present in the memfd; fault handlers call
    :meth:`note_fault` or :meth:`note_access`; the evictor asks
    :meth:`cold_candidates` and reports back with :meth:`note_evicted` and
    :meth:`note_fetched`.  Page indices count ``page_size`` pages from the
    start of the region (for THP, page 0 must be 2 MiB-aligned).
    """

    def __init__(
        self,
        npages: int,
        granularity: Granularity,
        *,
        started_at: float,
        horizons: Sequence[int] = DEFAULT_HORIZONS,
        age_edges: Sequence[int] = DEFAULT_AGE_EDGES,
    ) -> None:
        """``started_at`` is when tracking was first armed: the first interval starts there."""
        self.granularity = granularity
        self.page_size = granularity.page_size
        self._per_granule = granularity.granule_bytes // self.page_size
        if npages < 0 or npages % self._per_granule:
            raise ValueError(
                f"{granularity} region of {npages} pages: must be a whole number of "
                f"{granularity.granule_bytes}-byte granules"
            )
        self.npages = npages
        self.horizons = _check_thresholds("horizons", horizons)
        self.age_edges = _check_thresholds("age_edges", age_edges)
        self.started_at = started_at
        self.cycles = 0
        self.last_cycle_at: float | None = None
        self.faults = 0
        self._age = np.zeros(npages, dtype=np.uint8)
        self._flags = np.zeros(npages, dtype=np.uint8)
        self._generation = np.zeros(npages, dtype=np.uint32)
        self._resident_pages = 0
        self._evicted_pages = 0
        # Accesses noted between two cycles belong to the interval the next
        # observe() closes; they are zeroed again after its increment.
        self._pending: list[npt.NDArray[np.int64]] = []
        self._pending_pages: list[int] = []  # the same, one page at a time (fault path)
        self._cycle_times: deque[float] = deque(
            [started_at], maxlen=max(self.horizons, default=0) + 1
        )
        self._version = 0
        # While a residency walk runs in a thread: the pages wsd changed meanwhile.
        self._walk_changes: list[npt.NDArray[np.int64] | list[int]] | None = None
        self._counts: _IdleCounts | None = None

    # -- read-only views -------------------------------------------------------------

    @property
    def ages(self) -> npt.NDArray[np.uint8]:
        """Idle age of every page (read-only view)."""
        view = self._age.view()
        view.flags.writeable = False
        return view

    @property
    def generations(self) -> npt.NDArray[np.uint32]:
        """Evictions so far of every page, modulo 2**32 (read-only view)."""
        view = self._generation.view()
        view.flags.writeable = False
        return view

    def generation(self, page: int) -> int:
        """One page's generation, without a view of the region's array (fault path)."""
        return int(self._generation[page])

    @property
    def resident(self) -> npt.NDArray[np.bool_]:
        """A copy: which pages are in the memfd."""
        return (self._flags & _RESIDENT).astype(np.bool_)

    @property
    def evicted(self) -> npt.NDArray[np.bool_]:
        """A copy: which pages have their bytes in storage."""
        return (self._flags & _EVICTED).astype(np.bool_)

    @property
    def resident_pages(self) -> int:
        return self._resident_pages

    def is_evicted(self, page: int) -> bool:
        """One page's eviction flag, without copying the region's array (fault path)."""
        return bool(self._flags[page] & _EVICTED)

    def first_evicted(self, limit: int) -> list[int]:
        """Up to ``limit`` evicted pages, lowest first, scanning the region a block
        at a time rather than copying its whole array (8 GiB: 1.8 ms on the loop)."""
        found: list[int] = []
        for chunk in _chunks(self.npages):
            if len(found) >= limit:
                break
            hits = np.flatnonzero(self._flags[chunk] & _EVICTED)[: limit - len(found)]
            found += (hits + chunk.start).tolist()
        return found

    def evicted_mask(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` are evicted (without copying the region's array)."""
        mask: npt.NDArray[np.bool_] = (self._flags[pages] & _EVICTED) != 0
        return mask

    def settled_mask(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` are resident and not evicted: what may be evicted."""
        mask: npt.NDArray[np.bool_] = self._flags[pages] == _RESIDENT
        return mask

    @property
    def evicted_pages(self) -> int:
        return self._evicted_pages

    @property
    def nbytes(self) -> int:
        """Memory held by the per-page arrays (what grows with the region)."""
        return self._age.nbytes + self._flags.nbytes + self._generation.nbytes

    def evicted_but_resident(self) -> int:
        """Pages marked evicted that the last observe() found in the memfd.

        Nonzero means something filled a hole without a fetch-back (a write
        through an unregistered mapping, a fetch not reported): the memfd and
        storage now disagree about those pages.  They are never evicted again
        until :meth:`note_fetched` settles them.
        """
        return int(np.count_nonzero(self._flags == (_RESIDENT | _EVICTED)))

    # -- the tracker's cycle -----------------------------------------------------------

    def observe(
        self, hot: npt.NDArray[np.bool_], resident: npt.NDArray[np.bool_], now: float
    ) -> None:
        """Close one interval.

        ``hot``: accessed during it (``PAGE_IS_ACCESSED``, or ``PAGE_IS_WRITTEN``
        in wp-async mode, where ages then count cycles since the last write).
        ``resident``: in the memfd now (``SEEK_DATA``/``SEEK_HOLE``), taken while
        no eviction or fetch-back of this region is in flight, or corrected by
        :meth:`walked` for those that were.
        """
        for name, arr in (("hot", hot), ("resident", resident)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_:
                raise TypeError(f"{name} must be a numpy bool array")
            if arr.shape != (self.npages,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({self.npages},)")
        last = self._cycle_times[-1]
        if now < last:
            raise ValueError(f"cycle at {now} is earlier than the previous one at {last}")

        # One C pass: numpy took five over every page (saturating +1, then
        # zero where hot), at 12 to 16 times the cost under TCG.
        age_observe(self._age, np.ascontiguousarray(hot))
        if self._per_granule > 1:
            self._age.reshape(-1, self._per_granule)[
                hot.reshape(-1, self._per_granule).any(axis=1)
            ] = 0
        if self._pending_pages:
            self._pending.append(np.array(self._pending_pages, dtype=np.int64))
            self._pending_pages.clear()
        if self._pending:
            self._zero_ages(np.concatenate(self._pending))
            self._pending.clear()

        # EVICTED survives: only a fetch-back settles it.
        np.bitwise_and(self._flags, _NOT_RESIDENT, out=self._flags)
        np.bitwise_or(self._flags, resident.view(np.uint8), out=self._flags)
        self._resident_pages = int(np.count_nonzero(resident))

        self.cycles += 1
        self.last_cycle_at = now
        self._cycle_times.append(now)
        self._version += 1

    def note_access(self, pages: PageIndices) -> None:
        """Pages accessed outside a scan (a resolved fault, a demand fetch-back): age 0."""
        idx = self._indices(pages)
        if not len(idx):
            return
        self._zero_ages(idx)
        self._pending.append(idx)
        # A fault storm between two cycles must not grow a list per fault.
        if len(self._pending) > 256:
            self._pending = [np.unique(np.concatenate(self._pending))]
        self._version += 1

    def note_page_fetched(self, page: int) -> None:
        """:meth:`note_fetched` of one page by a demand fetch, without numpy per call.

        The fault path calls this once per fault: the array version costs tens of
        microseconds for one page.
        """
        if not 0 <= page < self.npages:
            raise IndexError(f"page {page} outside [0, {self.npages})")
        flags = int(self._flags[page])
        if flags & _EVICTED:
            if not flags & _RESIDENT:
                self._resident_pages += 1
            self._flags[page] = _RESIDENT
            self._evicted_pages -= 1
            if self._walk_changes is not None:
                self._walk_changes.append([page])
        if self._per_granule > 1:
            first = page - page % self._per_granule
            self._age[first : first + self._per_granule] = 0
        else:
            self._age[page] = 0
        self._pending_pages.append(page)
        if len(self._pending_pages) > 4096:
            self._pending.append(np.unique(np.array(self._pending_pages, dtype=np.int64)))
            self._pending_pages.clear()
        self._version += 1

    def note_fault(self, pages: PageIndices) -> None:
        """Pages that faulted (RWP in the sync window, or MISSING): accessed, and counted."""
        idx = self._indices(pages)
        self.faults += len(idx)
        self.note_access(idx)

    def note_evicted(self, pages: PageIndices) -> None:
        """Pages saved to storage and punched out of the memfd.

        Raises, changing nothing, for an untrappable region or for a page
        already evicted: a second eviction without a fetch-back would bump the
        generation past the copy storage holds.
        """
        if not self.granularity.evictable:
            raise ValueError(f"{self.granularity} region: accesses cannot be trapped, never evict")
        idx = self._indices(pages)
        flags = self._flags[idx]
        again = idx[(flags & _EVICTED) != 0]
        if len(again):
            raise ValueError(f"pages already evicted: {again[:8].tolist()}")
        self._resident_pages -= int(np.count_nonzero(flags & _RESIDENT))
        self._flags[idx] = _EVICTED
        self._walked_over(idx)
        self._generation[idx] += np.uint32(1)
        self._evicted_pages += len(idx)
        self._version += 1

    def restore(
        self,
        resident: npt.NDArray[np.bool_],
        listed: npt.NDArray[np.int64],
        generations: npt.NDArray[np.uint32],
        *,
        floor: int = 0,
    ) -> npt.NDArray[np.int64]:
        """Resume from a persisted page map (a restarted wsd), before the first cycle.

        ``listed`` pages were evicted at ``generations`` when the map was
        written.  The memfd is newer than any map: a listed page holding data
        there is resident (it was never punched, or was fetched back since);
        only listed *holes* are evicted.  Every listed page keeps its
        generation, so the next eviction stores a newer one.  Every other
        page starts at ``floor``, at least the highest generation any page of
        the VM was stored at (right below the generation ceiling,
        :mod:`wsd.evictor.pagemap`): its own last one is not known, and a
        record of it at a generation it reached again would pass every check.
        Returns the listed pages found resident.
        """
        if len(listed) != len(generations):
            raise ValueError(f"{len(listed)} pages but {len(generations)} generations")
        idx = self._indices(listed)
        if len(idx) != len(listed) or not np.array_equal(idx, listed):
            # Named, for whoever must find which write of the map went wrong.
            at = np.flatnonzero(np.diff(np.asarray(listed, dtype=np.int64)) <= 0)
            pairs = [(int(listed[k]), int(listed[k + 1])) for k in at[:8].tolist()]
            raise ValueError(
                f"page map pages must be ascending and unique: {len(listed)} listed, "
                f"{len(idx)} distinct, {len(at)} out of order, first at {pairs}"
            )
        listed_resident = resident[idx]
        holes = idx[~listed_resident]
        self._flags[:] = np.where(resident, _RESIDENT, 0).astype(np.uint8)
        self._flags[holes] = _EVICTED
        self._generation[:] = floor
        self._generation[idx] = generations
        self._resident_pages = int(np.count_nonzero(resident))
        self._evicted_pages = len(holes)
        self._version += 1
        return idx[listed_resident]

    def note_fetched(self, pages: PageIndices, *, accessed: bool = False) -> None:
        """Pages copied back into the memfd.

        ``accessed``: a demand fetch (a MISSING fault), so also an access.  A
        prefetch keeps the page's age: it is as cold as before.  Pages not
        marked evicted are ignored, so a duplicate report is harmless.
        """
        idx = self._indices(pages)
        back = idx[(self._flags[idx] & _EVICTED) != 0]
        self._resident_pages += int(np.count_nonzero((self._flags[back] & _RESIDENT) == 0))
        self._flags[back] = _RESIDENT
        self._evicted_pages -= len(back)
        self._walked_over(back)
        self._version += 1
        if accessed:
            self.note_access(idx)

    def note_removed(self, pages: PageIndices) -> npt.NDArray[np.int64]:
        """Pages the VMM discarded (``MADV_DONTNEED``/``MADV_REMOVE``: a balloon, free
        page reporting): they become never-populated, so their next touch is a fresh
        zero page, never a stored copy.

        Every page's generation moves on, evicted or not: a fetch or an eviction
        prepared before the removal carries the old generation and must find it
        stale.  Returns the pages that were evicted, whose stored copies are
        garbage now.  Resident pages lose ``RESIDENT`` too (``MADV_REMOVE`` frees
        them; after ``MADV_DONTNEED`` on a shared mapping the next resident walk
        finds them again).
        """
        idx = self._indices(pages)
        flags = self._flags[idx]
        evicted: npt.NDArray[np.int64] = idx[(flags & _EVICTED) != 0]
        self._resident_pages -= int(np.count_nonzero(flags & _RESIDENT))
        self._evicted_pages -= len(evicted)
        self._flags[idx] = 0
        self._generation[idx] += np.uint32(1)
        self._walked_over(idx)
        self._version += 1
        return evicted

    def lift_generations(self, floor: int, pages: PageIndices | None = None) -> None:
        """Raise the generations of ``pages`` (None: every page) to ``floor`` where
        below it (see :meth:`restore`)."""
        idx = slice(None) if pages is None else self._indices(pages)
        self._generation[idx] = np.maximum(self._generation[idx], np.uint32(floor))
        self._version += 1

    def begin_walk(self) -> None:
        """A residency walk (``SEEK_DATA``/``SEEK_HOLE``) starts in a worker thread:
        note which pages wsd changes until :meth:`walked`."""
        self._walk_changes = []

    def walked(self, resident: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.bool_] | None:
        """The walk's ``resident`` (None: it did not finish), with the pages wsd
        itself evicted, fetched, filled or saw removed while it ran as the state
        has them: the walk may have passed a page before or after the change."""
        changes, self._walk_changes = self._walk_changes, None
        if resident is not None and changes:
            idx = np.concatenate([np.asarray(c, dtype=np.int64) for c in changes])
            resident[idx] = (self._flags[idx] & _RESIDENT) != 0
        return resident

    def _walked_over(self, idx: npt.NDArray[np.int64]) -> None:
        if self._walk_changes is not None and len(idx):
            self._walk_changes.append(idx)

    def note_populated(self, pages: PageIndices) -> None:
        """Pages that became resident without an eviction round trip (a zero-filled
        first touch).  Evicted pages are left alone: only a fetch-back settles them.
        """
        idx = self._indices(pages)
        fresh = idx[self._flags[idx] == 0]
        self._flags[fresh] = _RESIDENT
        self._resident_pages += len(fresh)
        self._walked_over(fresh)
        self._version += 1

    # -- what the evictor and the metrics read -------------------------------------

    def cold_candidates(self, min_age: int, *, limit: int | None = None) -> npt.NDArray[np.int64]:
        """Resident, not evicted pages idle for at least ``min_age`` cycles, ascending.

        ``limit`` keeps the first that many (the result costs 8 bytes a page).
        Always empty for an untrappable region.  In a THP region ages are per
        2 MiB, so candidates come in whole granules (less their holes).
        """
        if not 1 <= min_age <= MAX_AGE:
            raise ValueError(f"min_age {min_age} must be within [1, {MAX_AGE}]")
        if limit is not None and limit < 0:
            raise ValueError(f"limit {limit} must not be negative")
        if not self.granularity.evictable or not self.npages:
            return np.empty(0, dtype=np.int64)
        width = min(self.npages, _CHUNK)
        old = np.empty(width, dtype=np.bool_)
        settled = np.empty(width, dtype=np.bool_)
        found: list[npt.NDArray[np.int64]] = [np.empty(0, dtype=np.int64)]
        wanted = self.npages if limit is None else limit
        for sl in _chunks(self.npages):
            if wanted <= 0:
                break
            n = sl.stop - sl.start
            np.greater_equal(self._age[sl], min_age, out=old[:n])
            np.equal(self._flags[sl], _RESIDENT, out=settled[:n])
            np.logical_and(old[:n], settled[:n], out=old[:n])
            hits = np.flatnonzero(old[:n])[:wanted].astype(np.int64) + sl.start
            found.append(hits)
            wanted -= len(hits)
        return np.concatenate(found)

    def working_set(self) -> dict[int, WorkingSetEstimate]:
        """Estimates for every configured horizon, resident or evicted pages alike.

        A page evicted soon after its last access still counts: the working set
        is what the guest touched, not what is in memory now.
        """
        return RegionUsage(self, self._idle_counts()).working_set()

    def working_set_pages(self, horizon: int) -> int | None:
        """``working_set()[horizon].pages`` alone, for the evictor's every cycle.

        One pass over the ages (0.23 to 0.31 ms for 8 GiB on the development VM)
        where ``working_set`` makes one per horizon and age edge (13, 3.2 ms), on
        the loop that serves faults, and redone each cycle since each cycle
        changes the ages.
        """
        if self.cycles < horizon:
            return None
        counts = self._fresh_counts()
        if counts is not None and horizon in self.horizons:
            return self.npages - int(counts.pages_at_least_horizon[self.horizons.index(horizon)])
        idle = 0
        ge = np.empty(min(self.npages, _CHUNK), dtype=np.bool_)
        for sl in _chunks(self.npages):
            n = sl.stop - sl.start
            np.greater_equal(self._age[sl], horizon, out=ge[:n])
            idle += int(np.count_nonzero(ge[:n]))
        return self.npages - idle

    def age_histogram(self) -> AgeHistogram:
        """Resident pages by idle age, for cold-memory reporting."""
        return RegionUsage(self, self._idle_counts()).age_histogram()

    def usage(self) -> RegionUsage:
        """What :meth:`working_set` and :meth:`age_histogram` compute from, for
        another thread to compute them: a scrape, whose counting of every page
        (3.9 to 5.3 ms for 8 GiB on the development VM) would hold up the loop that
        serves faults.  Taken here, on the loop: the counts if cached, else a
        copy of the ages and flags (2 bytes a page, 1.1 to 1.5 ms for 8 GiB)."""
        return RegionUsage(self, self._fresh_counts())

    # -- internals -------------------------------------------------------------------

    def _indices(self, pages: PageIndices) -> npt.NDArray[np.int64]:
        """Unique, in-range page indices (numpy would wrap negative ones silently)."""
        arr = np.asarray(pages)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"page indices must be integers, not {arr.dtype}")
        idx = arr.astype(np.int64).ravel()  # a copy: callers may reuse theirs
        # np.unique costs 40 µs for 512 pages (numpy 2.4), this check 2, and the
        # evictor's chunks come sorted and unique: 50 µs of each commit step on
        # the loop went to it.
        if len(idx) > 1 and not (idx[1:] > idx[:-1]).all():
            idx = np.unique(idx)
        if len(idx) and (idx[0] < 0 or idx[-1] >= self.npages):
            bad = idx[(idx < 0) | (idx >= self.npages)]
            raise IndexError(f"pages {bad[:8].tolist()} outside [0, {self.npages})")
        return idx

    def _zero_ages(self, idx: npt.NDArray[np.int64]) -> None:
        if self._per_granule > 1:
            self._age.reshape(-1, self._per_granule)[idx // self._per_granule] = 0
        else:
            self._age[idx] = 0

    def _idle_counts(self) -> _IdleCounts:
        """Pages idle for at least each horizon, resident pages for each edge; cached."""
        counts = self._fresh_counts()
        if counts is None:
            counts = _count_idle(
                self._version, self._age, self._flags, self.horizons, self.age_edges
            )
            self._counts = counts
        return counts

    def _fresh_counts(self) -> _IdleCounts | None:
        """The cached counts, if the state has not changed since they were made."""
        counts = self._counts
        return counts if counts is not None and counts.version == self._version else None


class RegionUsage:
    """A region's working-set estimates and age histogram, computed from what
    :meth:`RegionState.usage` took: in any thread, since it shares nothing with
    the state."""

    def __init__(self, state: RegionState, counts: _IdleCounts | None) -> None:
        self.npages, self.page_size, self.cycles = state.npages, state.page_size, state.cycles
        self.horizons, self.age_edges = state.horizons, state.age_edges
        self._times = tuple(state._cycle_times)
        self._counts = counts
        self._pages = None if counts is not None else (state._age.copy(), state._flags.copy())

    def _idle_counts(self) -> _IdleCounts:
        if self._counts is None:
            assert self._pages is not None
            age, flags = self._pages
            self._counts = _count_idle(-1, age, flags, self.horizons, self.age_edges)
            self._pages = None
        return self._counts

    def working_set(self) -> dict[int, WorkingSetEstimate]:
        """As :meth:`RegionState.working_set`."""
        counts = self._idle_counts()
        times = self._times
        out: dict[int, WorkingSetEstimate] = {}
        for h, idle in zip(self.horizons, counts.pages_at_least_horizon.tolist(), strict=True):
            valid = self.cycles >= h
            out[h] = WorkingSetEstimate(
                horizon=h,
                pages=self.npages - idle if valid else None,
                page_size=self.page_size,
                window_seconds=times[-1] - times[-1 - h] if valid else None,
            )
        return out

    def age_histogram(self) -> AgeHistogram:
        """As :meth:`RegionState.age_histogram`."""
        counts = self._idle_counts()
        at_least = [counts.resident, *counts.resident_at_least_edge.tolist()]
        buckets = [a - b for a, b in itertools.pairwise(at_least)] + [at_least[-1]]
        return AgeHistogram(
            edges=self.age_edges,
            pages=tuple(buckets),
            page_size=self.page_size,
            observed_cycles=self.cycles,
        )


def _count_idle(
    version: int,
    ages: npt.NDArray[np.uint8],
    flags: npt.NDArray[np.uint8],
    horizons: tuple[int, ...],
    edges: tuple[int, ...],
) -> _IdleCounts:
    """Pages idle for at least each horizon, resident pages for each edge."""
    npages = len(ages)
    at_least_h = np.zeros(len(horizons), dtype=np.int64)
    at_least_e = np.zeros(len(edges), dtype=np.int64)
    resident = 0
    width = min(npages, _CHUNK)
    mask = np.empty(width, dtype=np.uint8)
    masked = np.empty(width, dtype=np.uint8)
    ge = np.empty(width, dtype=np.bool_)
    for sl in _chunks(npages):
        age = ages[sl]
        n = len(age)
        for i, h in enumerate(horizons):
            np.greater_equal(age, h, out=ge[:n])
            at_least_h[i] += np.count_nonzero(ge[:n])
        # Non-resident ages become 0, below every edge.
        np.bitwise_and(flags[sl], _RESIDENT, out=mask[:n])
        resident += int(np.count_nonzero(mask[:n]))
        np.multiply(age, mask[:n], out=masked[:n])
        for i, e in enumerate(edges):
            np.greater_equal(masked[:n], e, out=ge[:n])
            at_least_e[i] += np.count_nonzero(ge[:n])
    return _IdleCounts(version, at_least_h, at_least_e, resident)
