"""Guest memory life events, DMA pins and other mappers on the host kernel (wp-async).

A puppet VMM discards evicted pages the way a balloon does (``MADV_REMOVE``;
QEMU's ``fallocate`` punch then ``MADV_DONTNEED``), pins memory (io_uring
registered buffers raise ``VmPin``), unmaps or moves (``mremap``) all or part
of its guest memory, or shares its memfd with a second process.  Each test
fails on a daemon that ignores the case: it would serve the old evicted bytes,
punch pinned or shared memory, leave an unmapped region's pages in storage, or
lose track of memory that moved.  docs/life-events.md maps each
guarantee to its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import pytest_asyncio

from wsd.evictor import pagemap
from wsd.evictor.drain import drain
from wsd.evictor.evictor import unevictable_reason
from wsd.evictor.guards import check
from wsd.evictor.transaction import copy_page, not_punched, place
from wsd.kernel import (
    Feature,
    KernelError,
    Userfaultfd,
    data_ranges,
    map_shared,
    memfd_create,
    pread,
    punch_hole,
    unreserved_huge_page_count,
)
from wsd.storage import FileStoreConfig, PageStore
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_puppet
from wsd.testing.flaky import FlakyStore
from wsd.testing.hammer import free_huge_pages
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
from wsd.tracker.session import VmTracker
from wsd.vmm.protocol import Region

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
SIZE = 4 << 20  # 1024 pages


@pytest.fixture
def puppet() -> Iterator[PuppetVMM]:
    with PuppetVMM.spawn(SIZE) as p:
        yield p


@pytest_asyncio.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[PageStore]:
    store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
    yield store
    await store.close()


@pytest_asyncio.fixture
async def tracker(puppet: PuppetVMM) -> AsyncIterator[VmTracker]:
    t = track_puppet(puppet, vm_id="life")
    yield t
    t.close()


async def test_the_life_events_are_negotiated(tracker: VmTracker) -> None:
    enabled = tracker.uffd.features or Feature(0)
    assert Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP in enabled


@pytest.mark.parametrize("how", ["remove", "punch+dontneed"])
async def test_a_removed_evicted_page_reads_zeros_while_others_are_served(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, tmp_path: Path, how: str
) -> None:
    ctx, faults, ev = evictor_session(tracker, file_store, tmp_path / "state")
    state = tracker.regions[0].state
    await tracker.cycle()
    await evict(ev, range(0, 64))
    with serving_faults(tracker, faults, ev):
        # The madvise blocks until wsd reads the REMOVE: served by the loop.
        await call(puppet, "discard", pages=list(range(10, 20)), how=how)
        assert tracker.removed_evicted_pages == 10
        assert not state.evicted_mask(np.arange(10, 20)).any()
        versions = await call(puppet, "read", pages=list(range(64)))
    # A naive daemon serves the old bytes (version 0) for 10..19.
    assert versions == [0] * 10 + [DISCARDED] * 10 + [0] * 44
    assert ctx.stats.fetched_pages == 54 and ctx.stats.zero_fills == 10
    assert set(range(10, 20)) <= ctx.discards[0]
    # The map on disk marks them removed: a restarted wsd would not fetch them.
    saved = pagemap.load_vm(tmp_path / "state", "life")
    assert saved is not None and not ev.map_dirty
    assert set(range(10, 20)) <= set(saved.removed["page"].tolist())


async def test_a_fetch_in_flight_for_a_removed_page_installs_zeros(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    flaky = FlakyStore(file_store)
    _, faults, ev = evictor_session(
        tracker, flaky, fetch_retry_initial_seconds=0.02, fetch_retry_max_seconds=0.05
    )
    await tracker.cycle()
    await evict(ev, [5, 6])
    with serving_faults(tracker, faults, ev):
        rid = puppet.send("read", pages=[5])
        await wait_until(lambda: (0, 5) in faults.fetching, "the fetch of page 5")
        await asyncio.sleep(0.1)
        assert not puppet.done(rid), "the tier is down: the reader waits"
        await call(puppet, "discard", pages=[5], how="remove")
        # The fetch sees the generation moved and installs a zero page.
        assert await asyncio.to_thread(puppet.wait, rid) == [DISCARDED]
        flaky.failures = 0
        assert await call(puppet, "read", pages=[6]) == [0]


async def test_a_prepared_page_removed_before_its_commit_is_not_punched(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults, ev = evictor_session(tracker, file_store)
    state = tracker.regions[0].state
    await tracker.cycle()
    batch = await ev._prepare(0, np.arange(100, 110, dtype=np.int64))
    assert batch is not None
    with serving_faults(tracker, faults, ev):
        await call(puppet, "discard", pages=[102, 103], how="remove")
        # A commit already under way holds the batch: the generation check
        # drops the removed pages in the same step as the punch.
        assert await ev._commit_in_chunks(batch, None) == 8
        assert not state.evicted_mask(np.array([102, 103])).any()
        assert {102, 103} <= ctx.discards[0]
        versions = await call(puppet, "read", pages=list(range(100, 110)))
    assert versions == [0, 0, DISCARDED, DISCARDED] + [0] * 6


async def test_another_mapper_of_the_memfd_stops_eviction_and_gets_pages_back(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults, ev = evictor_session(tracker, file_store, min_idle_cycles=1)
    await tracker.cycle()
    await evict(ev, range(0, 32))
    # A vhost-user backend stand-in: maps the guest memfd, and waits.
    with MemfdMapper(puppet.memfd, SIZE) as mapper:
        with serving_faults(tracker, faults, ev):
            await check(ev, unevictable_reason, force=True)
        reason = ev.reasons[0]
        assert reason is not None and str(mapper.pid) in reason
        assert tracker.regions[0].other_mappers == (mapper.pid,)
        # The pages evicted before it came are back in the memfd: it reads them.
        assert tracker.regions[0].state.evicted_pages == 0
        for p in (0, 17, 31):
            assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096)
        assert await asyncio.to_thread(mapper.read, 0, 64) == [0] * 64
        # And nothing is evicted while it maps the memfd.
        for _ in range(3):
            await tracker.cycle()
        await ev.prepare()
        assert not ev._prepared and ctx.stats.evicted_pages == 32
    await check(ev, unevictable_reason, force=True)
    assert ev.reasons[0] is None and tracker.regions[0].other_mappers == ()


async def test_a_second_mapping_in_the_vmm_stops_eviction_and_gets_pages_back(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """The VMM's own second mapping of guest memory is registered with no uffd: a
    punched page read there would be a fresh zero page."""
    ctx, faults, ev = evictor_session(tracker, file_store, min_idle_cycles=1)
    await tracker.cycle()
    await evict(ev, range(0, 32))
    at = await call(puppet, "map_again")
    with serving_faults(tracker, faults, ev):
        await check(ev, unevictable_reason, force=True)
    reason = ev.reasons[0]
    assert reason is not None and f"a second time, at {at:#x}" in reason
    assert tracker.regions[0].aliased_at == at
    # The pages evicted before it are back in the memfd, where the alias reads.
    assert tracker.regions[0].state.evicted_pages == 0
    for p in (0, 17, 31):
        assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096)
    for _ in range(3):
        await tracker.cycle()
    await ev.prepare()
    assert not ev._prepared and ctx.stats.evicted_pages == 32
    await call(puppet, "unmap_again", address=at)
    await check(ev, unevictable_reason, force=True)
    assert ev.reasons[0] is None and tracker.regions[0].aliased_at is None


async def test_vmpin_stops_eviction_of_the_whole_vm(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    _, _, ev = evictor_session(tracker, file_store, min_idle_cycles=1)
    await call(puppet, "pin", bytes=1 << 20)
    for _ in range(3):
        await tracker.cycle()
    await ev.prepare()
    assert not ev._prepared
    assert tracker.pinned_bytes == 1 << 20
    assert ev.reasons[0] is not None and "VmPin" in ev.reasons[0]
    await call(puppet, "unpin")
    await check(ev, unevictable_reason, force=True)
    assert ev.reasons[0] is None


async def test_a_pin_made_after_the_prepare_keeps_its_pages_from_the_punch(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, tmp_path: Path
) -> None:
    """wp-async punches an interval after the prepare read the pins, with no
    window in which a pin's GUP shows as an access.  The commit reads the pins
    again: a daemon that trusted the prepare's reading would punch pages a
    device may now be writing."""
    state_dir = tmp_path / "state"
    ctx, _, ev = evictor_session(tracker, file_store, state_dir, **EVICT_IDLE_FOR_ONE_CYCLE)
    for _ in range(3):
        await tracker.cycle()
    await ev.prepare()
    prepared = {p for batch in ev._prepared for p in batch.pages.tolist()}
    assert len(prepared) == SIZE // 4096
    await call(puppet, "pin", bytes=1 << 20)
    await tracker.cycle(ev.commit)
    assert ctx.stats.evicted_pages == 0
    assert data_ranges(puppet.memfd, 0, SIZE) == [(0, SIZE)]
    assert ev.reasons[0] is not None and "VmPin" in ev.reasons[0]
    # Their stored copies go, and the map on disk no longer lists them.
    assert prepared <= ctx.discards[0]
    saved = pagemap.load_vm(state_dir, "life")
    assert saved is not None
    assert not len(saved.regions[0].pages)
    # Unpinned, the next prepare and commit evict again.
    await call(puppet, "unpin")
    await ev.prepare()
    await tracker.cycle(ev.commit)
    assert ctx.stats.evicted_pages == SIZE // 4096


async def test_io_uring_buffers_over_guest_memory_are_placed_from_the_rings_fdinfo(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """Buffers in the VMM's private memory cover no region; buffers over guest
    memory cover exactly their bytes of it, until unregistered.  (On this
    kernel root's buffers also show in ``VmPin``, which spares the whole VM
    first; the 7.3 test shows the buffers doing it alone.)"""
    _, faults, ev = evictor_session(tracker, file_store, min_idle_cycles=1)
    t = tracker.regions[0]
    with serving_faults(tracker, faults, ev):
        await call(puppet, "pin", bytes=1 << 20)
        await check(ev, unevictable_reason, force=True)
        assert t.uring_bytes == 0 and tracker.uring_unlisted is None
        await call(puppet, "pin", guest_pages=[256, 128])
        await check(ev, unevictable_reason, force=True)
    assert t.uring_bytes == 128 * 4096 and tracker.uring_unlisted is None
    assert ev.reasons[0] is not None
    await call(puppet, "unpin")
    await check(ev, unevictable_reason, force=True)
    assert t.uring_bytes == 0 and ev.reasons[0] is None


async def test_an_unmapped_region_is_detached_and_its_pages_written_back(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    _, faults, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, range(0, 1024, 4))
    with serving_faults(tracker, faults, ev):
        await call(puppet, "unmap")
        await wait_until(lambda: t.vanished is not None, "the UNMAP event")
        await wait_until(lambda: t.state.evicted_pages == 0, "the write-back")
        # Cycles skip the vanished region instead of failing on it.
        await tracker.cycle()
    assert ev.reasons[0] is not None and "unmapped" in ev.reasons[0]
    for p in (0, 4, 512, 1020):
        assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096)


async def test_a_drain_that_finds_a_region_unmapped_writes_it_into_the_memfd_and_drains_the_rest(
    puppet: PuppetVMM, file_store: PageStore
) -> None:
    """The VMM unplugs the first of two regions (DIMMs of one memfd) as the
    session ends, before the region's release has written its pages into the
    memfd (here a verified punch in flight holds it back): the drain's COPY
    there says ENOENT.  The drain writes that region's pages into the memfd,
    which outlives the mapping, and drains the other region through the uffd.
    Before, ENOENT was taken for the VMM's whole address space gone: the
    drain stopped there and every stored page was discarded, the second
    region's evicted pages included, to read as zeros once the uffd went."""
    tracker = track_split(puppet, 2, vm_id="unplug-drain")
    try:
        ctx, faults, ev = evictor_session(tracker, file_store)
        t0, t1 = tracker.regions
        half = t0.npages
        await tracker.cycle()
        await evict(ev, range(0, half, 4), region=0)
        await evict(ev, range(0, half, 4), region=1)
        ctx.in_flight.hold(0, np.array([1], dtype=np.int64))  # the release waits for it
        with serving_faults(tracker, faults, ev):
            await call(puppet, "unmap", pages=[0, half])
            assert t0.vanished is not None and t0.state.evicted_pages == half // 4
            assert await drain(ctx, faults)
            assert t0.state.evicted_pages == 0 and t1.state.evicted_pages == 0
            ctx.in_flight.release()
        for p in range(2 * half):
            assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096), p
    finally:
        tracker.close()


HUGE = 2 << 20


@pytest.fixture
def huge_puppet() -> Iterator[tuple[PuppetVMM, VmTracker]]:
    """A tracked puppet of 4 hugetlbfs pages."""
    with free_huge_pages(4) as free:
        if free < 4:
            pytest.skip(f"needs 4 free 2 MiB huge pages, {free} free (vm.nr_hugepages; not root?)")
        with PuppetVMM.spawn(4 * HUGE, page_size=HUGE) as puppet:
            tracker = track_puppet(puppet, vm_id="life-huge")
            try:
                yield puppet, tracker
            finally:
                tracker.close()


@pytest.mark.parametrize("pool", ["free pages", "empty"])
async def test_an_unmapped_hugetlbfs_region_gets_its_pages_written_back(
    huge_puppet: tuple[PuppetVMM, VmTracker], file_store: PageStore, pool: str
) -> None:
    """hugetlbfs has no SEEK_HOLE: a punched page must still count as a hole,
    or the write-back takes every evicted page for one refilled and drops it.

    Writing a page into a hole needs a page from the pool.  With none, the
    write-back waits for one: the hole would read as zeros wherever the
    memfd is mapped next.  Before, the release died on the ENOMEM and the
    pages stayed holes."""
    puppet, tracker = huge_puppet
    _, faults, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    assert t.resident().tolist() == [True] * 4
    await evict(ev, [1, 2])
    assert t.resident().tolist() == [True, False, False, True]
    with serving_faults(tracker, faults, ev):
        with drained_huge_pool() if pool == "empty" else contextlib.nullcontext():
            await call(puppet, "unmap")
            if pool == "empty":
                await asyncio.sleep(0.5)
                assert t.state.evicted_pages == 2
        await wait_until(lambda: t.state.evicted_pages == 0, "the write-back")
    for p in range(4):
        assert bytes(pread(puppet.memfd, HUGE, p * HUGE)) == page_pattern(p, 0, HUGE)


async def test_a_detached_hugetlbfs_page_without_a_free_page_is_kept_not_dropped(
    huge_puppet: tuple[PuppetVMM, VmTracker], file_store: PageStore
) -> None:
    """A verified punch that finds its region detached writes its pages into
    the memfd (``place(detached=True)``), as does a put-back whose mapping is
    gone (ENOENT).  With no page in the pool the write says ENOMEM, and the
    page is left for a retry with its bytes, not dropped with an error."""
    puppet, tracker = huge_puppet
    _, _, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, [1])
    data = b"\x5a" * HUGE
    with drained_huge_pool():
        left, errors = place(tracker.uffd, t, {1: data}, detached=True)
        assert (list(left), errors) == ([1], [])
        left, errors = place(cast(Userfaultfd, _Unmapped()), t, {1: data})
        assert (list(left), errors) == ([1], [])
    left, errors = place(tracker.uffd, t, {1: data}, detached=True)
    assert (left, errors) == ({}, [])
    assert bytes(pread(puppet.memfd, HUGE, HUGE)) == data


class _Unmapped:
    """A uffd whose VMM unmapped every region: UFFDIO_COPY says ENOENT."""

    def copy(self, dst: int, data: object, *, wake: bool = True, wp: bool = False) -> int:
        raise KernelError(errno.ENOENT, "UFFDIO_COPY", detail="injected")


@contextlib.contextmanager
def drained_huge_pool(leave: int = 0) -> Iterator[None]:
    """Every 2 MiB page a new allocation could take but ``leave``, taken by a memfd of ours."""
    count = max((unreserved_huge_page_count(HUGE) or 0) - leave, 0)
    fd = memfd_create("drain", size=max(count, 1) * HUGE, hugetlb_page_size=HUGE)
    try:
        if count:
            with map_shared(fd, count * HUGE) as m:
                for p in range(count):
                    m[p * HUGE] = 1
        assert unreserved_huge_page_count(HUGE) == leave
        yield
    finally:
        os.close(fd)


async def test_a_hugetlbfs_copy_without_a_free_page_is_no_memory_not_a_page_there(
    huge_puppet: tuple[PuppetVMM, VmTracker], file_store: PageStore
) -> None:
    """hugetlbfs answers UFFDIO_COPY into a hole with EEXIST, not ENOMEM, when
    its pool has no page to give.  Taken at its word, a raced page's final
    bytes were dropped and its hole read as zeros (the hugetlbfs hammer with
    a pool of exactly the guest's pages, 2026-11-28)."""
    puppet, tracker = huge_puppet
    _, _, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, [1])
    data = page_pattern(1, 0, HUGE)
    with drained_huge_pool():
        with pytest.raises(FileExistsError):  # the kernel's own answer (Linux 6.18)
            tracker.uffd.copy(t.region.host_virt_addr + HUGE, data)
        with pytest.raises(KernelError) as no_memory:
            copy_page(tracker.uffd, t, 1, data)
        assert no_memory.value.errno == errno.ENOMEM
        with pytest.raises(FileExistsError):  # page 0 is there: the VMM maps it
            copy_page(tracker.uffd, t, 0, data)
    copy_page(tracker.uffd, t, 1, data)
    assert bytes(pread(puppet.memfd, HUGE, HUGE)) == data


async def test_a_hugetlbfs_zero_fill_needs_one_free_page_not_two(
    huge_puppet: tuple[PuppetVMM, VmTracker], file_store: PageStore
) -> None:
    """UFFDIO_COPY from memory it must fault in first copies through a bounce
    page, on hugetlbfs a second page from the pool.  A zero fill from a fresh
    ``bytes(2 MiB)`` said ENOMEM with one free page, and the first touch of
    the hole waited for another."""
    puppet, tracker = huge_puppet
    ctx, faults, ev = evictor_session(tracker, file_store)
    await tracker.cycle()
    with serving_faults(tracker, faults, ev) as unhandled:
        await call(puppet, "discard", pages=[2], how="remove")  # a balloon gives it back
        with drained_huge_pool(leave=1):
            assert await call(puppet, "read", pages=[2]) == [DISCARDED]
    assert not unhandled and ctx.stats.zero_fills == 1


async def test_which_hugetlbfs_pages_a_punch_left_is_read_not_seeked() -> None:
    """After a failed punch the evictor asks which pages still hold data; on
    hugetlbfs, SEEK_DATA would answer all of them."""
    ps = HUGE
    with free_huge_pages(4) as free:
        if free < 4:
            pytest.skip(f"needs 4 free 2 MiB huge pages, {free} free (vm.nr_hugepages; not root?)")
        fd = memfd_create("punched", size=4 * ps, hugetlb_page_size=ps)
        try:
            with map_shared(fd, 4 * ps) as m:
                for p in range(4):
                    m[p * ps] = 1
            punch_hole(fd, ps, 2 * ps)
            region = Region(
                guest_phys_addr=0, host_virt_addr=ps, size=4 * ps, page_size=ps, fd_index=0
            )
            assert not_punched(fd, region, np.arange(4, dtype=np.int64)) == [0, 3]
        finally:
            os.close(fd)


async def test_a_partly_unmapped_region_is_detached_and_the_rest_is_the_kernels_again(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """A DIMM-sized hole in the middle of the region (pages 512-767 unmapped).

    The region is detached: its evicted pages, unmapped or not, go back into the
    memfd, and what is left of the registration goes, so the VMM's reads of the
    rest are the kernel's again.  A daemon that treated the hole as a whole
    unmap would leave the rest registered with nobody serving it."""
    _, faults, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, range(0, 1024, 4))
    with serving_faults(tracker, faults, ev) as unhandled:
        await call(puppet, "unmap", pages=[512, 256])
        await wait_until(lambda: t.vanished is not None, "the UNMAP event")
        await wait_until(lambda: t.state.evicted_pages == 0, "the write-back")
        await wait_until(
            lambda: not uffd_vmflags(puppet.pid, puppet.base, SIZE), "the unregistration"
        )
        await tracker.cycle()
        rest = [*range(512), *range(768, 1024)]
        assert await call(puppet, "read", pages=rest) == [0] * len(rest)
        assert not unhandled
    assert ev.reasons[0] is not None and "partly unmapped" in ev.reasons[0]
    for p in range(1024):
        assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096), p


async def test_a_region_moved_whole_is_tracked_evicted_and_served_at_its_new_address(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """``mremap`` of the whole region, with a quarter of it evicted.

    The registration moves along (``EVENT_REMAP``); wsd must follow it: evicted
    pages fetched back through faults at the new address, cycles scanning it,
    writes there seen, and eviction going on.  A daemon deaf to REMAP takes the
    UNMAP of the old range that follows it for an unplug, and stops tracking
    the memory."""
    _, faults, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, range(0, 1024, 4))
    with serving_faults(tracker, faults, ev) as unhandled:
        new = await call(puppet, "move")
        assert new != puppet.base
        await wait_until(lambda: t.region.host_virt_addr == new, "the REMAP event")
        assert t.vanished is None and ev.reasons[0] is None
        assert uffd_vmflags(puppet.pid, new, SIZE)
        assert await call(puppet, "read", pages=list(range(0, 1024, 4))) == [0] * 256
        assert t.state.evicted_pages == 0
        # A write at the new address is seen by the next cycle's scan.
        await tracker.cycle()
        await call(puppet, "write", pages=[9], version=1)
        await tracker.cycle()
        assert t.state.ages[9] == 0 and t.state.ages[10] > 0
        await evict(ev, range(1, 1024, 4))
        assert t.state.evicted_pages == 256
        versions = await call(puppet, "read", pages=list(range(1024)))
        assert not unhandled
    assert versions == [1 if p == 9 else 0 for p in range(1024)]


async def test_a_partly_moved_region_is_detached_and_both_parts_served_by_the_kernel(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """``mremap`` of pages 256-511 only, with a quarter of the region evicted.

    The moved part's registration went along to addresses no region
    describes, so the region is detached: every evicted page goes back into
    the memfd, and both parts are unregistered.  The VMM then reads every page,
    moved or not, with its data."""
    _, faults, ev = evictor_session(tracker, file_store)
    t = tracker.regions[0]
    await tracker.cycle()
    await evict(ev, range(0, 1024, 4))
    with serving_faults(tracker, faults, ev) as unhandled:
        new = await call(puppet, "move", pages=[256, 256])
        await wait_until(lambda: t.vanished is not None, "the REMAP event")
        await wait_until(lambda: t.state.evicted_pages == 0, "the write-back")
        await wait_until(
            lambda: (
                not uffd_vmflags(puppet.pid, puppet.base, SIZE)
                and not uffd_vmflags(puppet.pid, new, 256 * 4096)
            ),
            "the unregistration",
        )
        await tracker.cycle()
        assert await call(puppet, "read", pages=list(range(1024))) == [0] * 1024
        assert not unhandled
    assert ev.reasons[0] is not None and "partly moved" in ev.reasons[0]
    for p in range(1024):
        assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096), p


async def test_the_daemon_serves_zeros_after_a_balloon_removes_evicted_pages(
    tmp_path: Path,
) -> None:
    settings = evicting_settings(tmp_path, 0.1)
    async with running_daemon(settings) as d:
        p = await asyncio.to_thread(PuppetVMM.spawn, SIZE, handoff=settings.socket, vm_id="bal")
        try:
            assert p.handoff_reply is not None and p.handoff_reply["type"] == "accepted"
            s = d.sessions["bal"]
            state = s.tracker.regions[0].state
            await wait_until(lambda: state.evicted_pages >= 512, "eviction", timeout=30)
            s.paused = True  # hold the evicted set still
            evicted = np.flatnonzero(state.evicted)[:50].tolist()
            await call(p, "discard", pages=evicted, how="remove")
            assert s.tracker.removed_evicted_pages == 50
            versions = await call(p, "read", pages=list(range(p.npages)))
            assert [p for p, v in enumerate(versions) if v == DISCARDED] == evicted
            assert all(v == 0 for v in versions if v != DISCARDED)
        finally:
            await asyncio.to_thread(p.close)
