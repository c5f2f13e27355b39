"""Guest memory life events: the VMM discards, unmaps or moves guest memory.

The uffd reports them as non-cooperative events (negotiated in
:data:`wsd.tracker.session.OPTIONAL`).  They are synchronous for the VMM:
its ``madvise``, ``munmap`` or ``mremap`` waits until wsd has *read* the
message, not until wsd has handled it.  So :func:`on_event` runs from the uffd
reader, on the event loop, and changes state at once, without awaiting.

**REMOVE** (``MADV_DONTNEED``/``MADV_REMOVE`` on the registered range: a
balloon inflating, free page reporting).  The kernel sends it *before* it
zaps the range.  For every page fully inside it:

- the region state forgets the page (:meth:`RegionState.note_removed`): not
  evicted, not resident, and its generation moves on;
- the stored copies of the pages that were evicted are queued for discard,
  and prepared (stored, not yet punched) pages leave the evictor's batches;
- the pages the page map on disk lists are journalled ``REMOVED`` at once,
  so a restarted wsd does not bring them back from storage (:mod:`.pagemap`).

Why the generation (the ordering argument, docs/life-events.md): a fetch in
flight for a removed page read the generation before its ``get``; it checks
it again before ``UFFDIO_COPY``, with no ``await`` between the check and the
copy, finds it moved, and installs a zero page instead.  A commit compares
each prepared page's generation with the one read at prepare, in the same
step as its punch, and drops the page if it moved.  Since the event is
handled on the loop, each of those checks sees the removal either entirely
or not at all.

**UNMAP** and **REMAP** (``munmap``, ``mremap``; virtio-mem or DIMM unplug, a
VMM moving memory): a region moved whole by ``mremap`` is re-addressed and
tracked on.  Any other overlap *detaches* the region: it is no longer
scanned, armed or evicted, its evicted pages are written back into the memfd
(which outlives the mapping), and the ranges that may still carry its
registration are unregistered, which also wakes any thread blocked there.

An ``mremap`` sends REMAP and then UNMAP of the range it moved from (seen on
6.18 and 7.3: the move unmaps the old range with the uffd still attached).  By
the time the UNMAP is read, a region moved whole already has its new address,
so the UNMAP overlaps nothing; a partly moved one is detached already, and
detached regions ignore further events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

import numpy as np
import structlog

from wsd import recovery
from wsd.kernel import (
    ForkEvent,
    KernelError,
    RemapEvent,
    RemoveEvent,
    UffdMessage,
    UnmapEvent,
)
from wsd.storage import StorageError

from .drain import restore_to_memfd
from .evictor import Evictor, unevictable_reason
from .guards import update_reasons

if TYPE_CHECKING:
    from .faults import FaultService

log = structlog.get_logger("wsd.evictor")


def on_event(faults: FaultService, evictor: Evictor, msg: UffdMessage) -> None:
    """Handle one non-fault uffd message; never raises for a bad range."""
    if isinstance(msg, RemoveEvent):
        on_remove(faults, evictor, msg.start, msg.end)
    elif isinstance(msg, UnmapEvent):
        on_unmap(faults, evictor, msg.start, msg.end)
    elif isinstance(msg, RemapEvent):
        on_remap(faults, evictor, msg.from_addr, msg.to_addr, msg.length)
    elif isinstance(msg, ForkEvent):
        # wsd never negotiates EVENT_FORK; if one comes anyway, its fd is ours
        # to close (the kernel installed it in our table).
        log.warning("unexpected fork event: closing its uffd", vm_id=evictor.ctx.vm_id)
        os.close(msg.uffd)
    else:
        log.warning("unexpected uffd message", vm_id=evictor.ctx.vm_id, message=repr(msg))


def on_remove(faults: FaultService, evictor: Evictor, start: int, end: int) -> None:
    """The VMM discarded ``[start, end)``: those pages are fresh from now on."""
    ctx = evictor.ctx
    tracker = ctx.tracker
    for i, t in enumerate(tracker.regions):
        r = t.region
        lo, hi = max(start, r.host_virt_addr), min(end, r.host_end)
        if lo >= hi or t.vanished is not None:
            continue
        # Only whole pages: the kernel discards nothing less.
        first = -(-(lo - r.host_virt_addr) // r.page_size)
        last = (hi - r.host_virt_addr) // r.page_size
        if first >= last:
            continue
        pages = np.arange(first, last, dtype=np.int64)
        listed_at = t.state.generations[pages]
        # What the map on disk lists: evicted pages, and pages evicted once
        # and fetched back since the last snapshot, whose holes a restart
        # would take for evicted pages too.
        listed = pages[evictor.listed[i][pages]]
        stale = t.state.note_removed(pages)
        evictor.listed[i][pages] = False
        if t.remnants:
            t.remnants.difference_update(range(first, last))
        dropped = np.concatenate((evictor.forget_prepared(i, pages), evictor.committing(i, pages)))
        ctx.discards[i].update(stale.tolist())
        ctx.discards[i].update(dropped.tolist())
        tracker.removed_pages += last - first
        tracker.removed_evicted_pages += len(stale)
        log.info(
            "guest pages removed by the VMM",
            vm_id=ctx.vm_id,
            region=i,
            first_page=first,
            pages=last - first,
            were_evicted=len(stale),
            were_prepared=len(dropped),
        )
        if len(listed) or len(dropped):
            # Prepared pages, and those a commit has yet to settle, are listed
            # at their next generation.
            logged = evictor.log_removed(
                i,
                np.concatenate((listed, dropped)),
                np.concatenate((listed_at[listed - first], listed_at[dropped - first] + 1)),
            )
            if not logged:
                faults.spawn(evictor.save_map())  # a snapshot holds it instead


def on_unmap(faults: FaultService, evictor: Evictor, start: int, end: int) -> None:
    """The VMM unmapped ``[start, end)``."""
    for i, t in enumerate(evictor.ctx.tracker.regions):
        r = t.region
        if t.vanished is None and start < r.host_end and r.host_virt_addr < end:
            whole = start <= r.host_virt_addr and r.host_end <= end
            why = "unmapped by the VMM" if whole else "partly unmapped by the VMM"
            detach(
                faults,
                evictor,
                i,
                why,
                still_registered=[] if whole else [(r.host_virt_addr, r.size)],
            )


def on_remap(faults: FaultService, evictor: Evictor, src: int, dst: int, length: int) -> None:
    """The VMM moved ``[src, src + length)`` to ``dst`` (``mremap``)."""
    ctx = evictor.ctx
    tracker = ctx.tracker
    for i, t in enumerate(tracker.regions):
        r = t.region
        if t.vanished is not None or not (src < r.host_end and r.host_virt_addr < src + length):
            continue
        if src <= r.host_virt_addr and r.host_end <= src + length:
            new = dst + (r.host_virt_addr - src)
            log.info(
                "region moved by the VMM",
                vm_id=ctx.vm_id,
                region=i,
                old=hex(r.host_virt_addr),
                new=hex(new),
            )
            tracker.relocate(i, new)
            _persist(faults, evictor, i, host_virt_addr=new)
            continue
        # Part of the region moved: its registration went along, to addresses
        # no region describes.  Keep it simple: stop tracking the region.
        lo, hi = max(src, r.host_virt_addr), min(src + length, r.host_end)
        moved = (dst + (lo - src), hi - lo)
        detach(
            faults,
            evictor,
            i,
            "partly moved by the VMM (mremap)",
            still_registered=[(r.host_virt_addr, r.size), moved],
        )


def detach(
    faults: FaultService,
    evictor: Evictor,
    i: int,
    why: str,
    *,
    still_registered: list[tuple[int, int]],
) -> None:
    """Stop tracking region ``i``; write its evicted pages back, then let it go."""
    ctx = evictor.ctx
    t = ctx.tracker.regions[i]
    t.vanished = why
    dropped = evictor.forget_prepared(i, None)
    ctx.discards[i].update(dropped.tolist())
    update_reasons(evictor, unevictable_reason)
    log.warning(
        "region detached: no longer tracked or evicted",
        vm_id=ctx.vm_id,
        region=i,
        why=why,
        evicted_pages=t.state.evicted_pages,
    )
    faults.spawn(_release(faults, evictor, i, still_registered))
    _persist(faults, evictor, i, vanished=why)


def _persist(
    faults: FaultService,
    evictor: Evictor,
    i: int,
    *,
    host_virt_addr: int | None = None,
    vanished: str | None = None,
) -> None:
    """Update the session description (wsd.recovery), off the loop, so a resume sees the change."""
    state_dir, vm_id = evictor.state_dir, evictor.ctx.vm_id
    if state_dir is None:
        return

    async def write() -> None:
        try:
            await asyncio.to_thread(
                evictor.write_state,
                recovery.note_region_change,
                state_dir,
                vm_id,
                i,
                host_virt_addr=host_virt_addr,
                vanished=vanished,
            )
        except (OSError, recovery.RecoveryError) as e:
            log.warning("recording a region change failed", vm_id=vm_id, region=i, error=str(e))

    faults.spawn(write())


async def _release(
    faults: FaultService, evictor: Evictor, i: int, still_registered: list[tuple[int, int]]
) -> None:
    ctx = evictor.ctx
    t = ctx.tracker.regions[i]
    # A verified punch in flight writes its pages back into the memfd once
    # it sees the region detached; the registration must outlive that.
    await ctx.in_flight.settled()
    try:
        written = await restore_to_memfd(ctx, i, faults.fetching)
    except (StorageError, KernelError) as e:
        log.error(
            "a detached region's evicted pages could not be written back; they stay in storage",
            vm_id=ctx.vm_id,
            region=i,
            pages=t.state.evicted_pages,
            error=str(e),
        )
        return
    evictor.map_dirty = True
    await evictor.save_map()
    uffd = ctx.tracker.uffd
    for start, length in still_registered:
        # What is left of the registration (the rest of a partly unmapped
        # region, the moved part of a partly moved one) goes: faults there
        # are the kernel's again, served from the memfd, which now holds
        # every page.  Unregistering wakes any thread blocked there.
        try:
            uffd.unregister(start, length)
        except KernelError as e:
            log.debug("unregistering a detached range", vm_id=ctx.vm_id, error=str(e))
        with contextlib.suppress(KernelError):
            uffd.wake(start, length)
    log.info("detached region released", vm_id=ctx.vm_id, region=i, pages_written_back=written)
