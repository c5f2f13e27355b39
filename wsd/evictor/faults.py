"""MISSING faults: zero-fill a first touch, fetch an evicted page back.

Called from the uffd reader on the event loop; never waits for eviction I/O.
A fetch runs as its own task: ``get`` from the store (its I/O runs off the
loop), ``UFFDIO_COPY`` into the faulting page, which wakes every thread
waiting on it.  A second fault on a page already being fetched needs nothing:
the COPY wakes it too.

A fetch that fails (tier down, checksum or generation mismatch, page not
found) is retried with exponential backoff while the vCPU stays blocked.
wsd never installs zeros or another version in place of an evicted page.
Past ``fetch_deadline_seconds`` the configured policy applies: keep waiting
(logged once as an error, counted in ``fetches_stuck``) or ``UFFDIO_POISON``,
which makes the guest see a memory error on that page.

Each fault that starts a zero fill, a fetch or a remnant restore is timed,
from wsd reading its message to the page being installed and the vCPU woken,
into :attr:`FaultService.latency` by store and :class:`FaultResult`.  A fault
on a page already being fetched is not timed separately: that fetch wakes it.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import structlog

from wsd.durations import FAULT_BUCKETS, LabelledDurations
from wsd.kernel import KernelError, PageFault, pwrite
from wsd.storage import InlineGet, StorageError
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion

from .config import OnDeadline
from .context import VmContext
from .transaction import VMM_GONE, copy_page

log = structlog.get_logger("wsd.evictor")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Future[None]"]


# UFFDIO_COPY gives EAGAIN while the VMM's address space is changing (a
# remap or unmap in progress); that settles in microseconds.
COPY_EAGAIN_RETRIES = 100


_ZEROS: dict[int, bytearray] = {}


def _present_zeros(size: int) -> bytearray:
    """A page of zeros, its memory present.

    ``UFFDIO_COPY`` from memory it would have to fault in copies through a
    bounce page, which on hugetlbfs is a second page from the pool: with one
    free page, a zero fill from a fresh ``bytes(size)`` said ENOMEM (Linux
    6.18), and the first touch of a hole waited until another page came free.
    """
    zeros = _ZEROS.get(size)
    if zeros is None:
        zeros = _ZEROS[size] = bytearray(size)
    zeros[::4096] = bytes(-(-size // 4096))  # faulted in again if reclaimed meanwhile
    return zeros


class FaultResult(enum.StrEnum):
    """How a fault's service ended: the ``result`` of its latency."""

    ZERO = "zero"  # first touch of a never-evicted page: a zero page
    OK = "ok"  # fetched and installed at the first attempt
    RETRIED = "retried"  # installed after failed attempts (tier down, corrupt page)
    RACE = "race"  # someone else populated the page first; theirs stays
    POISONED = "poisoned"  # past the fetch deadline: a memory error for the guest
    GONE = "gone"  # the VMM's memory went away: nothing left to serve
    ERROR = "error"  # a bug; the fetch is retried a second later and timed again


class _Removed(Exception):
    """The page being fetched was removed by the VMM: no stored copy applies any more."""


def restore_remnant(t: TrackedRegion, page: int, data: bytes) -> None:
    """Write an evicted page's bytes over the zeros a punch left in the page cache.

    Safe without a window: the page is unmapped, so any access to it traps as
    MINOR, and the tracker leaves it to :meth:`FaultService.on_minor` while it
    is in ``t.remnants``; after this the tracker maps it like any other.
    """
    r = t.region
    pwrite(t.memfd, data, r.offset + page * r.page_size)
    t.remnants.discard(page)


class FaultService:
    def __init__(self, ctx: VmContext, spawn: Spawn) -> None:
        self.ctx = ctx
        self._spawn = spawn
        self._tasks: set[asyncio.Future[None]] = set()
        self.closed = False
        self._inline = ctx.store if isinstance(ctx.store, InlineGet) else None
        self.fetching: set[tuple[int, int]] = set()
        # Faults that arrived while their page was being prefetched: if the
        # prefetch does not install the page, they get a demand fetch.
        self.waiters: set[tuple[int, int]] = set()
        # Seconds from reading a fault to waking its vCPU, by (backend, result).
        self.latency = LabelledDurations[tuple[str, FaultResult]](FAULT_BUCKETS)
        # The keys, built once: a tuple per observation would allocate.
        backend = ctx.store.name if ctx.store is not None else ""
        self._latency_keys = {r: ("" if r is FaultResult.ZERO else backend, r) for r in FaultResult}

    def _timed(self, result: FaultResult, started: float | None) -> None:
        """Record a fault's latency; ``started`` None: a fault nobody timed."""
        if started is not None:
            self.latency.observe(self._latency_keys[result], self.ctx.clock() - started)

    def waits_for_punch(self, fault: PageFault, read_at: float) -> bool:
        """Whether ``fault`` is on a page a verified punch has in flight (:mod:`.inflight`):
        then it is served once the punch is settled, not now."""
        if not self.ctx.in_flight.busy:
            return False
        where = self.ctx.tracker.locate(fault.address)
        if where is None or not self.ctx.in_flight.holds(where[0], where[2]):
            return False
        self.ctx.in_flight.wait(fault, read_at)
        return True

    def on_missing(self, fault: PageFault, read_at: float | None = None) -> None:
        """Serve a MISSING fault; ``read_at``: when its message was read (default: now)."""
        ctx = self.ctx
        started = ctx.clock() if read_at is None else read_at
        where = ctx.tracker.locate(fault.address)
        if where is None:
            log.error("fault outside every region", vm_id=ctx.vm_id, address=hex(fault.address))
            return
        i, t, page = where
        if not t.state.is_evicted(page):
            if (result := self._zero_fill(t, page)) is not None:
                self._timed(result, started)
            return
        if (i, page) in self.fetching:
            self.waiters.add((i, page))  # the fetch in flight wakes this thread too
            return
        if self._inline is not None and self._fetch_inline(i, t, page, started):
            return
        self._start_fetch(i, t, page, started)

    def _fetch_inline(self, i: int, t: TrackedRegion, page: int, started: float) -> bool:
        """Serve the fault right here when the store has the page in memory.

        No task, no thread hop: the common case of an in-memory tier.  False
        sends the fault down the async path, which waits, retries and reports.
        """
        assert self._inline is not None
        if t.is_held_back(page):
            return False
        r = t.region
        try:
            stored = self._inline.get_inline(
                self.ctx.namespaces[i],
                page * r.page_size,
                generation=t.state.generation(page),
            )
        except StorageError:
            return False
        if stored is None:
            return False
        try:
            copy_page(self.ctx.tracker.uffd, t, page, stored.data)
        except FileExistsError:
            self.ctx.stats.copy_races += 1
            t.state.note_fetched([page])
            self._timed(FaultResult.RACE, started)
            return True
        except BlockingIOError:
            return False
        self._timed(FaultResult.OK, started)
        self._fetched(i, t, page, len(stored.data))
        if self.ctx.config.prefetch_pages:
            self._spawn_task(self._prefetch(i, t, page))
        return True

    def _fetched(self, i: int, t: TrackedRegion, page: int, nbytes: int) -> None:
        """Bookkeeping of a demand fetch that installed ``page``."""
        ctx = self.ctx
        t.state.note_page_fetched(page)
        ctx.stats.fetched_pages += 1
        ctx.stats.fetched_bytes += nbytes
        ctx.vm.note_refaults(ctx.clock())
        ctx.policies[i].note_refault(page, ctx.tracker.cycles, ctx.config)
        ctx.discards[i].add(page)

    def _start_fetch(
        self, i: int, t: TrackedRegion, page: int, started: float | None = None
    ) -> None:
        """Fetch ``page`` in a task; ``started``: when its fault was read (None: not timed)."""
        if self.closed:
            return
        self.fetching.add((i, page))
        self._spawn_task(self._fetch(i, t, page, started))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as one of this session's tasks (cancelled by :meth:`close`)."""
        self._spawn_task(coro)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        if self.closed:
            coro.close()
            return
        task = self._spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """End the session's fault service: cancel every fetch still running."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _zero_fill(self, t: TrackedRegion, page: int) -> FaultResult | None:
        """A page wsd never evicted: its first touch, and zeros are its true content.

        ZERO, or RACE if the page was populated meanwhile; None if it could not
        be done now (its thread was woken to fault again).
        """
        r = t.region
        addr = r.host_virt_addr + page * r.page_size
        uffd = self.ctx.tracker.uffd
        result = FaultResult.ZERO
        try:
            if r.hugetlb:  # no UFFDIO_ZEROPAGE
                copy_page(uffd, t, page, _present_zeros(r.page_size))
            else:
                uffd.zeropage(addr, r.page_size)
        except FileExistsError:
            # Populated meanwhile: another thread's fault on the same page (its
            # ZEROPAGE woke us too), or wsd wrote the page into the memfd (a
            # detached region's restore), which wakes nobody: wake it here.
            uffd.wake(addr, r.page_size)
            result = FaultResult.RACE
        except BlockingIOError:
            # EAGAIN: a life event (REMOVE, UNMAP, REMAP) is queued and not read
            # yet.  Wake the thread: it faults again, and that fault is served
            # once the event is read.  Dropping it would block it forever.
            uffd.wake(addr, r.page_size)
            return None
        t.state.note_populated([page])
        t.state.note_access([page])
        if result is FaultResult.ZERO:
            self.ctx.stats.zero_fills += 1
        return result

    async def _fetch(self, i: int, t: TrackedRegion, page: int, started: float | None) -> None:
        ctx = self.ctx
        generation = t.state.generation(page)
        try:
            try:
                data, retried = await self._get(i, t, page)
            except _Removed:
                data = None
            if t.state.generation(page) != generation:
                # The VMM removed the page while we fetched it (a balloon): the
                # bytes we got are stale and it is a fresh page now.  No await
                # between this check and the install, so no removal slips in.
                self.fetching.discard((i, page))
                self.waiters.discard((i, page))
                if t.state.is_evicted(page):
                    # Removed, touched and evicted again meanwhile: that copy.
                    self._start_fetch(i, t, page, started)
                elif (result := self._zero_fill(t, page)) is not None:
                    self._timed(result, started)
                return
            if data is None:
                self._timed(FaultResult.POISONED, started)
                return
            if await self.install(t, page, data, wake=True):
                self._timed(FaultResult.RETRIED if retried else FaultResult.OK, started)
                self._fetched(i, t, page, len(data))
            else:
                self._timed(FaultResult.RACE, started)
            started = None  # timed: a failing prefetch below is no fault's
            if ctx.config.prefetch_pages:
                await self._prefetch(i, t, page)
        except Exception as e:
            if isinstance(e, KernelError) and e.errno in VMM_GONE:
                self._timed(FaultResult.GONE, started)
                log.info("VMM memory gone, fetch dropped", vm_id=ctx.vm_id, page=page)
            else:
                self._timed(FaultResult.ERROR, started)
                # The fault was consumed, so nobody else will ask again: retry
                # later.  Anything but a lack of memory is a bug, which must not
                # take the daemon down.
                if isinstance(e, KernelError) and e.errno == errno.ENOMEM:
                    log.warning(
                        "no memory to install a fetched page; fetched again",
                        vm_id=ctx.vm_id,
                        region=i,
                        page=page,
                        error=str(e),
                    )
                else:
                    log.exception("fetch failed", vm_id=ctx.vm_id, region=i, page=page)
                self.fetching.discard((i, page))
                await asyncio.sleep(1.0)
                if t.state.is_evicted(page) and (i, page) not in self.fetching:
                    self._start_fetch(i, t, page, ctx.clock())
                return
        self.fetching.discard((i, page))
        self.waiters.discard((i, page))

    async def _get(self, i: int, t: TrackedRegion, page: int) -> tuple[bytes | None, bool]:
        """The page's stored bytes, retrying until they come or the deadline policy ends it.

        Also whether any attempt failed first.  None: the page was poisoned.
        """
        ctx = self.ctx
        cfg = ctx.config
        r = t.region
        generation = t.state.generation(page)
        delay = cfg.fetch_retry_initial_seconds
        started = ctx.clock()
        alerted = failed = False
        while True:
            if t.is_held_back(page):
                error: Exception = RuntimeError(
                    "its bytes are held in pipes that could not be read after its punch; "
                    "the next cycle tries again, a restart puts it back from the fd store"
                )
            elif ctx.tier is None:
                error = RuntimeError("no storage tier is configured")
            else:
                try:
                    stored = await ctx.tier.get(
                        ctx.namespaces[i], page * r.page_size, generation=generation
                    )
                    return stored.data, failed
                except StorageError as e:
                    error = e
            ctx.stats.fetch_errors += 1
            failed = True
            waited = ctx.clock() - started
            if waited < cfg.fetch_deadline_seconds:
                log.warning(
                    "fetch failed, retrying",
                    vm_id=ctx.vm_id,
                    region=i,
                    page=page,
                    generation=generation,
                    error=str(error),
                    retry_in=round(delay, 3),
                )
            elif cfg.on_fetch_deadline is OnDeadline.POISON:
                log.error(
                    "fetch deadline passed: poisoning the page",
                    vm_id=ctx.vm_id,
                    region=i,
                    page=page,
                    waited=round(waited, 1),
                    error=str(error),
                )
                self._poison(t, page)
                return None, True
            elif not alerted:
                alerted = True
                ctx.stats.fetches_stuck += 1
                log.error(
                    "fetch deadline passed: the vCPU stays blocked until the page can be read",
                    vm_id=ctx.vm_id,
                    region=i,
                    page=page,
                    waited=round(waited, 1),
                    error=str(error),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.fetch_retry_max_seconds)
            if t.state.generation(page) != generation:
                raise _Removed  # removed by the VMM meanwhile: stop asking the tier

    async def install(
        self, t: TrackedRegion, page: int, data: bytes, *, wake: bool, wp: bool = False
    ) -> bool:
        """UFFDIO_COPY ``data`` to the page; False if someone else populated it first.

        ``wp`` installs it write-protected (wp-async mode: its next write shows).
        """
        r = t.region
        addr = r.host_virt_addr + page * r.page_size
        for attempt in range(COPY_EAGAIN_RETRIES):
            try:
                copy_page(self.ctx.tracker.uffd, t, page, data, wake=wake, wp=wp)
                return True
            except FileExistsError:
                if page in t.remnants:
                    # Not a hole but the zeros a failed THP split left: ours win.
                    # Wake whatever the caller wanted: a thread blocked on it
                    # (a MINOR fault) re-faults and gets the page mapped.
                    restore_remnant(t, page, data)
                    self.ctx.tracker.uffd.wake(addr, r.page_size)
                    return True
                # Only the VMM itself (writing through another mapping), or wsd
                # restoring a detached region, can have filled the hole: its
                # bytes are at least as new as ours, keep them.  A failed COPY
                # wakes nobody, so wake the thread that faulted.
                self.ctx.stats.copy_races += 1
                self.ctx.tracker.uffd.wake(addr, r.page_size)
                t.state.note_fetched([page])
                return False
            except BlockingIOError:
                if attempt == COPY_EAGAIN_RETRIES - 1:
                    raise
                await asyncio.sleep(0.001)
        raise AssertionError("unreachable")

    def on_minor(self, fault: PageFault, read_at: float | None = None) -> bool:
        """A MINOR fault the tracker left to us: a punch remnant; False if not one.

        ``read_at``: when its message was read (default: now).
        """
        started = self.ctx.clock() if read_at is None else read_at
        where = self.ctx.tracker.locate(fault.address)
        if where is None:
            return False
        i, t, page = where
        if page not in t.remnants:
            return False
        if (i, page) in self.fetching:
            self.waiters.add((i, page))
        else:
            self.fetching.add((i, page))
            self._spawn_task(self._restore_remnant(i, t, page, started))
        return True

    async def _restore_remnant(self, i: int, t: TrackedRegion, page: int, started: float) -> None:
        r = t.region
        addr = r.host_virt_addr + page * r.page_size
        try:
            data, retried = await self._get(i, t, page)
            if data is None:
                self._timed(FaultResult.POISONED, started)
                return
            result = FaultResult.RACE
            if page in t.remnants:
                restore_remnant(t, page, data)
                t.state.note_page_fetched(page)
                self.ctx.stats.fetched_pages += 1
                self.ctx.stats.fetched_bytes += len(data)
                result = FaultResult.RETRIED if retried else FaultResult.OK
            try:
                self.ctx.tracker.uffd.continue_(addr, r.page_size)
            except FileExistsError:
                self.ctx.tracker.uffd.wake(addr, r.page_size)
            self._timed(result, started)
        except Exception as e:
            if isinstance(e, KernelError) and e.errno in VMM_GONE:
                self._timed(FaultResult.GONE, started)
                return
            self._timed(FaultResult.ERROR, started)
            log.exception("restoring a punch remnant failed", vm_id=self.ctx.vm_id, page=page)
        finally:
            self.fetching.discard((i, page))
            self.waiters.discard((i, page))

    async def _prefetch(self, i: int, t: TrackedRegion, page: int) -> None:
        """Bring back evicted neighbours after ``page``, re-armed so they still look cold.

        A COPY'd page is unprotected and would read as ACCESSED at the next
        scan (RWP-FACTS fact 6): install without waking, re-protect, then wake,
        so a thread waiting on one of them re-touches a protected page and is
        recorded like any access.  In wp-async mode the COPY itself protects.
        """
        ctx = self.ctx
        r = t.region
        end = min(t.npages, page + 1 + ctx.config.prefetch_pages)
        span = np.arange(page + 1, end)
        wanted = [
            int(p)
            for p in span[t.state.evicted_mask(span)]
            if (i, int(p)) not in self.fetching and not t.is_held_back(int(p))
        ]
        if not wanted or ctx.tier is None:
            return
        self.fetching.update((i, p) for p in wanted)
        installed: set[int] = set()
        try:
            gens = {p * r.page_size: int(t.state.generations[p]) for p in wanted}
            try:
                got = await ctx.tier.get_many(
                    ctx.namespaces[i], list(gens), generations=gens, missing_ok=True
                )
            except StorageError as e:
                log.debug("prefetch skipped", vm_id=ctx.vm_id, region=i, error=str(e))
                return
            for offset, stored in got.items():
                p = offset // r.page_size
                if not t.state.is_evicted(p) or t.state.generation(p) != gens[offset]:
                    continue  # fetched meanwhile, or removed by the VMM
                # In wp-async mode a page COPY'd without WP reads as written at
                # the next scan: a prefetched page would look hot.
                wp = ctx.tracker.mode is TrackingMode.WP_ASYNC
                try:
                    installed_now = await self.install(t, p, stored.data, wake=False, wp=wp)
                except KernelError as e:
                    if e.errno != errno.ENOMEM:
                        raise
                    break  # no memory to spare for pages nobody asked for yet
                if installed_now:
                    addr = r.host_virt_addr + offset
                    if ctx.tracker.mode is TrackingMode.RWP:
                        ctx.tracker.uffd.rwprotect(addr, r.page_size, protect=True, wake=True)
                    else:
                        ctx.tracker.uffd.wake(addr, r.page_size)
                    t.state.note_fetched([p])
                    ctx.discards[i].add(p)
                    ctx.stats.prefetched_pages += 1
                installed.add(p)
        finally:
            for p in wanted:
                self.fetching.discard((i, p))
                if (i, p) in self.waiters:
                    self.waiters.discard((i, p))
                    if p not in installed and t.state.is_evicted(p):
                        self._start_fetch(i, t, p)
                    elif p in installed:
                        # Woken already; once more costs nothing and a thread
                        # that faulted on it must never be left asleep.
                        ctx.tracker.uffd.wake(r.host_virt_addr + p * r.page_size, r.page_size)

    def _poison(self, t: TrackedRegion, page: int) -> None:
        r = t.region
        addr = r.host_virt_addr + page * r.page_size
        uffd = self.ctx.tracker.uffd
        try:
            try:
                uffd.poison(addr, r.page_size)
            except FileExistsError:
                if self.ctx.tracker.mode is TrackingMode.RWP:
                    raise
                # In wp mode the punch left a uffd-wp PTE marker on the hole
                # (shmem keeps WP across a zap), and POISON refuses any
                # non-empty PTE.  Unprotecting clears the marker.
                uffd.writeprotect(addr, r.page_size, protect=False, wake=False)
                uffd.poison(addr, r.page_size)
        except KernelError as e:
            log.error("UFFDIO_POISON failed", vm_id=self.ctx.vm_id, page=page, error=str(e))
            return
        self.ctx.stats.poisoned_pages += 1
