"""Ending a session: every evicted page goes back into guest memory first.

Once wsd lets go of a uffd nobody serves its MISSING faults; if the VMM still
runs, an evicted page would then block its vCPU forever or, once the uffd is
gone, read back as zeros (RWP-FACTS fact 9).  So a session ends by copying
every evicted page back.  The stored copies are discarded only when they are
no longer needed: every page is back, or the VMM's memory is gone.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Collection

import numpy as np
import structlog

from wsd.kernel import KernelError, write_into
from wsd.storage import StorageError

from .context import VmContext
from .faults import FaultService
from .transaction import holds_data

log = structlog.get_logger("wsd.evictor")

BATCH = 256


async def drain(ctx: VmContext, faults: FaultService) -> bool:
    """Bring back every evicted page of the VM, then forget the stored copies.

    True when nothing is left to serve: every page is back, or the VMM's
    memory is gone.  False when pages stay in storage (a tier that kept
    failing or hanging for ``fetch_deadline_seconds``): nothing is discarded
    and the session must then stay resumable.
    """
    if ctx.tier is None:
        return True
    gone = False
    for i in range(len(ctx.tracker.regions)):
        try:
            await _drain_region(ctx, i, faults)
        except KernelError as e:
            if e.errno == errno.ENOMEM:
                # No page to install into (a hugetlbfs pool, a cgroup at its
                # limit): like a failing tier, the rest stays in storage.
                return _left_in_storage(ctx, i, e)
            if e.errno not in (errno.ESRCH, errno.EFAULT):
                raise
            # The VMM's address space is gone: nothing left to serve.
            log.info("VMM memory gone, dropping its stored pages", vm_id=ctx.vm_id, error=str(e))
            gone = True
            break
        except StorageError as e:
            return _left_in_storage(ctx, i, e)
    if not gone and any(t.state.evicted_pages for t in ctx.tracker.regions):
        return False
    for ns in ctx.namespaces:
        try:
            await ctx.tier.discard(ns)
        except StorageError as e:
            log.warning("discarding a VM's pages failed", vm_id=ctx.vm_id, error=str(e))
    return True


async def _drain_region(ctx: VmContext, i: int, faults: FaultService) -> None:
    """Bring region ``i``'s evicted pages back: through the uffd, or into the
    memfd where the VMM no longer maps the region."""
    t = ctx.tracker.regions[i]
    if t.vanished is None:

        async def install(p: int, data: bytes) -> None:
            if await faults.install(t, p, data, wake=True):
                t.state.note_fetched([p])
                ctx.stats.fetched_pages += 1
                ctx.stats.fetched_bytes += len(data)

        try:
            await _bring_back(ctx, i, faults.fetching, install, "drain")
            return
        except KernelError as e:
            # ENOENT: no registered mapping there any more (detached by an
            # UNMAP read during the drain, or unregistered by the VMM).  The
            # VMM's other memory is still the guest's: not ESRCH.
            if e.errno != errno.ENOENT:
                raise
            log.info("region unmapped under the drain", vm_id=ctx.vm_id, region=i)
    # Unmapped or moved (events.detach; its release may not be done): the
    # memfd outlives the mapping, and whoever maps it next must find the pages.
    await restore_to_memfd(ctx, i, faults.fetching)


def _left_in_storage(ctx: VmContext, i: int, error: Exception) -> bool:
    log.error(
        "cannot bring evicted pages back: they stay in storage",
        vm_id=ctx.vm_id,
        region=i,
        pages_left=sum(t.state.evicted_pages for t in ctx.tracker.regions),
        error=str(error),
    )
    return False


async def restore_to_memfd(
    ctx: VmContext, i: int, fetching: Collection[tuple[int, int]] = ()
) -> int:
    """Write region ``i``'s evicted pages back into its memfd, not through the uffd.

    For memory the uffd cannot serve any more: a region the VMM unmapped or
    moved (the memfd outlives the mapping, and whoever maps it next must find
    the guest's bytes), or one another process maps (its accesses bypass the
    uffd).  A page is written only while it is still a hole, checked right
    before the write with no ``await`` in between: a hole cannot have been
    written by anyone, so nothing newer is overwritten.  Pages in ``fetching``
    are left to their fetch.  Returns the pages written; raises
    :class:`StorageError` if the tier fails past the fetch deadline, and
    :class:`KernelError` ``ENOMEM`` if a page finds no memory for as long.
    """
    t = ctx.tracker.regions[i]
    if ctx.tier is None:
        assert not t.state.evicted_pages
        return 0
    r = t.region
    cfg = ctx.config
    written = 0

    async def write(p: int, data: bytes) -> None:
        nonlocal written
        at = r.offset + p * r.page_size
        delay = cfg.fetch_retry_initial_seconds
        since = ctx.clock()
        while not holds_data(t.memfd, r, p):
            try:
                write_into(t.memfd, data, at)
            except KernelError as e:
                if e.errno != errno.ENOMEM or ctx.clock() - since > cfg.fetch_deadline_seconds:
                    raise
                # hugetlbfs: no page in the pool to reserve for the hole.  As a
                # hole it would read as zeros wherever the memfd is mapped next.
                log.warning(
                    "no memory to write an evicted page back; retrying",
                    vm_id=ctx.vm_id,
                    region=i,
                    page=p,
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.fetch_retry_max_seconds)
                continue
            written += 1
            break
        else:
            # Filled behind the uffd (another mapper touched the hole):
            # whatever it holds is what the guest sees now.
            log.error(
                "an evicted page was repopulated behind the uffd; its stored bytes lost",
                vm_id=ctx.vm_id,
                region=i,
                page=p,
            )
        t.state.note_fetched([p])
        ctx.discards[i].add(p)

    await _bring_back(ctx, i, fetching, write, "restore")
    return written


async def _bring_back(
    ctx: VmContext,
    i: int,
    fetching: Collection[tuple[int, int]],
    place: Callable[[int, bytes], Awaitable[None]],
    what: str,
) -> None:
    """Fetch every evicted page of region ``i``, ``BATCH`` at a time, and ``place`` each.

    A page is placed only if it is still evicted at the generation fetched
    (not fetched back or removed by the VMM during the get) and not in
    ``fetching`` (a fault's fetch installs it).  A failing or hanging tier is
    retried with the fetch backoff; once it has served nothing for
    ``fetch_deadline_seconds`` this raises :class:`StorageError`, leaving the
    rest in storage.
    """
    assert ctx.tier is not None
    cfg = ctx.config
    t = ctx.tracker.regions[i]
    ps = t.region.page_size
    delay = cfg.fetch_retry_initial_seconds
    progress_at = ctx.clock()
    while t.state.evicted_pages:
        left = np.flatnonzero(t.state.evicted).tolist()
        held_back = {p for p in left if t.is_held_back(p)}
        if len(held_back) == len(left):
            raise StorageError(
                f"{len(held_back)} pages are held in pipes that could not be read after their "
                "punch; a restart puts them back from the fd store",
                backend=ctx.tier.store.name,
                vm_id=ctx.vm_id,
                region=i,
            )
        pages = [p for p in left if (i, p) not in fetching and p not in held_back]
        if not pages:
            # Only fetches in flight: let them land, within the deadline.
            if ctx.clock() - progress_at > cfg.fetch_deadline_seconds:
                raise StorageError(
                    f"{t.state.evicted_pages} fetches still failing after the deadline",
                    backend=ctx.tier.store.name,
                    vm_id=ctx.vm_id,
                    region=i,
                )
            await asyncio.sleep(0.005)
            continue
        for k in range(0, len(pages), BATCH):
            gens = {p * ps: t.state.generation(p) for p in pages[k : k + BATCH]}
            try:
                got = await ctx.tier.get_many(ctx.namespaces[i], list(gens), generations=gens)
            except StorageError as e:
                if ctx.clock() - progress_at > cfg.fetch_deadline_seconds:
                    raise
                log.warning(f"{what}: fetch failed, retrying", vm_id=ctx.vm_id, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.fetch_retry_max_seconds)
                break
            progress_at, delay = ctx.clock(), cfg.fetch_retry_initial_seconds
            for offset, stored in got.items():
                p = offset // ps
                if not t.state.is_evicted(p) or t.state.generation(p) != gens[offset]:
                    continue  # fetched back, or removed (and maybe evicted again), meanwhile
                if (i, p) not in fetching:
                    await place(p, stored.data)
