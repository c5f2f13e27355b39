"""Eviction of one VM in two phases, so that a vCPU never waits for storage I/O.

**Prepare**, between two windows (the uffd is async, the guest runs freely):
select cold pages from the ages of the last scan, ``pread`` them from the
memfd, ``put`` them and wait for ``sync``, and persist the page map listing
them.  Every candidate was idle for a whole interval, so the ``RWPROTECT``
that closed the last window protects it: any access from then on clears the
protection and shows as ``PAGE_IS_ACCESSED`` in the next scan, unless its
PTE is unmapped before the scan (shmem only: see :func:`content_checked`).

**Commit**, inside the next sync window, right after its scan, with no
``await`` (so no fault handler runs in between): drop every prepared page
the scan found accessed or whose RWP/MINOR fault arrived during the window,
and on shmem every page whose bytes changed since its read, then punch the
rest and ``UFFDIO_WAKE`` them.  A page accessed after its
``pread`` is therefore never punched; a vCPU that blocked on a page in the
window before the commit has not accessed it, is woken after the punch,
re-faults as MISSING and gets the stored bytes, which are current.

The window itself holds no storage I/O: its length is the scan, the content
check's ``pread`` from the page cache, and the punches, and
``max_pages_per_window`` bounds the last two.

In ``wp-async`` mode there is no window (``SET_MODE`` cannot toggle
``WP_ASYNC``, and there is no RWP), so nothing stops a write between the read
and the punch.  The commit makes such a write impossible to lose instead of
impossible to happen (:func:`~wsd.evictor.transaction.punch_held`): it
takes references to the pages before punching, reads their final bytes after,
and puts back every page whose final bytes differ from what was stored.  That
work runs in a thread, and faults on the pages in flight wait for it
(:mod:`.inflight`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from wsd.cancellation import despite_cancellation
from wsd.kernel import KernelError, RegisterMode
from wsd.storage import StorageError, TierTimeout
from wsd.storage.concurrency import LifoPool
from wsd.storage.fsops import fsync_dir
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion, VmTracker
from wsd.vmm.protocol import Region

from . import guards, held, pagemap
from .context import VmContext
from .faults import restore_remnant
from .guards import guard_reason
from .outage import StoreBackoff
from .policy import pages_for_bytes, select
from .transaction import (
    HeldPunch,
    PunchedUnread,
    changed_since_read,
    digests,
    holds_data,
    not_punched,
    place,
    punch_and_wake,
    punch_held,
    put_back,
    read_pages,
)

log = structlog.get_logger("wsd.evictor")

# Prepare's bulk work (reading pages out of the memfd, their digests) runs on
# threads below the event loop's priority, so that it never holds the CPU a
# fault being served needs (wsd.priority).  Shared by every session; the
# threads start on first use and never keep the process alive.
_BACKGROUND = LifoPool(threads=2, name="wsd-evict", background=True)
# wp-async's verified punches (transaction.punch_held).  Below the loop's
# priority too: at its level a punch holds the loop's CPU for its whole
# length, and fault service is back to waiting for it (docs/benchmarks.md).
_PUNCH = LifoPool(threads=2, name="wsd-punch", background=True)

T = TypeVar("T")

# Pages punched per step of a commit; faults are served between steps.
COMMIT_CHUNK = 128
# rwp on shmem: at most this many bytes read back per step, on the loop
# (content_checked; a 2 MiB page is a step).
CHECKED_CHUNK_BYTES = 512 << 10
# wp-async: at most this many bytes per verified punch.  It runs in a thread,
# so steps can be longer than on the loop: each one costs a thread round trip
# and the page state's update on the loop, and 2 MiB evicted 4 to 20% more
# MB/s than 512 KiB (docs/benchmarks.md).  The pages are held in pipes
# meanwhile, and faults on them wait (inflight.py): about 3 ms.
VERIFIED_CHUNK_BYTES = 2 << 20
# The page map's snapshot is rewritten once its journal holds this many
# records, or a quarter as many as the snapshot lists pages if that is more:
# each compaction costs O(guest pages), so this keeps it O(1) per page
# evicted, and a restart's replay of the journal a fraction of its read of
# the snapshot.
COMPACT_MIN_RECORDS = 1 << 16
COMPACT_SNAPSHOT_FRACTION = 4
# How far above the highest generation about to be stored the generation
# ceiling is raised (pagemap.save_ceiling).  A restart or a new session of
# the VM lifts every page the map does not list to it, so this is also what
# each spends of the 2^32 generations.
CEILING_STEP = 1 << 10

HostRoom = Callable[[], int | None]
"""Bytes the host-wide cap still allows to be evicted (None: no cap)."""


def unevictable_reason(ctx: VmContext, t: TrackedRegion) -> str | None:
    """Why no page of ``t`` may be evicted, or None."""
    guarded = guard_reason(ctx, t)  # life events, DMA pins, other mappers
    if guarded is not None:
        return guarded
    if not t.state.granularity.evictable:
        return f"{t.state.granularity}: accesses cannot be trapped (RWP-FACTS fact 8)"
    if RegisterMode.MISSING not in ctx.tracker.decision.register_mode:
        return "MISSING is not registered: an evicted page could not be fetched back"
    return None


def content_checked(mode: TrackingMode, t: TrackedRegion) -> bool:
    """Whether the commit compares ``t``'s pages with their stored bytes before the punch.

    wp-async: always (there is no window; :func:`.transaction.punch_held`).
    rwp: on 4 KiB shmem regions.  There the scan can miss a write: whatever
    unmaps a shmem PTE (khugepaged collapsing the range into a THP, reclaim,
    ``MADV_PAGEOUT``) drops its RWP state with it, and an unmapped page reads
    as not accessed.  So a page written after its read, then unmapped before
    the scan, would be punched with stale bytes stored.  (Linux 7.3 leaves a
    marker in an unmapped PTE for uffd-wp, not for RWP; docs/evictor.md.)
    Not on hugetlbfs, whose pages are never collapsed or reclaimed, and
    whose 2 MiB reads would lengthen the window most.
    """
    return mode is TrackingMode.WP_ASYNC or not t.region.hugetlb


@dataclass(frozen=True)
class Prepared:
    """Pages of one region read and durable in the store (at generation + 1), not punched."""

    region: int
    pages: npt.NDArray[np.int64]
    # Digests of the bytes stored, by byte offset in the region, where the
    # commit compares them with the pages' bytes (content_checked).
    stored: Mapping[int, bytes] | None = None
    # Each page's generation when it was read: a page whose generation moved
    # since (removed by the VMM) is not punched, its stored bytes are stale.
    generations: npt.NDArray[np.uint32] | None = None


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
        self._prepared: list[Prepared] = []
        self._committing: list[Prepared] = []  # what the commit under way has left
        self._scratch = bytearray()  # the bytes of the pages being punched, to compare
        # wp-async: a session that can survive a crash (it has state) keeps its
        # verified punches' pipes in the fd store (held.py).
        self.parking = held.Parking(ctx.vm_id) if state_dir is not None else None
        # The page map's snapshot must be rewritten (a journal write failed,
        # a region was written back); writes of it are serialised, so an
        # older snapshot never replaces a newer one.
        self.map_dirty = False
        self._map_lock = asyncio.Lock()
        # Which pages the map on disk lists (snapshot and journal), outside
        # the prepared batches, each at its generation in the tracker: a
        # listed page the VMM discards must be journalled REMOVED, or a
        # restart would take its hole for an evicted page.  A resumed
        # session's listed pages are its evicted ones and those the context
        # took as listed but resident (its discards, so far).
        self.listed = [
            _listed_now(t, d) for t, d in zip(ctx.tracker.regions, ctx.discards, strict=True)
        ]
        # The journal appended to, and how many records it and its
        # predecessors since the snapshot hold; the snapshot's page count.
        self._journal_seq: int | None = None
        if state_dir is not None:
            try:
                self._journal_seq = pagemap.next_journal(state_dir, ctx.vm_id)
            except pagemap.PageMapError as e:
                # A snapshot that cannot be read is replaced by the first write.
                log.warning("page map unreadable", vm_id=ctx.vm_id, error=str(e))
                self._journal_seq = 1 + max(pagemap.journals(state_dir, ctx.vm_id), default=0)
                self.map_dirty = True
            if not pagemap.path_for(state_dir, ctx.vm_id).exists():
                self.map_dirty = True  # journals count only after a snapshot
        self._journal_dir_synced = False
        self._journal_records = 0
        self._snapshot_pages = sum(int(np.count_nonzero(x)) for x in self.listed)
        # Taken by worker threads writing state files, and by drop_state.
        self.state_lock = threading.Lock()
        self.state_dropped = False
        self.backoff = StoreBackoff()  # the store failing: pause, retry now and then
        for i, reason in enumerate(self.reasons):
            if reason and ctx.config.enabled:
                log.warning("region not evicted", vm_id=ctx.vm_id, region=i, reason=reason)
        if ctx.store is not None and not ctx.store.durable and not ctx.config.allow_volatile_store:
            raise ValueError(
                f"storage {ctx.store.name!r} is not durable: a wsd crash would lose every "
                "evicted page.  Put a durable tier below it, or set "
                "evictor.allow_volatile_store = true to accept that"
            )

    async def commit(self, tracker: VmTracker, hot: list[npt.NDArray[np.bool_]]) -> None:
        """The tracker's window hook: punch what was prepared, minus what was touched."""
        prepared, self._prepared = self._prepared, []
        # Listed on disk until their commit settles them: a snapshot written
        # meanwhile (a REMOVE's, a detach's) must list them too.
        self._committing = prepared
        try:
            if tracker.mode is TrackingMode.RWP:
                if not tracker.in_window:
                    # Not called by the cycle: nothing makes a punch safe now.
                    for batch in prepared:
                        self.ctx.discards[batch.region].update(batch.pages.tolist())
                        self._unlist(batch.region, batch.pages, _listed_at(batch, self.ctx))
                    return
                self.ctx.stats.windows += 1
            elif prepared:
                prepared = self._committing = await self._still_evictable(prepared)
            for n, batch in enumerate(prepared):
                await self._commit_in_chunks(batch, hot[batch.region], rest=prepared[n + 1 :])
        finally:
            self._committing = []

    async def _still_evictable(self, prepared: list[Prepared]) -> list[Prepared]:
        """wp-async: read the VMM's pins again; the batches of regions that may
        still be evicted.

        The pins were read before the prepare, an interval ago, and without a
        sync window nothing turns a pin made since into an access: a device
        pinned meanwhile would go on writing a page this commit punches, and
        the guest would later get the stored copy without that write.  The
        other batches' pages stay resident; their stored copies are dropped.
        """
        ctx = self.ctx
        await guards.check(self, unevictable_reason, pins_only=True)
        kept = []
        for batch in prepared:
            if self.reasons[batch.region] is None:
                kept.append(batch)
                continue
            ctx.discards[batch.region].update(batch.pages.tolist())
            self._unlist(batch.region, batch.pages, _listed_at(batch, self.ctx))
            log.warning(
                "prepared pages not punched: their region may not be evicted now",
                vm_id=ctx.vm_id,
                region=batch.region,
                pages=len(batch.pages),
                reason=self.reasons[batch.region],
            )
        return kept

    async def prepare(self) -> None:
        """Between windows: store the next pages to evict, for the next commit."""
        ctx = self.ctx
        cfg = ctx.config
        await self.repair()
        if cfg.enabled and ctx.store is not None:
            await guards.check(self, unevictable_reason)  # pins and other mappers, every few cycles
        if not cfg.enabled or ctx.store is None or all(self.reasons):
            return
        if self._pool_holds_pages():
            # Every verified punch needs the pool's pipes, which still hold
            # pages that are not back (put_back_held logs each try): storing
            # more would only fail at the punch.
            return
        if not self.backoff.may_try(ctx.tracker.cycles):
            return  # the store failed lately: give it time (outage.py)
        self.backoff.begin()
        if not await self._flush_discards():
            return
        now = ctx.clock()
        wss = sum(t.state.working_set_pages(1) or 0 for t in ctx.tracker.regions)
        threshold = ctx.vm.adapt(now, wss)
        budget = ctx.vm.byte_budget(now)
        room = self.host_room() if self.host_room is not None else None
        if room is not None:
            budget = room if budget is None else min(budget, room)
        spent = await self._store_cold(budget, threshold, self._over_target_bytes())
        if budget is not None:
            ctx.vm.refund(now, budget - spent)
        if self._prepared:
            await self._persist_prepared()
        elif self.map_dirty:
            await self.save_map()  # a journal write failed earlier: a snapshot now

    async def repair(self) -> None:
        """Mend what earlier windows left behind, before anything else this
        cycle and whether or not it evicts (a paused VM's cycles included):
        punch remnants get their bytes back, held-back pages their pipes'."""
        await self.restore_remnants()
        self.put_back_held()

    def _pool_holds_pages(self) -> bool:
        """Whether the parked pipes hold held-back pages (:meth:`_hold_back`)."""
        return (
            self.parking is not None
            and self.parking.available
            and any(t.held_back for t in self.ctx.tracker.regions)
        )

    async def restore_remnants(self) -> None:
        """Put the stored bytes back over the zeros of every punch remnant now,
        rather than when the guest touches it.

        A remnant is known only to this process (``TrackedRegion.remnants``): a
        restarted wsd would find data in the memfd where it punched and keep
        it, zeros and all, since the memfd wins.  Restoring it right after the
        window that punched it narrows that exposure to one store read.  The
        page is then resident again and its stored copy stale.  A fault's
        restore of the same page may run meanwhile; whichever finds the page
        still a remnant writes it.  A failing tier leaves the remnants to their
        faults and to the next cycle.
        """
        ctx = self.ctx
        if ctx.tier is None:
            return
        for i, t in enumerate(ctx.tracker.regions):
            if not t.remnants:
                continue
            ps = t.region.page_size
            gens = {p * ps: t.state.generation(p) for p in sorted(t.remnants)}
            try:
                got = await ctx.tier.get_many(ctx.namespaces[i], list(gens), generations=gens)
            except StorageError as e:
                log.warning(
                    "restoring punch remnants failed; they wait for an access or the next cycle",
                    vm_id=ctx.vm_id,
                    region=i,
                    pages=len(gens),
                    error=str(e),
                )
                continue
            restored = 0
            for offset, stored in got.items():
                p = offset // ps
                if p in t.remnants and t.state.generation(p) == gens[offset]:
                    restore_remnant(t, p, stored.data)
                    t.state.note_fetched([p])
                    ctx.discards[i].add(p)
                    restored += 1
            if restored:
                ctx.stats.remnants_restored += restored
                log.info("punch remnants restored", vm_id=ctx.vm_id, region=i, pages=restored)

    def put_back_held(self) -> None:
        """Try again to put back the pages a verified punch held but could not
        read (:meth:`_hold_back`), from the pipes that still hold them.

        Their faults wait meanwhile, and verified punches cannot use the pipes,
        so without this both would wait for a restart.  Runs on the loop with
        no await, like the punch itself: no fault on those pages is served
        in between.
        """
        ctx = self.ctx
        # Without the pool, the pipes died with their punch: only their faults' wait is left.
        if not self._pool_holds_pages():
            return
        assert self.parking is not None
        wp = ctx.tracker.mode is TrackingMode.WP_ASYNC
        back = held.retry(ctx.tracker, self.parking.pool, wp=wp)
        if back is None:
            return
        i, pages = back
        t = ctx.tracker.regions[i]
        done = [p for p in pages.tolist() if t.held_back.pop(p, None) is not None]
        t.state.note_fetched(done)
        # Which of them raced a write is unknown: their stored copies may be stale.
        ctx.discards[i].update(done)
        log.warning(
            "pages held across a punch put back from their pipes",
            vm_id=ctx.vm_id,
            region=i,
            pages=len(done),
        )

    async def prepare_idle(self, max_bytes: int | None = None) -> int:
        """Instead of :meth:`prepare`, once (an operator's ``wsd vm evict``): store
        for the next commit every page idle for at least the last interval, oldest
        first, up to ``max_bytes`` (None: no bound).

        It ignores the idle threshold, refault penalties and the rate limit,
        but keeps ``max_pages_per_window`` (a vCPU's wait in the window) and
        the host-wide cap.  Returns the bytes stored for the commit.
        """
        ctx = self.ctx
        await self.repair()
        if ctx.store is not None:
            await guards.check(self, unevictable_reason, force=True)
        if ctx.store is None or all(self.reasons):
            return 0
        self.backoff.begin()
        if not await self._flush_discards():
            return 0
        room = self.host_room() if self.host_room is not None else None
        budget = min((b for b in (max_bytes, room) if b is not None), default=None)
        # Threshold 1 with every page "over target": any page not accessed in
        # the last interval qualifies, penalised or not.
        spent = await self._store_cold(budget, 1, None)
        return spent if await self._persist_prepared() else 0

    async def _store_cold(self, budget: int | None, threshold: int, over: int | None) -> int:
        """Select cold pages region by region and store them for the next commit.

        At most ``budget`` bytes (None: no bound) and ``max_pages_per_window``
        pages.  ``over``: bytes above the resident target, which lets pages
        with a refault penalty go too; None lets every selected page go.
        Returns the bytes stored.
        """
        ctx = self.ctx
        pages_left = ctx.config.max_pages_per_window
        spent = 0
        for i, t in enumerate(ctx.tracker.regions):
            if self.reasons[i] is not None or pages_left <= 0:
                continue
            if self.backoff.failed_now:
                break  # one failed batch is enough to know the store is failing
            ps = t.region.page_size
            batch_pages = max(1, min(ctx.config.batch_pages, ctx.config.max_batch_bytes // ps))
            limit = min(pages_left, pages_for_bytes(None if budget is None else budget - spent, ps))
            over_pages = limit if over is None else max(0, -(-over // ps))
            chosen = select(
                t.state,
                ctx.policies[i],
                threshold=threshold,
                limit=limit,
                over_target_pages=over_pages,
            )
            pages_left -= len(chosen)
            starts = range(0, len(chosen), batch_pages)
            batches = [np.sort(chosen[k : k + batch_pages]) for k in starts]
            stored = await self._prepare_batches(i, batches)
            spent += stored * ps
            if over is not None:
                over -= stored * ps
        if self._prepared:
            self.backoff.end(ctx)
        return spent

    async def _prepare_batches(self, i: int, batches: list[npt.NDArray[np.int64]]) -> int:
        """Prepare ``batches`` of region ``i``, ``batches_in_flight`` at a time,
        and add each stored one to the prepared list, in order; the pages stored.

        No batch starts once one has failed: the store is failing, and the
        next prepare tries again.  Those already in flight then finish, and
        the ones stored are kept.  Cancelled, it cancels the batches in flight
        and waits for them, and keeps those stored all the same.
        """
        in_flight = self.ctx.config.batches_in_flight
        todo = iter(batches)
        window: deque[asyncio.Task[Prepared | None]] = deque()
        stored = 0
        failed = False

        def keep(task: asyncio.Task[Prepared | None]) -> None:
            nonlocal stored
            batch = task.result()
            if batch is not None:
                self._prepared.append(batch)
                stored += len(batch.pages)

        try:
            while True:
                while not failed and len(window) < in_flight:
                    pages = next(todo, None)
                    if pages is None:
                        break
                    window.append(asyncio.create_task(self._prepare(i, pages)))
                if not window:
                    break
                await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                failed = failed or any(map(_did_not_store, window))
                while window and window[0].done():
                    keep(window.popleft())
        finally:
            # Only when cancelled or failing: the batches still in flight.
            for task in window:
                task.cancel()
            for task in window:
                await despite_cancellation(task)
                if not _did_not_store(task):
                    keep(task)
        return stored

    async def _persist_prepared(self) -> bool:
        """Write the page map listing the prepared pages; False if that failed.

        Without the map on disk a crash would strand the prepared pages, so
        then none is punched.
        """
        if not self._prepared or self.state_dir is None:
            return True
        try:
            await self.save_map(force=True)
        except OSError as e:
            log.warning("writing the page map failed, nothing evicted", error=str(e))
            self._prepared.clear()
            return False
        return True

    async def evict_batch(self, i: int, t: TrackedRegion, pages: npt.NDArray[np.int64]) -> int:
        """Prepare and commit ``pages`` (ascending) of region ``i`` at once.

        Returns the pages evicted, or -1 if storing them failed (nothing
        evicted).  Only for a guest known to be quiescent (tests, benchmarks):
        nothing here makes an access between the read and the punch visible.
        """
        assert t is self.ctx.tracker.regions[i]
        batch = await self._prepare(i, pages)
        if batch is None:
            return -1
        if self.state_dir is not None:
            self._prepared.append(batch)
            try:
                await self.save_map(force=True)
            finally:
                self._prepared.remove(batch)
        return await self._commit_in_chunks(batch, None)

    async def _prepare(self, i: int, pages: npt.NDArray[np.int64]) -> Prepared | None:
        """Read ``pages`` and make them durable in the store; None if that failed."""
        ctx = self.ctx
        assert ctx.tier is not None
        t = ctx.tracker.regions[i]
        gens = (t.state.generations[pages].astype(np.int64) + 1) & pagemap.MAX_GENERATION
        verify = content_checked(ctx.tracker.mode, t)
        sums: dict[int, bytes] | None = None
        try:
            if self.state_dir is not None and len(gens):
                await self._raise_ceiling(int(gens.max()))
            data = await _in_background(read_pages, t.memfd, t.region, pages)
            if verify:
                sums = await _in_background(digests, data)
            generation = dict(zip(data, gens.tolist(), strict=True))
            await ctx.tier.put(ctx.namespaces[i], data, generation=generation)
            await ctx.tier.sync()
        except StorageError as e:
            ctx.stats.failed_batches += 1
            if isinstance(e, TierTimeout):
                # Not acknowledged, so not punched; but the call may still
                # land, leaving copies of resident pages: discarded later.
                ctx.discards[i].update(pages.tolist())
            self.backoff.failed(ctx, e, region=i, pages=len(pages))  # logs a new outage
            return None
        except (KernelError, OSError) as e:
            ctx.stats.failed_batches += 1
            log.warning(
                "eviction batch failed, nothing evicted",
                vm_id=ctx.vm_id,
                region=i,
                pages=len(pages),
                error=str(e),
            )
            return None
        return Prepared(i, pages, sums, (gens - 1).astype(np.uint32))

    async def _raise_ceiling(self, top: int) -> None:
        """Raise the generation ceiling on disk above ``top`` before anything is
        stored at it (``pagemap.save_ceiling``); ``OSError`` if that failed.

        A page fetched back leaves the map at its next snapshot, and a batch
        stored right before a crash may never have been listed: neither
        generation is on disk.  The ceiling bounds both, and a restart or the
        VM's next session starts every page the map does not list right below
        it (``resume``).
        """
        tracker = self.ctx.tracker
        if top < tracker.generation_ceiling or top >= pagemap.MAX_GENERATION:
            return  # at the top, generations wrap: 2^32 stores of one page
        assert self.state_dir is not None
        async with self._map_lock:
            if top < tracker.generation_ceiling:
                return
            ceiling = min(top + CEILING_STEP, pagemap.MAX_GENERATION)
            save = functools.partial(pagemap.save_ceiling, self.state_dir, self.ctx.vm_id, ceiling)
            await asyncio.to_thread(self.write_state, save)
            tracker.generation_ceiling = ceiling

    async def _commit_in_chunks(
        self,
        batch: Prepared,
        hot: npt.NDArray[np.bool_] | None,
        *,
        rest: Sequence[Prepared] = (),
    ) -> int:
        """Commit ``COMMIT_CHUNK`` pages at a time, serving faults in between.

        Each chunk's check and punch run with no await between them, which is
        all the safety argument needs (wp-async's verified punch awaits its
        thread instead, and faults on its pages wait: :mod:`.inflight`);
        between chunks the loop serves faults,
        so a batch of scattered pages (one punch and one wake each) never
        stalls fault service for its whole length.
        """
        done = 0
        step = COMMIT_CHUNK
        verified = batch.stored is not None and self.ctx.tracker.mode is TrackingMode.WP_ASYNC
        if batch.stored is not None:
            ps = self.ctx.tracker.regions[batch.region].region.page_size
            if verified:
                step = max(1, VERIFIED_CHUNK_BYTES // ps)
            else:
                step = max(1, min(step, CHECKED_CHUNK_BYTES // ps))
        for k in range(0, len(batch.pages), step):
            if k:
                await asyncio.sleep(0)
            gens = None if batch.generations is None else batch.generations[k : k + step]
            chunk = Prepared(batch.region, batch.pages[k : k + step], batch.stored, gens)
            left = None if batch.generations is None else batch.generations[k:]
            self._committing = [
                Prepared(batch.region, batch.pages[k:], batch.stored, left),
                *rest,
            ]
            if verified:
                done += await self._commit_verified(chunk, hot)
            else:
                done += self._commit(chunk, hot)
            self._settle_listing(chunk)
        self._committing = list(rest)
        return done

    def _settle_listing(self, batch: Prepared) -> None:
        """After ``batch``'s commit: its evicted pages are listed at their
        generation; the others are journalled as not listed after all."""
        t = self.ctx.tracker.regions[batch.region]
        evicted = t.state.evicted_mask(batch.pages)
        self.listed[batch.region][batch.pages[evicted]] = True
        if not evicted.all():
            self._unlist(batch.region, batch.pages[~evicted], _listed_at(batch, self.ctx)[~evicted])

    def _untouched(
        self, batch: Prepared, hot: npt.NDArray[np.bool_] | None
    ) -> npt.NDArray[np.int64]:
        """Those of ``batch``'s pages that may be punched now: not removed, touched
        or unsettled since their read.  The stored copies of the others go."""
        ctx = self.ctx
        i, pages = batch.region, batch.pages
        t = ctx.tracker.regions[i]
        if t.vanished is not None:
            ctx.discards[i].update(pages.tolist())
            return pages[:0]  # unmapped or moved since prepared: nothing to punch here
        if batch.generations is not None:
            moved = t.state.generations[pages] != batch.generations
            if moved.any():
                # Removed by the VMM since they were read: a fresh page now.
                ctx.discards[i].update(pages[moved].tolist())
                pages = pages[~moved]
        keep = pages if hot is None else pages[~hot[pages]]
        if t.touched:
            keep = keep[~np.isin(keep, np.fromiter(t.touched, np.int64, len(t.touched)))]
        keep = keep[t.state.settled_mask(keep)]
        ctx.stats.skipped_touched += len(pages) - len(keep)
        if len(keep) < len(pages):
            # Stored for nothing: left in the store, such copies of pages the
            # guest keeps touching would fill a small disk (tier outage tests).
            ctx.discards[i].update(np.setdiff1d(pages, keep).tolist())
        return keep

    def _commit(self, batch: Prepared, hot: npt.NDArray[np.bool_] | None) -> int:
        """Punch the prepared pages nobody touched since they were read; how many."""
        ctx = self.ctx
        i = batch.region
        t = ctx.tracker.regions[i]
        keep = self._untouched(batch, hot)
        if not len(keep):
            return 0
        if batch.stored is not None:
            keep = self._unchanged(i, t, keep, batch.stored)
            if not len(keep):
                return 0
        self._mark_evicted(i, t, keep)
        ctx.stats.batches += 1
        try:
            punch_and_wake(ctx.tracker.uffd, t.memfd, t.region, keep)
            if t.minor:
                # Only MINOR-registered regions can hold shmem THPs we punch
                # into (others are 4 KiB-only or never evicted); there an
                # access to a remnant traps as MINOR, so it can be repaired
                # until the repair after this window restores it (restore_remnants).
                remnants = not_punched(t.memfd, t.region, keep)
                if remnants:
                    t.remnants.update(remnants)
                    ctx.stats.punch_remnants += len(remnants)
        except KernelError as e:
            # The pages stay marked evicted but (some) resident: the memfd wins
            # wherever it has data, and no further eviction touches them until a
            # resident walk settles them.
            log.error("punching evicted pages failed", vm_id=ctx.vm_id, region=i, error=str(e))
        return len(keep)

    def _mark_evicted(self, i: int, t: TrackedRegion, pages: npt.NDArray[np.int64]) -> None:
        """Record ``pages`` as evicted, their stored copies as the ones to keep."""
        ctx = self.ctx
        t.state.note_evicted(pages)
        ctx.policies[i].note_evicted(pages, ctx.tracker.cycles)
        ctx.discards[i].difference_update(pages.tolist())
        ctx.stats.evicted_pages += len(pages)
        ctx.stats.evicted_bytes += len(pages) * t.region.page_size

    def _written_since_read(
        self, i: int, t: TrackedRegion, pages: npt.NDArray[np.int64], event: str
    ) -> None:
        """``pages`` were written after their read: not evicted, stored copies stale, hot."""
        self.ctx.discards[i].update(pages.tolist())
        t.state.note_access(pages)
        log.info(event, vm_id=self.ctx.vm_id, region=i, pages=len(pages))

    def _unchanged(
        self, i: int, t: TrackedRegion, pages: npt.NDArray[np.int64], stored: Mapping[int, bytes]
    ) -> npt.NDArray[np.int64]:
        """rwp: those of ``pages`` that still hold the bytes stored; the rest were written.

        Sound only in the window, with no await before the punch: a page the
        scan saw unaccessed is protected or unmapped, so a write to it now
        faults and waits for the loop, which is busy here.
        """
        ctx = self.ctx
        try:
            changed = changed_since_read(t.memfd, t.region, pages, stored, self._scratch)
        except KernelError as e:
            log.error("reading pages to evict failed", vm_id=ctx.vm_id, region=i, error=str(e))
            ctx.discards[i].update(pages.tolist())
            return pages[:0]
        if not changed.any():
            return pages
        ctx.stats.unseen_writes += int(changed.sum())
        self._written_since_read(
            i, t, pages[changed], "pages written since their read, unseen by the scan: not evicted"
        )
        return pages[~changed]

    async def _commit_verified(self, batch: Prepared, hot: npt.NDArray[np.bool_] | None) -> int:
        """wp-async: punch the untouched pages of ``batch``; put back any whose final
        bytes are not the stored ones; how many were evicted.

        The punch and the reads and digests after it run in a thread
        (:func:`~.transaction.punch_held`); faults on other pages are served
        meanwhile, those on the chunk's pages wait (:mod:`.inflight`).  The
        put-back and the page state run on the loop, with no await between.
        A cancellation waits for the thread and the put-back first: the
        thread's pages are holes that only the put-back or the page state can
        account for.
        """
        ctx = self.ctx
        i = batch.region
        keep = self._untouched(batch, hot)
        if not len(keep):
            return 0
        if self._pool_holds_pages():
            # An earlier chunk was held back, in the pipes every verified punch needs.
            ctx.discards[i].update(keep.tolist())
            return 0
        assert batch.stored is not None
        t = ctx.tracker.regions[i]
        generations = t.state.generations[keep]
        parking = self.parking if self.parking is not None and self.parking.available else None
        ctx.in_flight.hold(i, keep)
        try:
            job = functools.partial(
                punch_held,
                ctx.tracker.uffd,
                t.memfd,
                t.region,
                keep,
                batch.stored,
                scratch=self._scratch,
                parking=parking,
                label=held.label(i, t.region.page_size, keep) if parking else b"",
            )
            work = asyncio.wrap_future(_PUNCH.submit(job))
            cancelled = await despite_cancellation(work)
            try:
                punched = work.result()
            except (KernelError, held.ParkingFailed) as e:
                log.error("evicting pages failed", vm_id=ctx.vm_id, region=i, error=str(e))
                punched = None
            except PunchedUnread as e:
                self._hold_back(i, t, e, parked=parking is not None)
                punched = None
            evicted = 0
            if punched is not None:
                evicted, unplaced = self._settle_punch(i, t, punched, generations)
                if unplaced:
                    # The chunk's faults wait (in_flight) until every page is in.
                    was = dict(zip(keep.tolist(), generations.tolist(), strict=True))
                    placing = asyncio.ensure_future(self._place(i, t, unplaced, was))
                    cancelled |= await despite_cancellation(placing)
                    placing.result()
        finally:
            ctx.in_flight.release()
        if cancelled:
            raise asyncio.CancelledError
        return evicted

    async def _place(
        self, i: int, t: TrackedRegion, unplaced: dict[int, bytes], was: Mapping[int, int]
    ) -> None:
        """Raced pages the kernel had no memory for (page -> final bytes; ``was``:
        their generations when the chunk was punched).  Their final bytes are
        in this process alone, and as holes they would read as zeros.

        So they are stored first, and evicted like any other page: their
        faults then fetch them, waiting for memory as any fetch does.  The rest
        (the tier failed, the VMM removed the page or unmapped the region
        meanwhile) are put back, retrying with the fetch backoff for as long as
        it takes, and those whose store failed are stored again at each try."""
        ctx = self.ctx
        cfg = ctx.config
        log.error(
            "raced pages could not be put back for lack of memory; storing them, their "
            "faults wait (their final bytes are in wsd's memory alone meanwhile)",
            vm_id=ctx.vm_id,
            region=i,
            pages=sorted(unplaced),
        )
        delay = cfg.fetch_retry_initial_seconds
        while unplaced:
            stored = await self._store_raced(i, t, unplaced, was)
            unplaced = {p: data for p, data in unplaced.items() if p not in stored}
            if not unplaced:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.fetch_retry_max_seconds)
            # The page moves only with an event the loop reads: t.region is current.
            left, errors = place(ctx.tracker.uffd, t, unplaced, detached=t.vanished is not None)
            for error in errors:
                log.error("verified punch", vm_id=ctx.vm_id, region=i, error=error)
            # In place, or failed with the error logged: their copies go as kept pages' do.
            ctx.discards[i].update(unplaced.keys() - left.keys())
            unplaced = left
        log.warning("raced pages put back once memory was free", vm_id=ctx.vm_id, region=i)

    async def _store_raced(
        self, i: int, t: TrackedRegion, pages: dict[int, bytes], was: Mapping[int, int]
    ) -> set[int]:
        """Store raced ``pages`` with their final bytes, and record them as
        evicted; which ones.

        They go in at the generation their prepare stored the older bytes at,
        which the page map on disk lists them at until the chunk is settled:
        once the store has them, a restart serves their final bytes.  Not a
        page the VMM removed since (its generation moved on), nor one of a
        detached region: those stay with :meth:`_place`.
        """
        ctx = self.ctx
        ps = t.region.page_size
        wanted = {p: data for p, data in pages.items() if t.state.generation(p) == was[p]}
        if ctx.tier is None or t.vanished is not None or not wanted:
            return set()
        gens = {p * ps: (was[p] + 1) & pagemap.MAX_GENERATION for p in wanted}
        try:
            await ctx.tier.put(
                ctx.namespaces[i], {p * ps: d for p, d in wanted.items()}, generation=gens
            )
            await ctx.tier.sync()
        except StorageError as e:
            log.warning("storing raced pages failed", vm_id=ctx.vm_id, region=i, error=str(e))
            return set()
        # Events were read meanwhile: a REMOVE moves a page on, and only the
        # VMM's write() through the memfd can fill a hole without a fault.
        done = [
            p
            for p in sorted(wanted)
            if t.vanished is None
            and t.state.generation(p) == was[p]
            and not holds_data(t.memfd, t.region, p)
        ]
        ctx.discards[i].update(set(wanted).difference(done))
        if done:
            self._mark_evicted(i, t, np.array(done, dtype=np.int64))
            log.warning(
                "raced pages without memory stored with their final bytes and evicted: "
                "their faults fetch them",
                vm_id=ctx.vm_id,
                region=i,
                pages=done,
            )
        return set(done)

    def _settle_punch(
        self, i: int, t: TrackedRegion, punched: HeldPunch, generations: npt.NDArray[np.uint32]
    ) -> tuple[int, dict[int, bytes]]:
        """Put back a chunk's raced pages and record its evicted ones; how many,
        and the raced pages left to :meth:`_place` (``VerifiedPunch.unplaced``)."""
        ctx = self.ctx
        # Detached meanwhile (events.detach): the region's release waits for
        # this, and every page goes back into the memfd.
        outcome = put_back(ctx.tracker.uffd, t, punched, detached=t.vanished is not None)
        # The stored copies of pages kept resident are useless, but not those
        # of a detached region's pages still waiting for memory: until
        # _place has them in, that copy is all that outlives a crash.
        ctx.discards[i].update(p for p in outcome.kept.tolist() if p not in outcome.unplaced)
        if len(outcome.raced):
            # Put back even if removed meanwhile (a REMOVE read while the thread
            # worked): whether the removal came before the write (its bytes are
            # the guest's) or after cannot be told, and keeping a discarded
            # page's last bytes loses nothing.
            ctx.stats.raced_writes += len(outcome.raced)
            t.state.note_populated(outcome.raced)  # resident again if removed meanwhile
            self._written_since_read(
                i, t, outcome.raced, "writes raced an eviction, pages put back"
            )
        for error in outcome.errors:
            log.error("verified punch", vm_id=ctx.vm_id, region=i, error=error)
        evicted = outcome.evicted
        if len(evicted):
            # A page removed meanwhile is a hole with its stored copy dropped
            # (events.on_remove): fresh, not evicted.
            was = generations[punched.punched & punched.same]
            evicted = evicted[t.state.generations[evicted] == was]
        if len(evicted):
            self._mark_evicted(i, t, evicted)
            ctx.stats.batches += 1
        return len(evicted), outcome.unplaced

    def _hold_back(self, i: int, t: TrackedRegion, e: PunchedUnread, *, parked: bool) -> None:
        """Punched pages whose final bytes could not be read: serve them from nowhere.

        Which of them raced a write is unknown, so their stored copies may be
        stale, and as holes they would be zero-filled.  Counted as evicted
        (no zero fill) and held back (no fetch): their faults wait, like a
        fetch from a dead tier, until the pipes read at a later repair
        (:meth:`put_back_held`) or a restart puts them back from the parked
        pipes (:func:`.held.put_back`), or the VMM that kept them reattaches.
        Without either the pipes die with wsd, and these pages with them.
        """
        ctx = self.ctx
        t.state.note_evicted(e.pages)
        t.held_back.update(
            zip(e.pages.tolist(), t.state.generations[e.pages].tolist(), strict=True)
        )
        ctx.stats.held_back_pages += len(e.pages)
        log.error(
            "punched pages' held bytes unreadable: their faults wait until the pipes read "
            "again, or a restart puts them back from the fd store or the VMM"
            if parked
            else "punched pages' held bytes unreadable and kept nowhere: their faults wait; "
            "their stored copies miss any write that raced the punch",
            vm_id=ctx.vm_id,
            region=i,
            pages=len(e.pages),
            error=str(e.error),
        )

    def _over_target_bytes(self) -> int:
        target = self.ctx.config.resident_target_bytes
        if target is None:
            return 0
        resident = sum(
            t.state.resident_pages * t.region.page_size for t in self.ctx.tracker.regions
        )
        return max(0, resident - int(target))

    async def _flush_discards(self) -> bool:
        """Forget the stored copies of pages fetched back; False if the store failed."""
        ctx = self.ctx
        assert ctx.tier is not None
        for i, pages in enumerate(ctx.discards):
            if not pages:
                continue
            ps = ctx.namespaces[i].page_size
            offsets = [p * ps for p in sorted(pages)]
            pages.clear()
            try:
                await ctx.tier.discard(ctx.namespaces[i], offsets)
            except StorageError as e:
                # Nothing evicts while this runs, so the pages are still
                # resident and their stored copies still stale: next time.
                pages.update(o // ps for o in offsets)
                self.backoff.failed(ctx, e, region=i)
                return False
        return True

    def committing(self, i: int, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Those of ``pages`` of region ``i`` that the commit under way has yet to
        settle: the map on disk lists them at their next generation."""
        out = [b.pages[np.isin(b.pages, pages)] for b in self._committing if b.region == i]
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def forget_prepared(self, i: int, pages: npt.NDArray[np.int64] | None) -> npt.NDArray[np.int64]:
        """Take ``pages`` of region ``i`` (None: all of them) out of the prepared
        batches; returns those that were prepared, whose stored copies are stale."""
        out: list[npt.NDArray[np.int64]] = [np.empty(0, dtype=np.int64)]
        kept = []
        for batch in self._prepared:
            if batch.region != i:
                kept.append(batch)
                continue
            gone = np.ones(len(batch.pages), np.bool_)
            if pages is not None:
                gone = np.isin(batch.pages, pages)
            out.append(batch.pages[gone])
            if not gone.all():
                gens = None if batch.generations is None else batch.generations[~gone]
                kept.append(Prepared(i, batch.pages[~gone], batch.stored, gens))
        self._prepared = kept
        return np.concatenate(out)

    async def save_map(self, *, force: bool = False) -> None:
        """Bring the page map on disk up to date, one write at a time.

        ``force``: the prepared batches are about to be punched, so they must
        be listed durably (a journal append and fdatasync: O(batch)), and an
        ``OSError`` is raised if that fails.  A new snapshot is written instead
        when one is due (``map_dirty``, or a journal grown to a quarter of
        the snapshot); otherwise, without ``force``, nothing is written.  A failed
        snapshot is logged and tried again next time.
        """
        if self.state_dir is None:
            return
        async with self._map_lock:
            due = self._journal_records >= max(
                COMPACT_MIN_RECORDS, self._snapshot_pages // COMPACT_SNAPSHOT_FRACTION
            )
            if self.map_dirty or due:
                await self._compact(force=force)
            elif force and self._prepared:
                await self._journal_prepared()

    async def _compact(self, *, force: bool) -> None:
        """Write a snapshot of the map, then drop the journals it holds."""
        assert self.state_dir is not None and self._journal_seq is not None
        self.map_dirty = False
        snapshot, evicted = self._snapshot_inputs()
        seq = self._journal_seq + 1
        # From here on, what changes goes to the new journal; the listing is
        # the snapshot's (prepared pages apart, as always).
        self._journal_seq, self._journal_dir_synced = seq, False
        records, self._journal_records = self._journal_records, 0
        listed, self.listed = self.listed, evicted
        try:
            vm = await asyncio.to_thread(_snapshot, self.ctx.vm_id, snapshot, seq)
            await asyncio.to_thread(self.write_state, self._write_snapshot, vm)
        except OSError as e:
            # The old snapshot and every journal stay valid together.
            self.map_dirty = True
            self._journal_records += records
            self.listed = [a | b for a, b in zip(listed, self.listed, strict=True)]
            if force:
                raise
            log.warning("writing the page map failed", vm_id=self.ctx.vm_id, error=str(e))
            return
        self._snapshot_pages = sum(len(r.pages) for r in vm.regions)

    def _write_snapshot(self, vm: pagemap.VmMap) -> None:
        assert self.state_dir is not None
        pagemap.save(self.state_dir, vm)
        pagemap.drop_journals(self.state_dir, vm.vm_id, below=vm.journal)
        pagemap.clear_removed(self.state_dir, vm.vm_id)

    async def _journal_prepared(self) -> None:
        """List the prepared batches durably in the journal."""
        assert self.state_dir is not None and self._journal_seq is not None
        records = np.concatenate(
            [
                pagemap.journal_records(
                    pagemap.JournalOp.LISTED, b.region, b.pages, _listed_at(b, self.ctx)
                )
                for b in self._prepared
            ]
        )
        seq, sync_dir = self._journal_seq, not self._journal_dir_synced
        await asyncio.to_thread(self.write_state, self._append_durably, seq, records, sync_dir)
        self._journal_dir_synced = True  # the map lock kept the journal from changing
        self._journal_records += len(records)

    def _append_durably(self, seq: int, records: npt.NDArray[np.void], sync_dir: bool) -> None:
        assert self.state_dir is not None
        created = pagemap.append_journal(self.state_dir, self.ctx.vm_id, seq, records, durable=True)
        if created or sync_dir:
            fsync_dir(self.state_dir)

    def _journal(self, records: npt.NDArray[np.void]) -> bool:
        """Append ``records`` now, on the loop, without fsync; False if that failed
        (then a snapshot is due, and holds what they said)."""
        if self.state_dir is None or self.state_dropped:
            return True
        assert self._journal_seq is not None
        try:
            pagemap.append_journal(
                self.state_dir, self.ctx.vm_id, self._journal_seq, records, durable=False
            )
        except OSError as e:
            log.warning(
                "appending to the page map journal failed", vm_id=self.ctx.vm_id, error=str(e)
            )
            self.map_dirty = True
            return False
        self._journal_records += len(records)
        return True

    def _unlist(
        self, i: int, pages: npt.NDArray[np.int64], listed_at: npt.NDArray[np.uint32]
    ) -> None:
        """Prepared ``pages`` of region ``i``, listed at ``listed_at``, were not punched."""
        self.listed[i][pages] = False
        self._journal(pagemap.journal_records(pagemap.JournalOp.UNLISTED, i, pages, listed_at))

    def log_removed(
        self, i: int, pages: npt.NDArray[np.int64], listed_at: npt.NDArray[np.uint32]
    ) -> bool:
        """Journal that the VMM removed ``pages`` of region ``i``, which the map
        on disk lists at ``listed_at``; False if that failed (a snapshot is due).

        Called on the loop as the REMOVE is read, before any await: a restart
        from then on finds it (:mod:`.pagemap`).
        """
        return self._journal(
            pagemap.journal_records(pagemap.JournalOp.REMOVED, i, pages, listed_at)
        )

    def write_state(self, write: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Run ``write(*args, **kwargs)`` (a state file write, in a worker thread) unless the
        session's state was dropped.

        A write whose task was cancelled at the end of the session still runs
        in its thread; without this it could bring back a page map or session
        description the end of the session had just deleted.
        """
        with self.state_lock:
            if not self.state_dropped:
                write(*args, **kwargs)

    def drop_state(self, drop: Callable[[], None]) -> None:
        """Delete the session's state files with ``drop``; no state write happens after."""
        with self.state_lock:
            self.state_dropped = True
            drop()

    def _snapshot_inputs(self) -> tuple[list[_RegionSnapshot], list[npt.NDArray[np.bool_]]]:
        """Copies of what the page map's snapshot is made of, taken in one step
        on the loop (about 5 ms per 16 GiB of 4 KiB pages, of the 20 to 30 ms
        a compaction takes; :func:`_snapshot` does the rest in a thread), and
        which pages are evicted now."""
        inputs = []
        now = []
        for i, t in enumerate(self.ctx.tracker.regions):
            evicted = t.state.evicted
            now.append(evicted.copy())
            gens = t.state.generations.copy()
            prepared = [b.pages for b in (*self._prepared, *self._committing) if b.region == i]
            inputs.append(_RegionSnapshot(t.region, evicted, gens, prepared))
        return inputs, now


@dataclass(frozen=True)
class _RegionSnapshot:
    region: Region
    evicted: npt.NDArray[np.bool_]
    generations: npt.NDArray[np.uint32]
    prepared: list[npt.NDArray[np.int64]]
    """Pages stored and not yet punched: listed at their next generation."""


def _snapshot(vm_id: str, regions: Sequence[_RegionSnapshot], journal: int) -> pagemap.VmMap:
    """The page map as it will be once every prepared batch is committed.

    O(guest pages), so in a thread; it owns (and changes) the arrays it is given.
    """
    out = []
    for s in regions:
        for pages in s.prepared:
            s.evicted[pages] = True
            s.generations[pages] += np.uint32(1)
        r = s.region
        out.append(pagemap.region_map(r.offset, r.size, r.page_size, s.evicted, s.generations))
    return pagemap.VmMap(vm_id, tuple(out), journal=journal)


def _listed_now(t: TrackedRegion, listed_resident: set[int]) -> npt.NDArray[np.bool_]:
    listed = t.state.evicted
    listed[list(listed_resident)] = True
    return listed


def _listed_at(batch: Prepared, ctx: VmContext) -> npt.NDArray[np.uint32]:
    """The generation the map lists ``batch``'s pages at: the one they are stored at."""
    if batch.generations is not None:
        return batch.generations + np.uint32(1)
    return ctx.tracker.regions[batch.region].state.generations[batch.pages] + np.uint32(1)


def _did_not_store(task: asyncio.Task[Prepared | None]) -> bool:
    """Whether a finished ``_prepare`` task stored nothing (failed, raised or cancelled)."""
    if not task.done():
        return False
    return task.cancelled() or task.exception() is not None or task.result() is None


async def _in_background(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.wrap_future(_BACKGROUND.submit(fn, *args))
