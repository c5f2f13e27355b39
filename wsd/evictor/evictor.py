"""Eviction of one VM, run by the tracker inside its sync window.

Why inside the window: in ``rwp`` mode the window is when every access to a
protected page blocks and raises an RWP fault.  A candidate page is idle, so
it is still protected from the start of the interval; while a batch is read,
stored and synced, any vCPU touching one of its pages blocks, and the fault
handler unprotects the page and records it as touched.  The commit (which
runs with no ``await`` in it, so no fault handler can interleave) drops every
touched page from the batch before punching.  A vCPU whose fault is still
unread at the commit has not accessed the page yet: it is woken after the
punch, re-faults as MISSING and gets the stored bytes, which are current.

In ``wp-async`` mode there is no such window (``SET_MODE`` cannot toggle
``WP_ASYNC``), so a write between the read and the punch would be lost; the
evictor refuses to run there (see docs/evictor.md and the degraded-mode issue).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from wsd.kernel import KernelError, RegisterMode
from wsd.storage import StorageError
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion, VmTracker

from . import pagemap
from .context import VmContext
from .policy import pages_for_bytes, select
from .transaction import punch_and_wake, read_pages

log = structlog.get_logger("wsd.evictor")

HostRoom = Callable[[], int | None]
"""Bytes the host-wide cap still allows to be evicted (None: no cap)."""


def unevictable_reason(ctx: VmContext, t: TrackedRegion) -> str | None:
    """Why no page of ``t`` may be evicted, or None."""
    if ctx.tracker.mode is not TrackingMode.RWP:
        return (
            f"{ctx.tracker.mode} tracking has no sync window to make eviction race-free (needs rwp)"
        )
    if not t.state.granularity.evictable:
        return f"{t.state.granularity}: accesses cannot be trapped (RWP-FACTS fact 8)"
    if RegisterMode.MISSING not in ctx.tracker.decision.register_mode:
        return "MISSING is not registered: an evicted page could not be fetched back"
    return None


class Evictor:
    def __init__(
        self,
        ctx: VmContext,
        *,
        state_dir: Path | None = None,
        host_room: HostRoom | None = None,
    ) -> None:
        self.ctx = ctx
        self.state_dir = state_dir
        self.host_room = host_room
        self.reasons = [unevictable_reason(ctx, t) for t in ctx.tracker.regions]
        for i, reason in enumerate(self.reasons):
            if reason and ctx.config.enabled:
                log.warning("region not evicted", vm_id=ctx.vm_id, region=i, reason=reason)
        if ctx.store is not None and not ctx.store.durable and not ctx.config.allow_volatile_store:
            raise ValueError(
                f"storage {ctx.store.name!r} is not durable: a wsd crash would lose every "
                "evicted page.  Put a durable tier below it, or set "
                "evictor.allow_volatile_store = true to accept that"
            )

    async def __call__(self, tracker: VmTracker, hot: list[npt.NDArray[np.bool_]]) -> None:
        """The tracker's cycle hook: one eviction window."""
        ctx = self.ctx
        cfg = ctx.config
        if not cfg.enabled or ctx.store is None or not tracker.in_window:
            return
        ctx.stats.windows += 1
        await self._flush_discards()
        now = ctx.clock()
        wss = sum(t.state.working_set()[1].pages or 0 for t in tracker.regions)
        threshold = ctx.vm.adapt(now, wss)
        budget = ctx.vm.byte_budget(now)
        room = self.host_room() if self.host_room is not None else None
        if room is not None:
            budget = room if budget is None else min(budget, room)
        over = self._over_target_bytes()
        pages_left = cfg.max_pages_per_window
        spent = 0
        for i, t in enumerate(tracker.regions):
            if self.reasons[i] is not None or pages_left <= 0:
                continue
            ps = t.region.page_size
            limit = min(pages_left, pages_for_bytes(None if budget is None else budget - spent, ps))
            chosen = select(
                t.state,
                ctx.policies[i],
                threshold=threshold,
                limit=limit,
                over_target_pages=-(-over // ps) if over > 0 else 0,
            )
            pages_left -= len(chosen)
            for k in range(0, len(chosen), cfg.batch_pages):
                batch = np.sort(chosen[k : k + cfg.batch_pages])
                done = await self.evict_batch(i, t, batch)
                if done < 0:
                    break  # the store is failing: try again next window
                spent += done * ps
                over -= done * ps
        if budget is not None:
            ctx.vm.refund(now, budget - spent)

    def _over_target_bytes(self) -> int:
        target = self.ctx.config.resident_target_bytes
        if target is None:
            return 0
        resident = sum(
            t.state.resident_pages * t.region.page_size for t in self.ctx.tracker.regions
        )
        return max(0, resident - int(target))

    async def _flush_discards(self) -> None:
        ctx = self.ctx
        assert ctx.store is not None
        for i, pages in enumerate(ctx.discards):
            if not pages:
                continue
            ps = ctx.namespaces[i].page_size
            offsets = [p * ps for p in sorted(pages)]
            pages.clear()
            try:
                await ctx.store.discard(ctx.namespaces[i], offsets)
            except StorageError as e:
                log.warning("discarding fetched pages failed", vm_id=ctx.vm_id, error=str(e))

    async def evict_batch(self, i: int, t: TrackedRegion, pages: npt.NDArray[np.int64]) -> int:
        """One transaction over ``pages`` (ascending) of region ``i``.

        Returns the pages evicted, or -1 if the batch failed (nothing evicted).
        The caller guarantees no access to them can slip by untrapped: the
        cycle hook runs it inside the sync window, tests on a quiescent guest.
        """
        ctx = self.ctx
        assert ctx.store is not None
        r = t.region
        gens = (t.state.generations[pages].astype(np.int64) + 1) & 0xFFFFFFFF
        try:
            data = await asyncio.to_thread(read_pages, t.memfd, r, pages)
            generation = dict(zip(data, gens.tolist(), strict=True))
            await ctx.store.put(ctx.namespaces[i], data, generation=generation)
            await ctx.store.sync()
            if self.state_dir is not None:
                await asyncio.to_thread(pagemap.save, self.state_dir, self._map_with(i, pages))
        except (StorageError, KernelError, OSError) as e:
            ctx.stats.failed_batches += 1
            log.warning(
                "eviction batch failed, nothing evicted",
                vm_id=ctx.vm_id,
                region=i,
                pages=len(pages),
                error=str(e),
            )
            return -1
        # The commit: no await from here on, so no fault handler runs in between.
        touched = np.fromiter(t.touched, np.int64, len(t.touched))
        keep = pages[~np.isin(pages, touched)]
        keep = keep[t.state.settled_mask(keep)]
        ctx.stats.skipped_touched += len(pages) - len(keep)
        if not len(keep):
            return 0
        t.state.note_evicted(keep)
        ctx.policies[i].note_evicted(keep, ctx.tracker.cycles)
        ctx.discards[i].difference_update(keep.tolist())
        try:
            punch_and_wake(ctx.tracker.uffd, t.memfd, r, keep)
        except KernelError as e:
            # The pages stay marked evicted but (some) resident: the memfd wins
            # wherever it has data, and no further eviction touches them until a
            # resident walk settles them.
            log.error("punching evicted pages failed", vm_id=ctx.vm_id, region=i, error=str(e))
        ctx.stats.batches += 1
        ctx.stats.evicted_pages += len(keep)
        ctx.stats.evicted_bytes += len(keep) * r.page_size
        return len(keep)

    def _map_with(self, region: int, batch: npt.NDArray[np.int64]) -> pagemap.VmMap:
        """The page map as it will be once ``batch`` of ``region`` is evicted."""
        out = []
        for i, t in enumerate(self.ctx.tracker.regions):
            evicted = t.state.evicted
            gens = t.state.generations.copy()
            if i == region:
                evicted[batch] = True
                gens[batch] += np.uint32(1)
            r = t.region
            out.append(pagemap.region_map(r.offset, r.size, r.page_size, evicted, gens))
        return pagemap.VmMap(self.ctx.vm_id, tuple(out))
