"""Memory wsd must not punch: DMA-pinned by the VMM, or mapped by another process.

- **DMA pins** (VFIO passthrough, RDMA, io_uring fixed buffers): a device
  writes guest pages without faulting.  Punching such a page frees it under
  the device; its next DMA lands in a freed page and the guest never sees it.
  wsd trusts three signals: the hand-off's per-region ``dma_pinned`` flag;
  ``VmPin`` in ``/proc/<vmm>/status`` (``mm->pinned_vm``), which says pages are
  pinned but not which: then no region of that VM is evicted; and the
  registered buffers of the VMM's io_uring instances, from their ``fdinfo``:
  a region they overlap is not evicted.  The last is needed because ``VmPin``
  misses io_uring buffers of a VMM with ``CAP_IPC_LOCK`` (Linux 7.3 does not
  account them), and it is precise, so buffers in the VMM's own memory do not
  stop eviction.
- **Other mappers** of a guest memfd (vhost-user backends, virtiofsd, DPDK):
  their mappings are not registered with wsd's uffd, so after a punch their
  next access to the hole silently maps a fresh zero page.  wsd finds them by
  scanning ``/proc/*/maps`` for the memfd's device and inode, and refuses to
  evict any region of that memfd while one exists.  If pages were evicted
  before the mapper appeared, they are written back into the memfd at once.
- **Aliases in the VMM itself**: a second mapping of a region's pages
  elsewhere in the VMM (shared or private) is just as unregistered.  The same
  walk reads the VMM's own ``maps`` and keeps such a region from eviction.

The pins are read (in a thread) before each prepare: a few small files of
the VMM's.  In rwp mode a pin that appears after that read is still safe: its
GUP is an access, which keeps its pages from the punch in the window.
wp-async has no window, and its punch comes an interval after the prepare, so
there the pins are read once more right before the commit
(``Evictor.commit``); only a pin made during the commit itself can still meet
its punch.  The ``/proc``
walk for other mappers is slow, so it runs before the session's first
eviction and then every :data:`CHECK_EVERY_CYCLES` cycles.  A mapper that
appears between two walks can see holes for up to that many intervals:
a VMM that starts a backend after the hand-off should hand off again, or set
``dma_pinned``/keep eviction off for that VM (docs/life-events.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from wsd.kernel import FileId, UringBuffers, file_id, io_uring_buffers, mappers_of, pinned_bytes
from wsd.kernel.procfs import Mapping, read_maps
from wsd.tracker.session import TrackedRegion
from wsd.vmm.protocol import Region

from .drain import restore_to_memfd

if TYPE_CHECKING:
    from .context import VmContext
    from .evictor import Evictor

log = structlog.get_logger("wsd.evictor")

Reason = Callable[["VmContext", TrackedRegion], "str | None"]

CHECK_EVERY_CYCLES = 10
PROC = Path("/proc")


def guard_reason(ctx: VmContext, t: TrackedRegion) -> str | None:
    """Why a life event, a DMA pin or another mapper keeps ``t`` from eviction, or None."""
    if t.vanished is not None:
        return f"region {t.vanished}"
    if t.region.dma_pinned:
        return "dma_pinned: a device may DMA into this region, a punched page would be lost"
    if ctx.tracker.pinned_bytes:
        return (
            f"the VMM has {ctx.tracker.pinned_bytes >> 10} KiB pinned (VmPin): a device may "
            "DMA into any region"
        )
    if ctx.tracker.uring_unlisted is not None:
        return (
            "the VMM has io_uring registered buffers wsd cannot place "
            f"({ctx.tracker.uring_unlisted}): the kernel may write into any region"
        )
    if t.uring_bytes:
        return (
            f"io_uring registered buffers of the VMM cover {t.uring_bytes >> 10} KiB of this "
            "region: the kernel writes them without faulting, a punched page would be lost"
        )
    if t.other_mappers:
        pids = ", ".join(map(str, t.other_mappers))
        return (
            f"other processes map this region's memfd (pids {pids}): after a punch they "
            "would read zeros"
        )
    if t.aliased_at is not None:
        return (
            f"the VMM maps this region's pages a second time, at {t.aliased_at:#x}, where no "
            "uffd traps its accesses: after a punch it would read zeros there"
        )
    return None


@dataclass(frozen=True)
class GuardReading:
    pinned_bytes: int
    mappers: dict[FileId, set[int]] | None
    """None: not read this time."""
    uring: UringBuffers
    aliases: dict[int, int] | None = None
    """Regions (by index) the VMM also maps elsewhere: the address of such a
    mapping.  None: not read this time."""


def read_guards(
    vmm_pid: int | None,
    regions: Sequence[tuple[FileId, Region]] | None,
    *,
    proc: Path = PROC,
) -> GuardReading:
    """VmPin and io_uring buffers of the VMM, and unless ``regions`` (each
    region with its memfd) is None their memfds' other mappers and the VMM's
    aliases of them (blocking: run in a thread)."""
    pinned = 0
    uring = UringBuffers()
    if vmm_pid is not None:
        try:
            pinned = pinned_bytes(vmm_pid, proc=proc)
            uring = io_uring_buffers(vmm_pid, proc=proc)
        except ProcessLookupError:
            pass  # the VMM is gone; the session ends on its own
    if regions is None:
        return GuardReading(pinned, None, uring)
    exclude = {os.getpid()} | ({vmm_pid} if vmm_pid is not None else set())
    mappers = mappers_of([file for file, _ in regions], exclude=exclude, proc=proc)
    found: dict[int, int] = {}
    if vmm_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            found = aliases(read_maps(vmm_pid, proc=proc), regions)
    return GuardReading(pinned, mappers, uring, found)


def aliases(
    mappings: Sequence[Mapping], regions: Sequence[tuple[FileId, Region]]
) -> dict[int, int]:
    """The regions (by index) whose pages ``mappings`` also map at other addresses
    (a region is ``(memfd, region)``): the first such address of each."""
    out: dict[int, int] = {}
    for m in mappings:
        for i, (file, r) in enumerate(regions):
            if i in out or m.file != file:
                continue
            low, high = max(m.offset, r.offset), min(m.offset + m.size, r.offset + r.size)
            # The same offset at another address: not the region's own mapping.
            if low < high and m.start - m.offset != r.host_virt_addr - r.offset:
                out[i] = m.start + (low - m.offset)
    return out


async def check(
    evictor: Evictor,
    reason: Reason,
    *,
    proc: Path = PROC,
    force: bool = False,
    pins_only: bool = False,
) -> None:
    """Re-read the VMM's pins, and every :data:`CHECK_EVERY_CYCLES` cycles (and
    first thing, or with ``force``) the other mappers, never with ``pins_only``;
    then recompute which regions may be evicted, logging every change."""
    ctx = evictor.ctx
    tracker = ctx.tracker
    ids = regions = None
    if not pins_only and (
        force
        or tracker.guards_checked_at is None
        or (tracker.cycles - tracker.guards_checked_at >= CHECK_EVERY_CYCLES)
    ):
        tracker.guards_checked_at = tracker.cycles
        ids = [file_id(t.memfd) for t in tracker.regions]
        regions = [(fid, t.region) for fid, t in zip(ids, tracker.regions, strict=True)]
    try:
        reading = await asyncio.to_thread(read_guards, tracker.pagemap.pid, regions, proc=proc)
    except OSError as e:
        log.warning("checking pins and other mappers failed", vm_id=ctx.vm_id, error=str(e))
    else:
        apply(evictor, reading, ids)
    update_reasons(evictor, reason)
    for i, t in enumerate(tracker.regions):
        if (t.other_mappers or t.aliased_at is not None) and t.state.evicted_pages:
            log.warning(
                "evicted memory is mapped where no uffd traps it: writing it back into the memfd",
                vm_id=ctx.vm_id,
                region=i,
                pages=t.state.evicted_pages,
                pids=list(t.other_mappers),
                vmm_alias=None if t.aliased_at is None else hex(t.aliased_at),
            )
            await restore_to_memfd(ctx, i)


def _log_change(appeared: object, warning: str, gone: str, **fields: object) -> None:
    """A guard signal changed: a warning while it holds eviction back, info once it is gone."""
    if appeared:
        log.warning(warning, **fields)
    else:
        log.info(gone, **fields)


def apply(evictor: Evictor, reading: GuardReading, ids: Sequence[FileId] | None) -> None:
    """Record a reading on the tracker; log what changed."""
    ctx = evictor.ctx
    tracker = ctx.tracker
    pid = tracker.pagemap.pid
    if reading.pinned_bytes != tracker.pinned_bytes:
        _log_change(
            reading.pinned_bytes,
            "the VMM pins memory (VmPin): no page of this VM is evicted",
            "the VMM pins no memory any more (VmPin 0)",
            vm_id=ctx.vm_id,
            pid=pid,
            pinned_bytes=reading.pinned_bytes,
        )
        tracker.pinned_bytes = reading.pinned_bytes
    uring = reading.uring
    if uring.unlisted != tracker.uring_unlisted:
        _log_change(
            uring.unlisted is not None,
            "the VMM's io_uring buffers cannot all be placed: no page of this VM is evicted",
            "the VMM's io_uring buffers can all be placed again",
            vm_id=ctx.vm_id,
            pid=pid,
            why=uring.unlisted,
        )
        tracker.uring_unlisted = uring.unlisted
    for i, t in enumerate(tracker.regions):
        covered = uring.covered(t.region.host_virt_addr, t.region.size)
        if covered != t.uring_bytes:
            _log_change(
                covered,
                "io_uring registered buffers of the VMM cover this region: not evicted "
                "while they do",
                "no io_uring buffer of the VMM covers this region now",
                vm_id=ctx.vm_id,
                region=i,
                covered_bytes=covered,
            )
            t.uring_bytes = covered
    if reading.mappers is None or ids is None:
        return
    for i, (t, fid) in enumerate(zip(tracker.regions, ids, strict=True)):
        pids = tuple(sorted(reading.mappers.get(fid, ())))
        if pids != t.other_mappers:
            _log_change(
                pids,
                "other processes map this region's memfd: not evicted while they do",
                "no other process maps this region's memfd now",
                vm_id=ctx.vm_id,
                region=i,
                memfd=str(fid),
                pids=list(pids),
            )
            t.other_mappers = pids
    for i, t in enumerate(tracker.regions):
        at = (reading.aliases or {}).get(i)
        if at != t.aliased_at:
            _log_change(
                at is not None,
                "the VMM maps this region's pages a second time: not evicted while it does",
                "the VMM maps this region's pages once now",
                vm_id=ctx.vm_id,
                region=i,
                alias=None if at is None else hex(at),
            )
            t.aliased_at = at


def update_reasons(evictor: Evictor, reason: Reason) -> None:
    """Recompute ``evictor.reasons`` with ``reason`` (``unevictable_reason``); log
    each region whose reason changed."""
    ctx = evictor.ctx
    for i, t in enumerate(ctx.tracker.regions):
        now = reason(ctx, t)
        if now != evictor.reasons[i]:
            if now is not None:
                log.warning("region not evicted", vm_id=ctx.vm_id, region=i, reason=now)
            else:
                log.info("region evictable again", vm_id=ctx.vm_id, region=i)
            evictor.reasons[i] = now
