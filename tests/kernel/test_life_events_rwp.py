"""Guest memory life events, DMA pins and other mappers in rwp mode, on Linux 7.3.

The same guarantees as tests/integration/test_life_events_host.py (wp-async),
with wsd's sync window in the way.  ``wsd guest`` acts the VMM where it can:
it marks its RAM ``dma_pinned`` (``--dma-pinned``), and a second process maps
its memfd through ``/proc/<guest>/fd/<memfd>``.  A puppet VMM acts where
``wsd guest`` cannot: a balloon (``madvise`` on its own mapping; no other
process can, ``process_madvise`` takes neither ``MADV_DONTNEED`` nor
``MADV_REMOVE``), an unplug or a move (``munmap``, ``mremap``) of all or part
of its memory, inside wsd's sync window or outside it, and a ``VmPin``
(io_uring registered buffers, created without ``CAP_IPC_LOCK``: on 7.3 root's
do not show in ``VmPin``).  Each test fails on a daemon that ignores its case
(docs/life-events.md says how that was checked).

Guests are small (4-8 MiB): under TCG a demand fetch can take 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from wsd.daemon import Daemon, Session
from wsd.evictor.drain import drain
from wsd.evictor.guards import CHECK_EVERY_CYCLES
from wsd.guest.process import GuestProcess
from wsd.kernel import Feature, data_ranges, pinned_bytes, pread
from wsd.snapshot import vm_snapshot
from wsd.storage import FileStoreConfig, PageStore
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_puppet
from wsd.testing.life_events import (
    EVICT_IDLE_FOR_ONE_CYCLE,
    call,
    evict,
    evicting_settings,
    evictor_session,
    track_split,
    uffd_vmflags,
    wait_until,
)
from wsd.testing.mapper import MemfdMapper
from wsd.testing.puppet_vmm import DISCARDED, PuppetVMM, page_pattern
from wsd.testing.running import running_daemon, serving_faults
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import VmTracker

pytestmark = pytest.mark.asyncio
MIB = 1 << 20
INTERVAL = 0.3
# Evict everything idle for one interval, in windows small enough for TCG.
EVICTOR = {
    "max_pages_per_window": 1024,
    "batch_pages": 128,
    "promotion_target_percent_per_minute": None,
    "prefetch_pages": 8,
}


@pytest_asyncio.fixture
async def daemon(rwp_supported: Feature, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(evicting_settings(tmp_path, INTERVAL, **EVICTOR)) as d:
        assert d.decision.mode is TrackingMode.RWP
        yield d


@pytest_asyncio.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[PageStore]:
    store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
    yield store
    await store.close()


@pytest.fixture
def puppet_8m(rwp_supported: Feature) -> Iterator[PuppetVMM]:
    with PuppetVMM.spawn(8 * MIB) as p:
        yield p


async def start_guest(d: Daemon, vm_id: str, *args: str) -> GuestProcess:
    argv = ["--socket", str(d.settings.socket), "--vm-id", vm_id, "--size", "4M"]
    argv += ["--hot", "0.1", "--thp", "never", *args]
    start = functools.partial(GuestProcess.start, argv, ready_timeout=300)
    return await asyncio.to_thread(start)


async def stop_guest(guest: GuestProcess) -> None:
    """Stop it off the loop (its munmap at exit waits for wsd, on this loop); check its data."""
    try:
        assert await asyncio.to_thread(guest.stop, 300) == 0, guest.stderr()
    finally:
        guest.close()
    report = guest.report()
    assert report["verify_errors"] == 0 and report["final_check_pages"] == report["pages"]


async def cycles_pass(s: Session, n: int, timeout: float = 120.0) -> None:
    """Wait until ``n`` more cycles (window, then prepare) have completed."""
    target = s.tracker.cycles + n + 1  # the count moves before the cycle's prepare
    await wait_until(lambda: s.tracker.cycles >= target, f"{n} cycles", timeout)


def memfd_resident_bytes(fd: int, size: int) -> int:
    return sum(e - b for b, e in data_ranges(fd, 0, size))


def memfd_versions(fd: int, first: int, count: int) -> list[int | None]:
    """Each page's version in the memfd itself (pread: no fault), -1 for zeros."""
    out: list[int | None] = []
    for p in range(first, first + count):
        data = bytes(pread(fd, 4096, p * 4096))
        out.append(
            0 if data == page_pattern(p, 0, 4096) else (DISCARDED if not any(data) else None)
        )
    return out


def pages_where(mask: npt.NDArray[np.bool_], lo: int, hi: int) -> list[int]:
    return [int(p) for p in np.flatnonzero(mask[lo:hi]) + lo]


# ---------------------------------------------------------------------------
# balloon: UFFD_EVENT_REMOVE


async def test_balloon_removed_pages_read_zeros_while_others_are_served(
    daemon: Daemon,
) -> None:
    """Evicted pages a balloon takes back read zeros; every other page reads its data.

    The real daemon evicts the puppet's idle memory; then the puppet discards
    evicted pages both ways a VMM does (``MADV_REMOVE``; QEMU's punch then
    ``MADV_DONTNEED``) and resident ones, re-reads a stretch of its memory,
    and writes a removed page again, which must come back as written after
    its next eviction.  A daemon deaf to REMOVE serves the old bytes.
    """
    p = await asyncio.to_thread(
        PuppetVMM.spawn, 4 * MIB, handoff=daemon.settings.socket, vm_id="balloon"
    )
    try:
        assert p.handoff_reply is not None and p.handoff_reply["type"] == "accepted"
        s = daemon.sessions["balloon"]
        state = s.tracker.regions[0].state
        await wait_until(lambda: state.evicted_pages >= 900, "eviction", timeout=180)
        s.paused = True
        await cycles_pass(s, 2)  # the last prepared batch is committed: nothing in flight
        await call(p, "write", pages=list(range(8)), version=1)  # fetched back, rewritten
        evicted = pages_where(state.evicted, 8, 256)
        assert len(evicted) >= 64, evicted
        by_remove, by_punch = evicted[:16], evicted[16:32]
        resident = [0, 1, 2, 3]
        # Each madvise waits until wsd has read its REMOVE: on the daemon's loop.
        await call(p, "discard", pages=by_remove, how="remove")
        await call(p, "discard", pages=by_punch, how="punch+dontneed")
        await call(p, "discard", pages=resident, how="remove")
        # The puppet checks each page: zeros where discarded, its data elsewhere.
        versions = await call(p, "read", pages=list(range(256)), timeout=300)
        gone = set(by_remove + by_punch + resident)
        want = [DISCARDED if i in gone else (1 if i < 8 else 0) for i in range(256)]
        assert versions == want
        assert s.tracker.removed_evicted_pages == 32
        assert s.tracker.removed_pages == 36
        assert not state.evicted_mask(np.array(by_remove + by_punch)).any()
        assert s.ctx.stats.zero_fills >= 36 and s.ctx.stats.fetched_pages > 0
        # A removed page written again is a page like any other: evicted and
        # fetched back at its new version, never zeros or the old copy.
        again = by_remove[:4]
        await call(p, "write", pages=again, version=2)
        s.paused = False
        await wait_until(
            lambda: bool(state.evicted_mask(np.array(again)).all()), "re-eviction", timeout=120
        )
        s.paused = True
        assert await call(p, "read", pages=again, timeout=120) == [2] * 4
    finally:
        await asyncio.to_thread(p.close)


# ---------------------------------------------------------------------------
# hotplug: UFFD_EVENT_UNMAP inside the sync window


async def test_a_region_unplugged_mid_window_is_detached_and_the_other_served(
    puppet_8m: PuppetVMM, file_store: PageStore
) -> None:
    """Two 4 MiB regions (DIMMs) of one memfd; the second is unplugged inside a window.

    The ``munmap`` comes after the window's scan and before its commit, with a
    batch of each region prepared.  The unplugged region's batch must not be
    punched, its evicted pages must go back into the memfd (which outlives
    the mapping), and cycles must go on with the first region, which keeps
    being evicted and served.  A daemon deaf to UNMAP punches the batch,
    leaves the pages in storage, and its window fails re-arming the range.
    """
    p = puppet_8m
    tracker = track_split(p, 2, vm_id="unplug")
    try:
        ctx, faults, ev = evictor_session(
            tracker, file_store, **EVICT_IDLE_FOR_ONE_CYCLE, prefetch_pages=16
        )
        t0, t1 = tracker.regions
        with serving_faults(tracker, faults, ev) as unhandled:
            await tracker.cycle()
            await evict(ev, range(0, 1024, 4), region=0)
            await evict(ev, range(0, 1024, 4), region=1)
            await tracker.cycle()
            b0 = await ev._prepare(0, np.arange(1, 1024, 4, dtype=np.int64))
            b1 = await ev._prepare(1, np.arange(1, 1024, 4, dtype=np.int64))
            assert b0 is not None and b1 is not None
            ev._prepared += [b0, b1]

            async def unplug_then_commit(tr: VmTracker, hot: list[npt.NDArray[np.bool_]]) -> None:
                assert tr.in_window
                # Returns once wsd has read the UNMAP (this loop serves the uffd).
                await call(p, "unmap", pages=[1024, 1024])
                await ev.commit(tr, hot)

            await tracker.cycle(unplug_then_commit)
            # The memfd outlives the mapping: every page of the unplugged
            # region must be back in it, with its data (given a moment).
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: t1.state.evicted_pages == 0, "the write-back", 60)
            assert memfd_versions(p.memfd, 1024, 1024) == [0] * 1024
            assert t1.vanished is not None and t0.vanished is None
            assert t0.state.evicted_mask(b0.pages).all()
            assert not t1.state.evicted_mask(b1.pages).any()
            assert ev.reasons[1] is not None and "unmapped" in ev.reasons[1]
            assert ev.reasons[0] is None
            # Cycles go on: the first region is scanned, evicted and served.
            before = ctx.stats.evicted_pages
            for _ in range(3):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ctx.stats.evicted_pages > before
            assert t1.state.evicted_pages == 0
            versions = await call(p, "read", pages=list(range(1024)), timeout=300)
            assert versions == [0] * 1024
            assert not unhandled
    finally:
        tracker.close()


async def test_a_drain_that_finds_a_region_unmapped_writes_it_into_the_memfd_and_drains_the_rest(
    puppet_8m: PuppetVMM, file_store: PageStore
) -> None:
    """rwp: the session ends after the VMM unplugged its second region, before
    that region's release wrote its pages into the memfd (a punch in flight
    holds it back).  The drain's COPY there says ENOENT: it writes that
    region's pages into the memfd and drains the first through the uffd,
    instead of taking the VMM for gone and discarding every stored page."""
    p = puppet_8m
    tracker = track_split(p, 2, vm_id="unplug-drain")
    try:
        ctx, faults, ev = evictor_session(tracker, file_store)
        t0, t1 = tracker.regions
        await tracker.cycle()
        await evict(ev, range(0, 1024, 4), region=0)
        await evict(ev, range(0, 1024, 4), region=1)
        ctx.in_flight.hold(1, np.array([1], dtype=np.int64))  # the release waits for it
        with serving_faults(tracker, faults, ev):
            await call(p, "unmap", pages=[1024, 1024])
            assert t1.vanished is not None and t1.state.evicted_pages == 256
            assert await drain(ctx, faults)
            assert t0.state.evicted_pages == 0 and t1.state.evicted_pages == 0
            ctx.in_flight.release()
            assert memfd_versions(p.memfd, 0, 2048) == [0] * 2048
    finally:
        tracker.close()


async def test_a_region_moved_whole_mid_window_is_tracked_and_served_at_its_new_address(
    puppet_8m: PuppetVMM, file_store: PageStore
) -> None:
    """The VMM moves (``mremap``) its whole guest memory inside a window.

    The move comes after the window's scan and before its commit, with a batch
    prepared and a quarter of the memory evicted.  The commit must still punch
    the batch (the memfd offsets did not change), the window must re-arm the
    new range, and later cycles must scan it: a write there is seen, evicted
    pages are fetched back through faults at the new address.  A daemon deaf
    to REMAP takes the UNMAP of the old range that follows it for an unplug,
    and stops tracking the memory.
    """
    p = puppet_8m
    tracker = track_puppet(p, vm_id="move")
    try:
        ctx, faults, ev = evictor_session(
            tracker, file_store, **EVICT_IDLE_FOR_ONE_CYCLE, prefetch_pages=16
        )
        t = tracker.regions[0]
        moved_to: list[int] = []
        with serving_faults(tracker, faults, ev) as unhandled:
            await tracker.cycle()
            await evict(ev, range(0, 2048, 4))
            await tracker.cycle()
            batch = await ev._prepare(0, np.arange(1, 2048, 4, dtype=np.int64))
            assert batch is not None
            ev._prepared.append(batch)

            async def move_then_commit(tr: VmTracker, hot: list[npt.NDArray[np.bool_]]) -> None:
                assert tr.in_window
                # Returns once wsd has read the REMAP (this loop serves the uffd).
                moved_to.append(await call(p, "move"))
                await ev.commit(tr, hot)

            await tracker.cycle(move_then_commit)
            (new,) = moved_to
            assert t.region.host_virt_addr == new and t.vanished is None
            assert ev.reasons[0] is None
            assert t.state.evicted_mask(batch.pages).all()
            assert uffd_vmflags(p.pid, new, p.size)
            # A write at the new address is seen by the next window's scan.
            await call(p, "write", pages=[2], version=1)
            await tracker.cycle(ev.commit)
            assert t.state.ages[2] == 0
            before = ctx.stats.evicted_pages
            for _ in range(3):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ctx.stats.evicted_pages > before
            versions = await call(p, "read", pages=list(range(p.npages)), timeout=300)
            assert versions == [1 if page == 2 else 0 for page in range(p.npages)]
            assert not unhandled
    finally:
        tracker.close()


@pytest.mark.parametrize("how", ["unmap", "move"])
async def test_a_region_partly_unmapped_or_moved_is_detached_and_its_pages_written_back(
    puppet_8m: PuppetVMM, file_store: PageStore, how: str
) -> None:
    """The VMM unmaps or moves pages 512-1023 of its one region, outside a window.

    The region is detached: every evicted page, in the part that went or not,
    goes back into the memfd, and what is left of the registration (the rest,
    and the moved part) is unregistered, so windows no longer cover it and the
    VMM reads every page it still maps with its data.  A daemon that treated
    them as whole unmaps, or ignored the move, would leave part of the range
    registered with nobody resolving its faults.
    """
    p = puppet_8m
    tracker = track_puppet(p, vm_id=f"part-{how}")
    try:
        _, faults, ev = evictor_session(tracker, file_store, **EVICT_IDLE_FOR_ONE_CYCLE)
        t = tracker.regions[0]
        with serving_faults(tracker, faults, ev) as unhandled:
            await tracker.cycle()
            await evict(ev, range(0, 2048, 4))
            new = await call(p, how, pages=[512, 512])
            await wait_until(lambda: t.vanished is not None, f"the {how} event")
            await wait_until(lambda: t.state.evicted_pages == 0, "the write-back", 120)
            ranges = [(p.base, p.size)] + ([(new, 512 * 4096)] if how == "move" else [])
            await wait_until(
                lambda: not any(uffd_vmflags(p.pid, *r) for r in ranges), "the unregistration"
            )
            assert memfd_versions(p.memfd, 0, p.npages) == [0] * p.npages
            await tracker.cycle(ev.commit)
            still_mapped = (
                list(range(p.npages)) if how == "move" else [*range(512), *range(1024, 2048)]
            )
            versions = await call(p, "read", pages=still_mapped, timeout=300)
            assert versions == [0] * len(still_mapped)
            assert ev.reasons[0] is not None and "partly" in ev.reasons[0]
            assert not unhandled
    finally:
        tracker.close()


# ---------------------------------------------------------------------------
# DMA pins


async def test_a_dma_pinned_guest_is_never_punched(daemon: Daemon) -> None:
    """``wsd guest --dma-pinned`` next to an unpinned twin: only the twin is evicted.

    Both run the same workload (a 10% hot set, the rest idle) under a daemon
    that evicts anything idle for an interval.  The pinned guest's memfd must
    stay whole and its status say why; a daemon that ignores the flag
    punches it like the twin's.
    """
    pinned = await start_guest(daemon, "pinned", "--dma-pinned")
    try:
        free = await start_guest(daemon, "free")
        try:
            sp, sf = daemon.sessions["pinned"], daemon.sessions["free"]
            assert sp.tracker.regions[0].region.dma_pinned
            await wait_until(lambda: sf.ctx.stats.evicted_pages >= 512, "eviction", 180)
            await cycles_pass(sp, 3)
            t = sp.tracker.regions[0]
            assert memfd_resident_bytes(t.memfd, t.region.size) == t.region.size
            assert sp.ctx.stats.evicted_pages == 0 and t.state.evicted_pages == 0
            why = vm_snapshot(sp, time.monotonic()).regions[0].not_evicted_because
            assert why is not None and "dma_pinned" in why
            assert vm_snapshot(sf, time.monotonic()).regions[0].not_evicted_because is None
        finally:
            await stop_guest(free)
    finally:
        await stop_guest(pinned)


async def test_vmpin_stops_eviction_of_the_whole_vm(
    puppet_8m: PuppetVMM, file_store: PageStore
) -> None:
    """A VMM with memory pinned (``VmPin``) gets nothing evicted until it unpins."""
    p = puppet_8m
    tracker = track_puppet(p, vm_id="vmpin")
    try:
        ctx, faults, ev = evictor_session(
            tracker, file_store, **EVICT_IDLE_FOR_ONE_CYCLE, max_pages_per_window=512
        )
        with serving_faults(tracker, faults, ev):
            await call(p, "pin", bytes=MIB, without_ipc_lock=True)
            status = Path(f"/proc/{p.pid}/status").read_text().splitlines()
            assert pinned_bytes(p.pid) == MIB, [line for line in status if line.startswith("Vm")]
            for _ in range(3):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert memfd_resident_bytes(p.memfd, p.size) == p.size
            assert not ev._prepared and ctx.stats.evicted_pages == 0
            assert tracker.pinned_bytes == MIB
            assert ev.reasons[0] is not None and "VmPin" in ev.reasons[0]
            # Unpinned: eviction starts at the next check.
            await call(p, "unpin")
            tracker.guards_checked_at = None  # check now rather than in 10 cycles
            for _ in range(2):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ev.reasons[0] is None and ctx.stats.evicted_pages > 0
    finally:
        tracker.close()


async def test_io_uring_buffers_over_guest_memory_stop_its_eviction(
    puppet_8m: PuppetVMM, file_store: PageStore
) -> None:
    """A root VMM (``CAP_IPC_LOCK``) registers guest memory as io_uring buffers.

    On 7.3 ``VmPin`` stays 0 for it, so only the rings' ``fdinfo`` tells wsd:
    buffers in private memory do not stop eviction, buffers over guest memory
    stop it for their region, and the evicted pages they cover come back
    (the registration faults them in) intact.
    """
    p = puppet_8m
    tracker = track_puppet(p, vm_id="uring")
    try:
        ctx, faults, ev = evictor_session(
            tracker, file_store, **EVICT_IDLE_FOR_ONE_CYCLE, max_pages_per_window=512
        )
        t = tracker.regions[0]
        with serving_faults(tracker, faults, ev):
            await call(p, "pin", bytes=MIB)
            assert pinned_bytes(p.pid) == 0, "root's io_uring buffers show in VmPin here"
            for _ in range(2):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ev.reasons[0] is None and ctx.stats.evicted_pages > 0
            assert memfd_resident_bytes(p.memfd, p.size) < p.size

            await call(p, "pin", guest_pages=[0, 256])
            assert pinned_bytes(p.pid) == 0
            tracker.guards_checked_at = None  # check now rather than in 10 cycles
            await tracker.cycle(ev.commit)  # commits what was prepared before the pin
            await ev.prepare()
            evicted = ctx.stats.evicted_pages
            for _ in range(3):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ctx.stats.evicted_pages == evicted and not ev._prepared
            assert set(data_ranges(p.memfd, 0, 256 * p.page_size)) == {(0, 256 * p.page_size)}
            assert t.uring_bytes == 256 * p.page_size
            assert ev.reasons[0] is not None and "io_uring" in ev.reasons[0]

            await call(p, "unpin")
            tracker.guards_checked_at = None
            for _ in range(2):
                await tracker.cycle(ev.commit)
                await ev.prepare()
            assert ev.reasons[0] is None and ctx.stats.evicted_pages > evicted
            # Last, as reading every page makes it hot again: all intact.
            await call(p, "read", pages=list(range(p.npages)))
    finally:
        tracker.close()


# ---------------------------------------------------------------------------
# another process maps the guest memfd


async def test_a_second_mapper_of_the_guest_memfd_reads_its_data(daemon: Daemon) -> None:
    """A vhost-user-like process maps ``wsd guest``'s memfd after wsd evicted most of it.

    Within ``CHECK_EVERY_CYCLES`` cycles wsd must see it, write every evicted
    page back into the memfd, stop evicting and say why; the mapper then
    reads every page intact.  A daemon that does not look for other mappers
    leaves holes, which the mapper reads as zeros.  The guest only reads
    (``--write-ratio 0``), so every page must hold version 0.
    """
    guest = await start_guest(daemon, "shared", "--write-ratio", "0")
    try:
        assert guest.ready is not None
        s = daemon.sessions["shared"]
        t = s.tracker.regions[0]
        await wait_until(lambda: t.state.evicted_pages >= 512, "eviction", 180)
        path = f"/proc/{guest.ready.pid}/fd/{guest.ready.memfd}"
        with MemfdMapper(path, guest.ready.size) as mapper:
            await cycles_pass(s, CHECK_EVERY_CYCLES + 1)
            versions = await asyncio.to_thread(mapper.read, 0, guest.ready.pages)
            assert versions == [0] * guest.ready.pages, [
                (i, v) for i, v in enumerate(versions) if v != 0
            ][:10]
            assert t.state.evicted_pages == 0
            why = vm_snapshot(s, time.monotonic()).regions[0].not_evicted_because
            assert why is not None and str(mapper.pid) in why
            evicted = s.ctx.stats.evicted_pages
            await cycles_pass(s, 3)
            assert s.ctx.stats.evicted_pages == evicted, "evicted while another process maps it"
            assert memfd_resident_bytes(t.memfd, t.region.size) == t.region.size
        # It is gone: eviction resumes at the next check.
        await cycles_pass(s, CHECK_EVERY_CYCLES + 1)
        assert s.evictor.reasons[0] is None
    finally:
        await stop_guest(guest)
