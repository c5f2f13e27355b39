"""Per-VM tracking on the real kernel: negotiate, register, arm, and run cycles.

The cycle, in ``rwp`` mode (RWP-FACTS, "the merged kernel wins"):

1. ``RWPROTECT`` every region (async mode: touches are resolved in the
   kernel and only clear the protection);
2. wait one interval;
3. ``SET_MODE`` sync *before* scanning, so an access racing the scan blocks
   and raises an RWP fault instead of slipping by;
4. scan the **hot** set with a non-inverted ``PAGE_IS_ACCESSED``;
5. run the eviction hook (cold = resident memfd pages minus hot);
6. ``RWPROTECT`` again (the next interval starts), then ``SET_MODE`` async,
   which also releases any thread still blocked.

In ``wp-async`` mode there is no sync window: ``PAGEMAP_SCAN`` with
``PAGE_IS_WRITTEN`` and ``PM_SCAN_WP_MATCHING`` reports the written pages and
re-protects exactly those in one atomic step, so no write is missed between
scan and re-arm.  Read-only accesses are invisible in that mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from wsd.cancellation import despite_cancellation
from wsd.kernel import (
    REGION_DTYPE,
    Feature,
    KernelError,
    KernelFeatures,
    PageCategory,
    PageFault,
    Pagemap,
    RegisterMode,
    ScanFlag,
    Userfaultfd,
    data_ranges,
)
from wsd.vmm.protocol import ErrorCode, HandoffError, Region, UffdSpec, UffdState

from .mode import ModeDecision, TrackingMode
from .state import Granularity, RegionState

T = TypeVar("T")

# What wsd asks UFFDIO_API for, per mode.  Missing optional ones are fine.
REQUIRED: dict[TrackingMode, Feature] = {
    TrackingMode.RWP: Feature.RWP | Feature.RWP_ASYNC | Feature.MISSING_SHMEM,
    TrackingMode.WP_ASYNC: Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM | Feature.MISSING_SHMEM,
}
OPTIONAL = (
    Feature.MISSING_HUGETLBFS
    | Feature.MINOR_SHMEM
    | Feature.MINOR_HUGETLBFS
    | Feature.POISON
    # Guest memory life events (docs/life-events.md).  Non-cooperative: the
    # VMM's madvise/munmap/mremap waits until wsd has read the message.
    # REMOVE: a balloon discarded pages, whose stored copies must never come
    # back.  UNMAP and REMAP: a region went away or moved; without REMAP the
    # kernel drops the registration of a moved range, and its evicted pages
    # would silently read as zeros.
    | Feature.EVENT_REMOVE
    | Feature.EVENT_UNMAP
    | Feature.EVENT_REMAP
)

log = structlog.get_logger("wsd.tracker")

# How long a window's re-arm retries EAGAIN (a life event pending) before the
# session gives up: the event's read is ours, so only a starved VMM thread
# (under TCG) makes this more than milliseconds.
REARM_EAGAIN_SECONDS = 10.0

# PAGEMAP_SCAN's output vector, in runs of 24 bytes: 192 KiB per region.  A
# hot set more fragmented than this takes more than one ioctl per cycle.
SCAN_VEC_RUNS = 8192

Hook = Callable[["VmTracker", list[npt.NDArray[np.bool_]]], Awaitable[None]]


@dataclass
class TrackedRegion:
    region: Region
    memfd: int
    state: RegionState
    minor: bool = False  # MINOR co-registered (RWP-FACTS fact 8)
    # Reused by every scan.  A fixed vector, marked into the bitmap call by
    # call, bounds the scan's memory however fragmented the hot set is; new
    # arrays each cycle cost page faults and RSS (glibc keeps freed memory).
    scan_vec: npt.NDArray[np.void] = field(
        default_factory=lambda: np.empty(SCAN_VEC_RUNS, dtype=REGION_DTYPE)
    )
    hot: npt.NDArray[np.bool_] | None = None
    # Pages whose access was trapped (RWP or MINOR fault) since the window
    # opened: the evictor must not punch them, their bytes may have changed.
    touched: set[int] = field(default_factory=set)
    # Evicted pages whose punch left a zeroed page in the page cache instead of
    # a hole (a 4 KiB punch inside a shmem THP that could not be split).  Their
    # bytes live in storage; an access raises MINOR (never MISSING), and the
    # evictor must restore them before mapping anything there.
    remnants: set[int] = field(default_factory=set)
    # Punched pages whose held bytes could not be read back after the punch
    # (wp-async verified punch), page -> generation: a raced write's final
    # bytes may be only in the parked pipes, so neither storage nor zeros may
    # serve them.  Their faults wait until a restart puts them back.
    held_back: dict[int, int] = field(default_factory=dict)
    # Why this region is no longer mapped where the hand-off said (the VMM
    # unmapped or moved part of it), or None.  A vanished region is neither
    # scanned nor armed nor evicted; its evicted pages go back into the memfd.
    vanished: str | None = None
    # Other processes that map this region's memfd (vhost-user backends,
    # virtiofsd), as of the last check; the evictor leaves the region alone.
    other_mappers: tuple[int, ...] = ()
    # Where the VMM maps this region's pages a second time, outside the
    # registered range, as of the last check (None: it does not).
    aliased_at: int | None = None
    # Bytes of the region in io_uring registered buffers of the VMM, as of the
    # last check: the kernel writes them without faulting.
    uring_bytes: int = 0
    # Pages a restored page map listed as evicted that the memfd holds (put
    # but never punched, or fetched back after the map was written): the
    # memfd wins, and their stored copies are stale (resume.adopt).  Taken
    # once, by the evictor's context (take_listed_resident).
    listed_resident: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.empty(0, dtype=np.int64)
    )
    pagemap: Pagemap | None = None
    """The VMM's, for :meth:`resident` on hugetlbfs."""

    @property
    def npages(self) -> int:
        return self.region.size // self.region.page_size

    def take_listed_resident(self) -> npt.NDArray[np.int64]:
        """:attr:`listed_resident`, which is left empty: a resumed session's
        stale copies are discarded once, and a large guest's list is not kept."""
        pages, self.listed_resident = self.listed_resident, np.empty(0, dtype=np.int64)
        return pages

    def is_held_back(self, page: int) -> bool:
        """Whether ``page``, as evicted now, is one of :attr:`held_back`: no fault on it may
        be served from storage or zeros."""
        # Asked on every fetch; almost always there are none.
        return bool(self.held_back) and self.held_back.get(page) == self.state.generation(page)

    def resident(self) -> npt.NDArray[np.bool_]:
        """Pages of this region present in its memfd (SEEK_DATA/SEEK_HOLE).

        hugetlbfs has no SEEK_HOLE (its lseek calls the whole file data), so
        there the pages the VMM maps stand in: every page wsd installs is
        mapped, and a punch unmaps it.  A page in the page cache that the VMM
        does not map counts as a hole, the safe side: a hole is never evicted,
        and the VMM's next access maps the page with no fault.
        """
        r = self.region
        if r.hugetlb:
            return self._mapped(0, self.npages)
        out = np.zeros(self.npages, dtype=np.bool_)
        for start, end in data_ranges(self.memfd, r.offset, r.offset + r.size):
            first = (start - r.offset) // r.page_size
            last = -(-(end - r.offset) // r.page_size)
            out[first:last] = True
        return out

    def maps(self, page: int) -> bool:
        """Whether the VMM's page tables map ``page``."""
        return bool(self._mapped(page, 1)[0])

    def _mapped(self, first: int, count: int) -> npt.NDArray[np.bool_]:
        """Which of pages ``first`` .. ``first + count`` the VMM's page tables map
        (``PAGEMAP_SCAN``)."""
        assert self.pagemap is not None, "a region is tracked with its VMM's pagemap"
        r = self.region
        start = r.host_virt_addr + first * r.page_size
        found = self.pagemap.scan(
            start, count * r.page_size, vec_len=min(count, 4096), category_mask=PageCategory.PRESENT
        )
        return found.bitmap(start, count, r.page_size)


def _wants_minor(decision: ModeDecision, r: Region, enabled: Feature) -> bool:
    """Co-register MINOR on 4 KiB shmem regions in rwp mode (RWP-FACTS fact 8).

    RWPROTECT on a PMD-mapped shmem THP zaps the mapping instead of protecting
    it, and the next access remaps it with no fault even in sync mode: the
    sync window's race protection is gone.  With MINOR registered, that access
    raises a MINOR fault (async mode too), which wsd resolves with
    UFFDIO_CONTINUE; the page is then mapped by a 4 KiB PTE and tracked exactly.
    """
    return decision.mode is TrackingMode.RWP and not r.hugetlb and Feature.MINOR_SHMEM in enabled


def _granularity(r: Region, minor: bool, shmem_thp: bool) -> Granularity:
    if r.page_size == 2 << 20:
        return Granularity.HUGE_2M
    if minor or not shmem_thp:
        return Granularity.PAGE_4K
    # Shmem THP may map this region by PMD and we cannot trap those accesses:
    # tracked (scans still see them) but never evicted.
    return Granularity.THP_2M_UNTRAPPABLE


def _tracked_regions(
    regions: Sequence[tuple[Region, int]],
    minor: Sequence[bool],
    kernel: KernelFeatures,
    now: float,
    pagemap: Pagemap,
) -> list[TrackedRegion]:
    shmem_thp = kernel.thp_shmem_enabled not in (None, "never", "deny")
    return [
        TrackedRegion(
            r,
            fd,
            RegionState(r.size // r.page_size, _granularity(r, m, shmem_thp), started_at=now),
            minor=m,
            pagemap=pagemap,
        )
        for (r, fd), m in zip(regions, minor, strict=True)
    ]


def _unregister(uffd: Userfaultfd, regions: Sequence[Region]) -> None:
    """``UFFDIO_UNREGISTER`` each region, then read and drop what is queued (see
    :meth:`VmTracker.release`).  Fails harmlessly if the VMM is gone."""
    for r in regions:
        with contextlib.suppress(KernelError):
            uffd.unregister(r.host_virt_addr, r.size)
    _drain(uffd)


def _drain(uffd: Userfaultfd) -> None:
    """Read and drop every queued message."""
    with contextlib.suppress(KernelError):
        while uffd.read_messages():
            pass


def _names(mode: RegisterMode) -> set[str]:
    return {m.name or "" for m in RegisterMode if m in mode}


@dataclass
class VmTracker:
    """Tracking state of one VM's uffd.  Owns the uffd and pagemap fds."""

    vm_id: str
    uffd: Userfaultfd
    pagemap: Pagemap
    decision: ModeDecision
    regions: list[TrackedRegion]
    clock: Callable[[], float] = time.monotonic
    resident_walk_every: int = 16
    cycles: int = 0
    sync_faults: int = 0
    minor_faults: int = 0
    late_rwp_faults: int = 0
    # Guest memory life events (wsd.evictor.events) and guards (wsd.evictor.guards).
    removed_pages: int = 0  # discarded by the VMM (UFFD_EVENT_REMOVE)
    removed_evicted_pages: int = 0  # ... of which were evicted: their copies dropped
    pinned_bytes: int = 0  # the VMM's VmPin at the last check
    # Why the VMM's io_uring buffers could not all be placed at the last check (None: all were).
    uring_unlisted: str | None = None
    guards_checked_at: int | None = None  # the cycle of that check
    # Every generation this VM's pages were ever stored at is below this: the
    # ceiling on disk (pagemap.load_ceiling, read by resume; 0 if none).  The
    # evictor raises it there, then here, before storing at it.
    generation_ceiling: int = 0
    _in_window: bool = field(default=False, repr=False)

    @property
    def mode(self) -> TrackingMode:
        return self.decision.mode

    @property
    def in_window(self) -> bool:
        """Whether the uffd is in sync mode: every access to a protected page traps."""
        return self._in_window

    @classmethod
    def start(
        cls,
        vm_id: str,
        *,
        vmm_pid: int,
        spec: UffdSpec,
        uffd_fd: int,
        regions: Sequence[tuple[Region, int]],
        decision: ModeDecision,
        kernel: KernelFeatures,
        clock: Callable[[], float] = time.monotonic,
    ) -> VmTracker:
        """Negotiate (raw uffd) or verify (pre-registered), register and arm.

        Takes ownership of ``uffd_fd``; the memfds stay the caller's.
        """
        supported = kernel.features
        uffd = Userfaultfd(uffd_fd)
        registered: list[Region] = []
        try:
            for i, (r, _) in enumerate(regions):
                if r.page_size not in (4096, 2 << 20):
                    raise HandoffError(
                        ErrorCode.UNSUPPORTED,
                        f"regions[{i}]: page_size {r.page_size} is not tracked yet "
                        "(4 KiB and 2 MiB are)",
                        f"regions[{i}].page_size",
                    )
            need = REQUIRED[decision.mode]
            if spec.state is UffdState.RAW:
                if need & ~supported:
                    raise HandoffError(
                        ErrorCode.UNSUPPORTED, f"this kernel lacks {need & ~supported!r}"
                    )
                enabled = uffd.api(need | (OPTIONAL & supported)).features
                minor = [_wants_minor(decision, r, enabled) for r, _ in regions]
                for i, ((r, _), m) in enumerate(zip(regions, minor, strict=True)):
                    mode = decision.register_mode | (RegisterMode.MINOR if m else RegisterMode(0))
                    try:
                        uffd.register(r.host_virt_addr, r.size, mode)
                    except KernelError as e:
                        # E.g. not mapped there, PROT_NONE, or not shared memory.
                        raise HandoffError(
                            ErrorCode.BAD_REGION, f"regions[{i}]: {e}", f"regions[{i}]"
                        ) from e
                    registered.append(r)
            else:
                have = Feature(spec.features or 0)
                if need & ~have:
                    raise HandoffError(
                        ErrorCode.UNSUPPORTED,
                        f"the uffd was negotiated without {need & ~have!r}, which "
                        f"{decision.mode} tracking needs",
                        "uffd.features",
                    )
                missing = _names(decision.register_mode) - set(spec.register_mode or [])
                if missing:
                    raise HandoffError(
                        ErrorCode.UNSUPPORTED,
                        f"regions are registered without {', '.join(sorted(missing))}, "
                        f"which {decision.mode} tracking needs",
                        "uffd.register_mode",
                    )
                uffd.features = have
                minor = ["MINOR" in (spec.register_mode or [])] * len(regions)
            pagemap = Pagemap.open(vmm_pid)
        except BaseException:
            try:
                _unregister(uffd, registered)
            finally:
                uffd.close()
            raise
        tracked = _tracked_regions(regions, minor, kernel, clock(), pagemap)
        tracker = cls(vm_id, uffd, pagemap, decision, tracked, clock)
        try:
            tracker.arm()
        except KernelError as e:
            tracker.abandon()
            # With a pre-registered uffd this is where a false claim shows.
            raise HandoffError(ErrorCode.UNSUPPORTED, f"cannot arm tracking: {e}") from e
        return tracker

    @classmethod
    def adopt(
        cls,
        vm_id: str,
        *,
        vmm_pid: int,
        uffd_fd: int,
        features: Feature,
        regions: Sequence[tuple[Region, int]],
        minor: Sequence[bool],
        decision: ModeDecision,
        kernel: KernelFeatures,
        clock: Callable[[], float] = time.monotonic,
        vanished: Sequence[str | None] = (),
    ) -> VmTracker:
        """Resume tracking a uffd that a previous wsd negotiated and registered.

        ``vanished``: regions the VMM unmapped or moved away meanwhile (why),
        which stay detached.

        The uffd keeps its features and registrations across owners, so
        nothing is negotiated again.  The previous wsd may have died anywhere:
        in rwp mode inside a sync window (going async releases the vCPUs
        blocked on RWP faults), or after reading a fault it never resolved
        (its message is gone, so a ``UFFDIO_WAKE`` of every region makes those
        threads fault again, and this wsd reads the new messages).  Takes
        ownership of ``uffd_fd``; raises :class:`KernelError` if the VMM is gone.
        """
        uffd = Userfaultfd(uffd_fd)
        uffd.features = features
        try:
            pagemap = Pagemap.open(vmm_pid)
        except BaseException:
            uffd.close()
            raise
        tracked = _tracked_regions(regions, minor, kernel, clock(), pagemap)
        for t, why in zip(tracked, vanished, strict=False):
            t.vanished = why
        tracker = cls(vm_id, uffd, pagemap, decision, tracked, clock)
        try:
            if tracker.mode is TrackingMode.RWP:
                uffd.set_mode(enable=Feature.RWP_ASYNC)
            tracker.arm()
            for t in tracked:
                if t.vanished is None:
                    uffd.wake(t.region.host_virt_addr, t.region.size)
        except BaseException:
            tracker.close()
            raise
        return tracker

    def arm(self) -> None:
        """Start an interval: protect everything so the next touch is recorded."""
        for t in self.regions:
            if t.vanished:
                continue  # not mapped there any more: the ioctl would fail
            r = t.region
            if self.mode is TrackingMode.RWP:
                self.uffd.rwprotect(r.host_virt_addr, r.size, protect=True)
            else:
                self.uffd.writeprotect(r.host_virt_addr, r.size, protect=True)

    async def _rearm(self) -> None:
        """:meth:`arm`, retried while the VMM's address space is changing.

        uffd ioctls fail with EAGAIN while a non-cooperative event is pending
        (``mmap_changing``): from before the kernel queues a REMOVE (a
        balloon's ``madvise``), UNMAP or REMAP until the VMM's thread resumes
        after wsd has read it.  wsd reads it on this loop, so yield between
        tries.  Seen in the 7.3 VM: a balloon's madvise during a window ended
        the session (tests/kernel/test_life_events_rwp.py).
        """
        deadline = time.monotonic() + REARM_EAGAIN_SECONDS
        delay = 0.001
        while True:
            try:
                await self._off_loop(self.arm)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    async def _off_loop(self, walk: Callable[[], T]) -> T:
        """Run a walk of every region (a scan, an arm) in a worker thread.

        Each costs milliseconds per GiB of guest, the kernel visiting every page
        table entry, and the loop must serve faults meanwhile: in a sync window
        those of the very vCPUs the window blocks.  The kernel orders a walk and
        a fault's ioctl on the same page either way, as it would if the fault
        were read just before or after the walk.  A walk uses only this
        tracker's scan vectors and hot bitmaps, which nothing else touches
        until it returns.  Cancelled, it waits for the walk to end: ending the
        session closes the fds the walk uses.
        """
        work = asyncio.get_running_loop().run_in_executor(None, walk)
        if await despite_cancellation(work):
            raise asyncio.CancelledError
        return work.result()

    def _scan_all(
        self, walk: bool
    ) -> tuple[list[npt.NDArray[np.bool_]], list[npt.NDArray[np.bool_] | None]]:
        """Each region's hot pages and, if ``walk``, the pages in its memfd."""
        hot = [self._scan(t) for t in self.regions]
        return hot, [t.resident() if walk and not t.vanished else None for t in self.regions]

    def _scan(self, t: TrackedRegion) -> npt.NDArray[np.bool_]:
        r = t.region
        if t.vanished:
            # Scanning an address range the VMM unmapped (or mapped something
            # unregistered over) fails or reports another mapping: nothing hot.
            return np.zeros(t.npages, dtype=np.bool_)
        if t.hot is None:
            t.hot = np.empty(t.npages, dtype=np.bool_)
        t.hot.fill(False)
        if self.mode is TrackingMode.RWP:
            calls = self.pagemap.scan_calls(
                r.host_virt_addr, r.size, category_mask=PageCategory.ACCESSED, vec=t.scan_vec
            )
        else:
            calls = self.pagemap.scan_calls(
                r.host_virt_addr,
                r.size,
                category_mask=PageCategory.WRITTEN,
                flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                vec=t.scan_vec,
            )
        for res in calls:
            res.mark(r.host_virt_addr, r.page_size, t.hot)
        return t.hot

    async def cycle(self, hook: Hook | None = None) -> list[npt.NDArray[np.bool_]]:
        """End the current interval: scan the hot set, run ``hook``, start the next one.

        Returns each region's hot bitmap.  The arrays are reused: the next
        cycle overwrites them.
        """
        if self.mode is TrackingMode.RWP:
            for t in self.regions:
                t.touched.clear()
            self.uffd.set_mode(disable=Feature.RWP_ASYNC)
            self._in_window = True
        # wsd itself makes every change of residency between walks (zero-fills,
        # evictions, fetch-backs) and records it in the state, so the memfd is
        # walked with SEEK_DATA/SEEK_HOLE only every resident_walk_every cycles,
        # to catch what others did (a VMM punching holes).  The walk costs tens
        # of ns per resident page, in the kernel: most of a cycle if done every
        # time, and 20 ms for 4 GiB of it, so it runs in the thread too.
        walk = self.cycles % self.resident_walk_every == 0
        walked: list[npt.NDArray[np.bool_] | None] = [None] * len(self.regions)
        try:
            if walk:
                for t in self.regions:
                    t.state.begin_walk()
            layout = self._layout()
            try:
                hot, walked = await self._off_loop(functools.partial(self._scan_all, walk))
            finally:
                if walk:
                    walked = [t.state.walked(w) for t, w in zip(self.regions, walked, strict=True)]
            for i, (before, after) in enumerate(zip(layout, self._layout(), strict=True)):
                if after != before:
                    # Unmapped or moved while the thread walked it: the walk
                    # saw another mapping or none.  Vanished regions count
                    # nothing hot, as always; a moved one counts every page
                    # hot this once, so nothing there looks colder than it is.
                    t = self.regions[i]
                    hot[i] = np.full(t.npages, not after[0], dtype=np.bool_)
            now = self.clock()
            for t, h, w in zip(self.regions, hot, walked, strict=True):
                if not t.vanished:
                    t.state.observe(h, t.state.resident if w is None else w, now)
            if hook is not None:
                await hook(self, hot)
        finally:
            if self.mode is TrackingMode.RWP:
                # Re-arm while still sync, then go async: an access after the
                # RWPROTECT lands in the next interval, and none falls in a gap
                # between going async and re-arming.  Going async also
                # releases any thread still blocked on an RWP fault, so it
                # happens even if arming fails.
                try:
                    await self._rearm()
                finally:
                    self._in_window = False
                    self.uffd.set_mode(enable=Feature.RWP_ASYNC)
        self.cycles += 1
        return hot

    def on_fault(self, fault: PageFault) -> bool:
        """Resolve a tracking fault; False if it is not ours (MISSING: first touch or evictor).

        An RWP fault can only happen inside the sync window: the page is being
        accessed, so it is hot; unprotect and wake it at once.  A MINOR fault
        can happen any time on a co-registered region; it is an access too.
        """
        if not (fault.is_rwp or fault.is_minor):
            return False
        where = self.locate(fault.address)
        if where is None:
            return False
        _, t, page = where
        r = t.region
        addr = r.host_virt_addr + page * r.page_size
        if fault.is_minor:
            if page in t.remnants:
                return False  # zeros in the page cache: the evictor restores it
            # The page is in the page cache but unmapped (e.g. a zapped shmem
            # THP): map it with a 4 KiB PTE.  EEXIST: a racing fault mapped it.
            try:
                self.uffd.continue_(addr, r.page_size)
            except FileExistsError:
                pass
            except BlockingIOError:
                # EAGAIN: a life event is queued and not read yet.  A MINOR
                # fault blocks even in async mode: wake the thread, it faults
                # again once the event is read.
                self.uffd.wake(addr, r.page_size)
            t.state.note_access([page])
            t.touched.add(page)
            self.minor_faults += 1
            return True
        if not self._in_window:
            # Async mode resolves RWP faults in the kernel, so this one was raised
            # in a window that has closed since (its message is read late), or
            # the uffd is not in the mode we think.  Either way: resolve it.
            self.late_rwp_faults += 1
            log.debug("RWP fault after the sync window", vm_id=self.vm_id, address=hex(addr))
        # EAGAIN (a life event queued, not read yet) leaves the page
        # protected: its thread waits until the window closes, since going
        # async releases it, and touched keeps the page out of the commit.
        with contextlib.suppress(BlockingIOError):
            self.uffd.rwprotect(addr, r.page_size, protect=False)
        t.state.note_fault([page])
        t.touched.add(page)
        self.sync_faults += 1
        return True

    def _layout(self) -> list[tuple[bool, int]]:
        """Where each region is mapped, if still: what a life event can change."""
        return [(bool(t.vanished), t.region.host_virt_addr) for t in self.regions]

    def relocate(self, index: int, host_virt_addr: int) -> None:
        """Region ``index`` moved, whole, to ``host_virt_addr`` (an ``mremap`` by the VMM).

        With ``EVENT_REMAP`` negotiated the registration moves with the
        mapping, and the memfd (so every page's state) is the same: only the
        address changes.
        """
        t = self.regions[index]
        t.region = t.region.model_copy(update={"host_virt_addr": host_virt_addr})

    def locate(self, address: int) -> tuple[int, TrackedRegion, int] | None:
        """(region index, region, page index) of a guest address, or None outside all."""
        for i, t in enumerate(self.regions):
            r = t.region
            if r.host_virt_addr <= address < r.host_end:
                return i, t, (address - r.host_virt_addr) // r.page_size
        return None

    def release(self) -> None:
        """Let go of the VMM's memory for good (every evicted page is back, or it is gone).

        ``UFFDIO_UNREGISTER`` every region: no fault or event is raised there
        any more, and threads waiting on a fault there are woken.  Then read
        whatever is queued.  With life events negotiated, a VMM's ``madvise``
        / ``munmap`` / ``mremap`` of a registered range waits until its event
        is *read*, and the VMM holds its own copy of the uffd (RWP-FACTS fact
        9), so an event nobody reads blocks it forever.  A ``munmap`` that
        checked the registration just before the unregister queues its event
        just after it, so the caller keeps reading for a moment
        (:meth:`discard_pending`) before :meth:`close`.  Fails harmlessly if
        the VMM is gone.
        """
        if self.mode is TrackingMode.RWP:
            with contextlib.suppress(KernelError):
                self.uffd.set_mode(enable=Feature.RWP_ASYNC)
        _unregister(self.uffd, [t.region for t in self.regions if t.vanished is None])

    def abandon(self) -> None:
        """:meth:`release`, then :meth:`close`: for a hand-off that never became a
        session, so nothing is evicted.  Without the release, the VMM's copy of
        the uffd would keep wsd's registration, and its ``munmap`` of guest
        memory would wait for good on an UNMAP event nobody reads."""
        try:
            self.release()
        finally:
            self.close()

    def discard_pending(self) -> None:
        """Read and drop every queued message (after :meth:`release`)."""
        _drain(self.uffd)

    def close(self) -> None:
        """Unprotect and drop our fds.  The VMM keeps its uffd copy and memory."""
        try:
            if self.mode is TrackingMode.RWP:
                # Leave the uffd async so the VMM's vCPUs never block on an RWP
                # fault nobody will serve.  Fails harmlessly if the VMM is gone.
                with contextlib.suppress(KernelError):
                    self.uffd.set_mode(enable=Feature.RWP_ASYNC)
        finally:
            self.pagemap.close()
            self.uffd.close()
