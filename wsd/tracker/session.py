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

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from wsd.kernel import (
    Feature,
    FeatureUnavailable,
    KernelError,
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

# What wsd asks UFFDIO_API for, per mode.  Missing optional ones are fine.
REQUIRED: dict[TrackingMode, Feature] = {
    TrackingMode.RWP: Feature.RWP | Feature.RWP_ASYNC | Feature.MISSING_SHMEM,
    TrackingMode.WP_ASYNC: Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM | Feature.MISSING_SHMEM,
}
OPTIONAL = Feature.MISSING_HUGETLBFS | Feature.MINOR_SHMEM | Feature.MINOR_HUGETLBFS

Hook = Callable[["VmTracker", list[npt.NDArray[np.bool_]]], Awaitable[None]]


@dataclass
class TrackedRegion:
    region: Region
    memfd: int
    state: RegionState

    @property
    def npages(self) -> int:
        return self.region.size // self.region.page_size

    def resident(self) -> npt.NDArray[np.bool_]:
        """Pages of this region present in its memfd (SEEK_DATA/SEEK_HOLE)."""
        r = self.region
        out = np.zeros(self.npages, dtype=np.bool_)
        for start, end in data_ranges(self.memfd, r.offset, r.offset + r.size):
            first = (start - r.offset) // r.page_size
            last = -(-(end - r.offset) // r.page_size)
            out[first:last] = True
        return out


def _granularity(r: Region) -> Granularity:
    # Shmem/anon THP (RWP-FACTS facts 7 and 8) is not detected yet: the VMM
    # must map guest RAM without THP (MADV_NOHUGEPAGE) for 4 KiB tracking.
    return Granularity.HUGE_2M if r.page_size == 2 << 20 else Granularity.PAGE_4K


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
    cycles: int = 0
    sync_faults: int = 0
    _in_window: bool = field(default=False, repr=False)

    @property
    def mode(self) -> TrackingMode:
        return self.decision.mode

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
        supported: Feature,
        clock: Callable[[], float] = time.monotonic,
    ) -> VmTracker:
        """Negotiate (raw uffd) or verify (pre-registered), register and arm.

        Takes ownership of ``uffd_fd``; the memfds stay the caller's.
        """
        uffd = Userfaultfd(uffd_fd)
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
                    raise FeatureUnavailable(str(decision.mode), "see wsd kernel-info")
                uffd.api(need | (OPTIONAL & supported))
                for r, _ in regions:
                    uffd.register(r.host_virt_addr, r.size, decision.register_mode)
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
            pagemap = Pagemap.open(vmm_pid)
        except BaseException:
            uffd.close()
            raise
        now = clock()
        tracked = [
            TrackedRegion(
                r, fd, RegionState(r.size // r.page_size, _granularity(r), started_at=now)
            )
            for r, fd in regions
        ]
        tracker = cls(vm_id, uffd, pagemap, decision, tracked, clock)
        try:
            tracker.arm()
        except KernelError as e:
            tracker.close()
            # With a pre-registered uffd this is where a false claim shows.
            raise HandoffError(ErrorCode.UNSUPPORTED, f"cannot arm tracking: {e}") from e
        return tracker

    def arm(self) -> None:
        """Start an interval: protect everything so the next touch is recorded."""
        for t in self.regions:
            r = t.region
            if self.mode is TrackingMode.RWP:
                self.uffd.rwprotect(r.host_virt_addr, r.size, protect=True)
            else:
                self.uffd.writeprotect(r.host_virt_addr, r.size, protect=True)

    def _scan(self, t: TrackedRegion) -> npt.NDArray[np.bool_]:
        r = t.region
        if self.mode is TrackingMode.RWP:
            res = self.pagemap.scan(r.host_virt_addr, r.size, category_mask=PageCategory.ACCESSED)
        else:
            res = self.pagemap.scan(
                r.host_virt_addr,
                r.size,
                category_mask=PageCategory.WRITTEN,
                flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
            )
        return res.bitmap(r.host_virt_addr, t.npages, r.page_size)

    async def cycle(self, hook: Hook | None = None) -> list[npt.NDArray[np.bool_]]:
        """End the current interval: scan the hot set, run ``hook``, start the next one."""
        if self.mode is TrackingMode.RWP:
            self.uffd.set_mode(disable=Feature.RWP_ASYNC)
            self._in_window = True
        try:
            hot = [self._scan(t) for t in self.regions]
            now = self.clock()
            for t, h in zip(self.regions, hot, strict=True):
                t.state.observe(h, t.resident(), now)
            if hook is not None:
                await hook(self, hot)
        finally:
            if self.mode is TrackingMode.RWP:
                # Re-arm while still sync, then go async: an access after the
                # RWPROTECT lands in the next interval, and none falls in a gap
                # between going async and re-arming.  Going async also
                # releases any thread still blocked on an RWP fault.
                self.arm()
                self._in_window = False
                self.uffd.set_mode(enable=Feature.RWP_ASYNC)
        self.cycles += 1
        return hot

    def on_fault(self, fault: PageFault) -> bool:
        """Resolve a tracking fault; False if it is not ours (e.g. MISSING: the evictor's).

        An RWP fault can only happen inside the sync window: the page is being
        accessed, so it is hot; unprotect and wake it at once.
        """
        if not fault.is_rwp:
            return False
        t = self.region_at(fault.address)
        if t is None:
            return False
        r = t.region
        page = (fault.address - r.host_virt_addr) // r.page_size
        self.uffd.rwprotect(r.host_virt_addr + page * r.page_size, r.page_size, protect=False)
        t.state.note_fault([page])
        self.sync_faults += 1
        return True

    def region_at(self, addr: int) -> TrackedRegion | None:
        for t in self.regions:
            if t.region.host_virt_addr <= addr < t.region.host_end:
                return t
        return None

    def close(self) -> None:
        """Unprotect and drop our fds.  The VMM keeps its uffd copy and memory."""
        try:
            if self.mode is TrackingMode.RWP:
                self.uffd.set_mode(enable=Feature.RWP_ASYNC)
        finally:
            self.pagemap.close()
            self.uffd.close()
