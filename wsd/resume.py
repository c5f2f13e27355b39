"""Sessions that outlive a wsd process: parked at hand-off, resumed after a restart.

**Park** (right after a hand-off is accepted, before anything is evicted):
write the session's description (:mod:`wsd.recovery`), then hand its uffd and
memfds to systemd's fd store (:mod:`wsd.fdstore`).  In that order, a restarted
wsd that gets the fds back always finds the description.

**Resume** (at start, for each session systemd hands back): check the VMM is
the same process (pid and start time), adopt the uffd without negotiating
anything again, and rebuild each region's state from the memfd (what is
resident) and the page map (which holes are evicted, at which generation).
Faults that queued while no wsd ran are then read and served like any others.

**Unpark** when a session ends for good (drained, or its VMM gone): take the
fds out of the store and delete the description and the page map.

**Take over** (before a new hand-off of a VM parks its session): what an
earlier session of the same ``vm_id`` left parked is unparked, unless that
session's VMM still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from wsd import fdstore, recovery
from wsd.evictor import held as evictor_held
from wsd.evictor import pagemap
from wsd.evictor.context import VmContext
from wsd.kernel import Feature, KernelFeatures, close_fds, process_start_ticks
from wsd.recovery import RecoveryError, SessionRecord
from wsd.storage import IntegrityError, PageNamespace, PageStore, StorageError
from wsd.tracker.mode import LIMITATIONS, REGISTER, ModeDecision, TrackingMode
from wsd.tracker.session import VmTracker
from wsd.vmm.protocol import Region

log = structlog.get_logger("wsd.resume")


def memfd_positions(regions: Sequence[Region]) -> list[int]:
    """Each region's memfd as a position in the session's memfd list (sorted fd indexes)."""
    order = sorted({r.fd_index for r in regions})
    return [order.index(r.fd_index) for r in regions]


def park(
    state_dir: Path, vm_id: str, vmm_pid: int, tracker: VmTracker, memfds: Sequence[int]
) -> None:
    """Persist the session's description, then put its fds in systemd's store.

    A VM seen before starts every page right below its generation ceiling: its
    earlier sessions' records may still be about (:mod:`wsd.evictor.pagemap`).
    """
    ceiling = pagemap.load_ceiling(state_dir, vm_id)
    if ceiling:
        tracker.generation_ceiling = ceiling
        for t in tracker.regions:
            t.state.lift_generations(ceiling - 1)
    regions = [t.region for t in tracker.regions]
    record = SessionRecord(
        vm_id=vm_id,
        vmm_pid=vmm_pid,
        vmm_start_ticks=process_start_ticks(vmm_pid),
        mode=tracker.mode,
        features=int(tracker.uffd.features or Feature(0)),
        regions=[
            r.model_copy(update={"fd_index": k})
            for r, k in zip(regions, memfd_positions(regions), strict=True)
        ],
        minor=[t.minor for t in tracker.regions],
    )
    recovery.save(state_dir, record)
    if not fdstore.store(vm_id, tracker.uffd.fd, memfds):
        log.info(
            "no systemd fd store: after a wsd crash this session lives on only if its VMM "
            "reattaches, with the pipes wsd sends it to keep (docs/protocol.md)",
            vm_id=vm_id,
        )


def take_over(state_dir: Path, vm_id: str) -> SessionRecord | None:
    """Make way for a new session of ``vm_id``: unpark what an earlier one left
    (a wsd that died without an fd store, a session whose pages could not all
    come back), keeping the generation ceiling.  Returns that session's record
    instead, and changes nothing, if its VMM still runs: its evicted pages are
    in storage and only that VMM can take them back (a reattach).

    An earlier session's page map lists pages of its own memfd.  Left in
    place, the new session's journals would be replayed over it after a
    crash, and the holes of the new memfd at those pages taken for evicted
    ones: the new guest would read the old one's bytes from storage.
    Blocking (file I/O): a worker thread's job.
    """
    record = None
    try:
        record = recovery.load(state_dir, vm_id)
    except RecoveryError as e:
        if recovery.session_path(state_dir, vm_id).exists():
            log.warning("an earlier session's description is unusable", vm_id=vm_id, error=str(e))
    if record is not None and same_process(record):
        return record
    if record is None and not (
        pagemap.path_for(state_dir, vm_id).exists() or pagemap.journals(state_dir, vm_id)
    ):
        return None
    log.warning(
        "dropping what an earlier session of the VM left parked",
        vm_id=vm_id,
        vmm_pid=None if record is None else record.vmm_pid,
    )
    memfds = 0 if record is None else max(r.fd_index for r in record.regions) + 1
    unpark(state_dir, vm_id, memfds)
    return None


def unpark(state_dir: Path, vm_id: str, memfds: int, *, held: int = 0) -> None:
    fdstore.remove(vm_id, memfds, held=held)
    recovery.remove(state_dir, vm_id)
    pagemap.remove(state_dir, vm_id)


@dataclass
class Resumed:
    tracker: VmTracker
    memfds: list[int]


async def resume(
    stored: fdstore.StoredSession,
    *,
    state_dir: Path | None,
    store: PageStore | None,
    kernel: KernelFeatures,
    clock: Callable[[], float] = time.monotonic,
) -> Resumed | None:
    """Adopt a session systemd handed back; None if it cannot be (and it is cleaned up)."""
    vm_id = stored.vm_id
    memfds = [stored.memfds[k] for k in sorted(stored.memfds)]
    assert stored.uffd is not None
    if state_dir is None:
        log.error("stored session dropped: no state_dir to resume it from", vm_id=vm_id)
        close_fds([stored.uffd, *memfds, *stored.held.values()])
        fdstore.remove(vm_id, len(memfds), held=max(stored.held, default=-1) + 1)
        return None
    try:
        record, vmap, ceiling = load(state_dir, vm_id)
        if len(memfds) != max(r.fd_index for r in record.regions) + 1:
            raise RecoveryError(f"{len(memfds)} memfds stored, the description uses more")
    except RecoveryError as e:
        # Without the description the fds cannot be used; without a trusted
        # map its evicted pages would be served as zeros.  Loudly give up.
        log.error("stored session cannot be resumed", vm_id=vm_id, error=str(e))
        close_fds([stored.uffd, *memfds, *stored.held.values()])
        fdstore.remove(vm_id, len(memfds), held=max(stored.held, default=-1) + 1)
        return None
    if not same_process(record):
        log.warning("VMM of a stored session is gone, dropping its pages", vm_id=vm_id)
        await _discard_stored(store, record, vmap)
        close_fds([stored.uffd, *memfds, *stored.held.values()])
        unpark(state_dir, vm_id, len(memfds), held=max(stored.held, default=-1) + 1)
        return None
    remove_temporaries(state_dir, vm_id)
    try:
        tracker = adopt(
            record,
            vmap,
            stored.uffd,
            memfds,
            ceiling=ceiling,
            kernel=kernel,
            clock=clock,
            held=stored.held,
        )
    except BaseException:
        close_fds(memfds)
        raise
    return Resumed(tracker, memfds)


def adopt(
    record: SessionRecord,
    vmap: pagemap.VmMap | None,
    uffd: int,
    memfds: Sequence[int],
    *,
    ceiling: int,
    kernel: KernelFeatures,
    clock: Callable[[], float] = time.monotonic,
    held: Mapping[int, int] | None = None,
) -> VmTracker:
    """Track ``record``'s session again with its uffd and memfds (owns the uffd).

    ``ceiling``: the VM's generation ceiling (:mod:`wsd.evictor.pagemap`).
    ``held``: the session's verified-punch pipes from the fd store or the
    VMM (part -> fd, owned here).  A chunk the previous wsd died in is put back before
    anything else reads the memfd, so that its pages count as resident.
    """
    decision = ModeDecision(
        record.mode, REGISTER[record.mode], "resumed from a previous wsd", LIMITATIONS[record.mode]
    )
    tracker: VmTracker | None = None
    try:
        tracker = VmTracker.adopt(
            record.vm_id,
            vmm_pid=record.vmm_pid,
            uffd_fd=uffd,
            features=Feature(record.features),
            regions=[(r, memfds[r.fd_index]) for r in record.regions],
            minor=record.minor,
            decision=decision,
            kernel=kernel,
            clock=clock,
            vanished=record.vanished,
        )
        listed = [_listed(vmap, i, t.region) for i, t in enumerate(tracker.regions)]
        gone = [_logged_removed(vmap, i, pages, gens) for i, (pages, gens) in enumerate(listed)]
        if held:
            wp = record.mode is TrackingMode.WP_ASYNC
            evicted_now = [
                set(pages.tolist()).difference(g.tolist())
                for (pages, _), g in zip(listed, gone, strict=True)
            ]
            evictor_held.put_back(tracker, held, wp=wp, listed=evicted_now)
            held = None
        evicted = stale = removed = 0
        tracker.generation_ceiling = ceiling
        floor = max(ceiling - 1, 0)
        for t, (pages, gens), g in zip(tracker.regions, listed, gone, strict=True):
            t.listed_resident = t.state.restore(t.resident(), pages, gens, floor=floor)
            if len(g):
                # As the dead wsd did when it read their REMOVE: fresh pages
                # (zeros at their next touch), their generation moved on, and
                # their stored copies garbage.
                holes = g[t.state.evicted_mask(g)]
                t.state.note_removed(holes)
                t.state.lift_generations(floor, holes)  # as for any page not listed
                t.listed_resident = np.union1d(t.listed_resident, holes)
                removed += len(holes)
            evicted += t.state.evicted_pages
            stale += len(t.listed_resident)
    except BaseException:
        if tracker is not None:
            tracker.close()
        if held:
            close_fds(list(held.values()))
        raise
    log.info(
        "session resumed",
        vm_id=record.vm_id,
        mode=str(record.mode),
        evicted_pages=evicted,
        stale_copies=stale,
        removed_before_the_restart=removed,
    )
    return tracker


def load(state_dir: Path, vm_id: str) -> tuple[SessionRecord, pagemap.VmMap | None, int]:
    """A parked session's description, page map and generation ceiling;
    :class:`RecoveryError` says what is wrong."""
    return recovery.load(state_dir, vm_id), _load_map(state_dir, vm_id), _ceiling(state_dir, vm_id)


def remove_temporaries(state_dir: Path, vm_id: str) -> None:
    """What the cut-short writes of a dead wsd left of ``vm_id``'s files.  Call it
    before the session is taken back (from the fd store, or reattached by its
    VMM): until then nothing writes them."""
    recovery.remove_temporaries(state_dir, vm_id)
    pagemap.remove_temporaries(state_dir, vm_id)


def same_process(record: SessionRecord) -> bool:
    """Whether the session's VMM is still the process that handed it off."""
    try:
        return process_start_ticks(record.vmm_pid) == record.vmm_start_ticks
    except OSError:
        return False


def _ceiling(state_dir: Path, vm_id: str) -> int:
    try:
        return pagemap.load_ceiling(state_dir, vm_id)
    except pagemap.PageMapError as e:
        raise RecoveryError(str(e)) from e


def _load_map(state_dir: Path, vm_id: str) -> pagemap.VmMap | None:
    try:
        return pagemap.load_vm(state_dir, vm_id)  # None: nothing was ever evicted
    except pagemap.PageMapError as e:
        raise RecoveryError(str(e)) from e


def _logged_removed(
    vmap: pagemap.VmMap | None,
    i: int,
    pages: npt.NDArray[np.int64],
    gens: npt.NDArray[np.uint32],
) -> npt.NDArray[np.int64]:
    """The listed ``pages`` of region ``i`` that the VMM removed: journalled at
    exactly the generation the map lists them at."""
    if vmap is None or not len(vmap.removed):
        return np.empty(0, np.int64)
    logged = vmap.removed[vmap.removed["region"] == i]
    maybe = np.flatnonzero(np.isin(pages, logged["page"].astype(np.int64)))
    if not len(maybe):
        return np.empty(0, np.int64)
    pairs = set(zip(logged["page"].tolist(), logged["generation"].tolist(), strict=True))
    hit = [k for k in maybe.tolist() if (int(pages[k]), int(gens[k])) in pairs]
    return pages[hit]


def _listed(
    vmap: pagemap.VmMap | None, i: int, region: Region
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]:
    if vmap is None:
        return np.empty(0, np.int64), np.empty(0, np.uint32)
    if i >= len(vmap.regions):
        raise RecoveryError(f"the page map of {vmap.vm_id!r} has no region {i}")
    m = vmap.regions[i]
    if (m.offset, m.size, m.page_size) != (region.offset, region.size, region.page_size):
        raise RecoveryError(f"the page map of {vmap.vm_id!r} describes region {i} differently")
    return m.pages, m.generations


async def _discard_stored(
    store: PageStore | None, record: SessionRecord, vmap: pagemap.VmMap | None
) -> None:
    if store is None or vmap is None:
        return
    for i, m in enumerate(vmap.regions):
        ns = PageNamespace(record.vm_id, i, m.page_size)
        try:
            await store.discard(ns, [int(p) * m.page_size for p in m.pages])
        except StorageError as e:
            log.warning("discarding a gone VMM's pages failed", vm_id=record.vm_id, error=str(e))


PROBED_PAGES = 8
"""Evicted pages per region a resumed session asks its tier for (check_stored)."""


async def check_stored(ctx: VmContext) -> None:
    """Ask the tier for a few evicted pages of each region of a resumed or
    reattached session, and say so loudly if it has none of them.

    A wsd restarted with another ``[storage]`` (another kind, another
    ``root``) than the one that stored the pages finds none: their faults
    then wait, each fetch logging "page not found", until a wsd with the
    storage that holds them takes the session over.  One error line at the
    start names the cause instead.  A tier that cannot be reached is left to
    the faults' retries.
    """
    for i, t in enumerate(ctx.tracker.regions):
        pages = t.state.first_evicted(PROBED_PAGES)
        if not pages:
            continue
        where = {"vm_id": ctx.vm_id, "region": i, "evicted_pages": t.state.evicted_pages}
        if ctx.tier is None:
            log.error(
                "a resumed session has evicted pages but no storage is configured: their "
                "faults wait until a wsd with the storage that holds them takes it over",
                **where,
            )
            return
        ps = t.region.page_size
        gens = {p * ps: t.state.generation(p) for p in pages}
        try:
            got = await ctx.tier.get_many(
                ctx.namespaces[i], list(gens), generations=gens, missing_ok=True
            )
        except IntegrityError as e:
            log.error("a resumed session's stored pages fail their checks", **where, error=str(e))
            return
        except StorageError as e:
            log.warning("could not check a resumed session's stored pages", **where, error=str(e))
            continue
        if not got:
            log.error(
                "the configured storage holds none of a resumed session's evicted pages "
                "asked for: was [storage] changed since they were stored?  Their faults "
                "wait until a wsd with the storage that holds them takes it over",
                **where,
                asked=len(gens),
                storage=ctx.tier.store.name,
            )
            return
