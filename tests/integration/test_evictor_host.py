"""Eviction and fetch-back on the host kernel (MISSING faults, real memfd, real stores).

The host has no RWP, so there is no sync window: these tests drive the eviction
transaction on a quiescent puppet (nothing touches the pages while they go
out), then let the puppet read them back through MISSING faults served by
:class:`FaultService`.  The racing cases run in the 7.3 VM (tests/kernel).
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from wsd.evictor import EvictorConfig, OnDeadline, pagemap
from wsd.evictor import evictor as evictor_module
from wsd.evictor.context import VmContext
from wsd.evictor.drain import drain
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import KernelError, Userfaultfd, data_ranges
from wsd.resume import check_stored
from wsd.storage import FileStoreConfig, PageNamespace, PageStore, TierUnavailable, ZstdStoreConfig
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_puppet
from wsd.testing.flaky import FlakyStore
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import serving_faults
from wsd.tracker.session import VmTracker

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
SIZE = 8 << 20


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
    t = track_puppet(puppet, vm_id="host-evict")
    yield t
    t.close()


def vm(tracker: VmTracker, store: PageStore | Any, **config: Any) -> tuple[VmContext, FaultService]:
    cfg = EvictorConfig(**config)
    ctx = VmContext(tracker.vm_id, tracker, store, cfg)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    return ctx, FaultService(ctx, spawn)


def resident_bytes(p: PuppetVMM) -> int:
    return sum(end - start for start, end in data_ranges(p.memfd, 0, p.size))


async def evict(ctx: VmContext, pages: np.ndarray, state_dir: Path | None = None) -> int:
    ev = Evictor(ctx, state_dir=state_dir)
    done = await ev.evict_batch(0, ctx.tracker.regions[0], np.sort(pages).astype(np.int64))
    assert done == len(pages)
    return done


async def evict_unhurried(ctx: VmContext, pages: np.ndarray) -> int:
    """:func:`evict` under the default deadlines: a test's short tier deadline is for its
    fetches, and on a loaded disk the put's fsync outlasted 0.1 s."""
    config, ctx.config = ctx.config, EvictorConfig()
    try:
        return await evict(ctx, pages)
    finally:
        ctx.config = config


async def read(p: PuppetVMM, pages: Sequence[int] | np.ndarray) -> list[int]:
    result: list[int] = await asyncio.to_thread(p.call, "read", pages=[int(x) for x in pages])
    return result


async def test_evicted_pages_come_back_intact_from_the_file_tier(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, tmp_path: Path
) -> None:
    ctx, faults = vm(tracker, file_store)
    state = tracker.regions[0].state
    await tracker.cycle()
    cold = np.arange(0, puppet.npages, 2)  # every other page: many runs
    before = resident_bytes(puppet)
    await evict(ctx, cold, state_dir=tmp_path / "state")
    assert resident_bytes(puppet) == before - len(cold) * 4096
    assert state.evicted_pages == len(cold) and ctx.stats.evicted_pages == len(cold)
    saved = pagemap.load_vm(tmp_path / "state", "host-evict")
    assert saved is not None
    assert np.array_equal(saved.regions[0].pages, cold)
    assert (saved.regions[0].generations == 1).all()
    with serving_faults(tracker, faults) as unhandled:
        assert await read(puppet, range(puppet.npages)) == [0] * puppet.npages
    assert not unhandled
    assert ctx.stats.fetched_pages == len(cold) and state.evicted_pages == 0
    assert resident_bytes(puppet) == before


async def test_the_page_map_journals_each_batch_and_compacts_now_and_then(
    puppet: PuppetVMM,
    tracker: VmTracker,
    file_store: PageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first batch writes a snapshot; later ones only append to the journal
    (O(batch)); once the journal holds as many records as the threshold, the
    next write is a snapshot again and the journals it holds go."""
    ctx, faults = vm(tracker, file_store)
    state_dir = tmp_path / "state"
    await tracker.cycle()
    ev = Evictor(ctx, state_dir=state_dir)
    t = tracker.regions[0]
    monkeypatch.setattr(evictor_module, "COMPACT_MIN_RECORDS", 3 * 256)
    batches = [np.arange(k * 256, (k + 1) * 256, dtype=np.int64) for k in range(5)]

    def on_disk() -> tuple[list[int], list[int], list[int]]:
        snapshot = pagemap.load(pagemap.path_for(state_dir, "host-evict")).regions[0].pages
        vm = pagemap.load_vm(state_dir, "host-evict")
        assert vm is not None
        return (
            snapshot.tolist(),
            vm.regions[0].pages.tolist(),
            pagemap.journals(state_dir, "host-evict"),
        )

    assert await ev.evict_batch(0, t, batches[0]) == 256
    snapshot, listed, journals = on_disk()
    assert snapshot == listed == batches[0].tolist() and journals == []
    for k in (1, 2, 3):
        assert await ev.evict_batch(0, t, batches[k]) == 256
    snapshot, listed, journals = on_disk()
    assert snapshot == batches[0].tolist()
    assert listed == np.concatenate(batches[:4]).tolist() and len(journals) == 1
    # Fetched back: still listed until a snapshot, which drops them.
    with serving_faults(tracker, faults) as unhandled:
        assert await read(puppet, batches[0]) == [0] * 256
    assert not unhandled
    assert await ev.evict_batch(0, t, batches[4]) == 256  # 768 records: a snapshot
    snapshot, listed, journals = on_disk()
    assert snapshot == listed == np.concatenate(batches[1:]).tolist()
    assert journals == []
    assert await ev.evict_batch(0, t, batches[0]) == 256  # generation 2 now
    now = pagemap.load_vm(state_dir, "host-evict")
    assert now is not None and now.regions[0].generations[:256].tolist() == [2] * 256


async def test_a_snapshot_written_during_a_commit_lists_the_pages_it_has_yet_to_punch(
    puppet: PuppetVMM,
    tracker: VmTracker,
    file_store: PageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit punches in chunks and serves the loop in between, where a
    snapshot may be written (a REMOVE's, a detach's).  It must list the
    batch's pages still to be punched: the journal that listed them goes with it."""
    ctx, _ = vm(tracker, file_store)
    state_dir = tmp_path / "state"
    await tracker.cycle()
    ev = Evictor(ctx, state_dir=state_dir)
    t = tracker.regions[0]
    assert await ev.evict_batch(0, t, np.arange(0, 8, dtype=np.int64)) == 8  # the first snapshot
    snapshots: list[asyncio.Task[None]] = []
    settle = ev._settle_listing

    def settle_then_snapshot(batch: Any) -> None:
        settle(batch)
        if not snapshots:
            ev.map_dirty = True
            snapshots.append(asyncio.ensure_future(ev.save_map()))

    monkeypatch.setattr(ev, "_settle_listing", settle_then_snapshot)
    pages = np.arange(8, 8 + 4 * 128, dtype=np.int64)
    assert await ev.evict_batch(0, t, pages) == len(pages)
    await snapshots[0]
    assert pagemap.journals(state_dir, "host-evict") == []  # the snapshot dropped them
    saved = pagemap.load_vm(state_dir, "host-evict")
    assert saved is not None
    assert saved.regions[0].pages.tolist() == list(range(8 + len(pages)))


async def test_a_rewritten_page_comes_back_at_its_latest_version(
    puppet: PuppetVMM, tracker: VmTracker, tmp_path: Path
) -> None:
    store = await open_backend(ZstdStoreConfig(budget_bytes=64 << 20))
    try:
        ctx, faults = vm(tracker, store, allow_volatile_store=True)
        state = tracker.regions[0].state
        await tracker.cycle()
        pages = np.arange(10, 20)
        with serving_faults(tracker, faults) as unhandled:
            for version in (1, 2, 3):
                await evict(ctx, pages)
                await asyncio.to_thread(puppet.call, "write", pages=pages.tolist(), version=version)
                assert await read(puppet, pages) == [version] * len(pages)
            await evict(ctx, pages)
            assert await read(puppet, pages) == [3] * len(pages)
        assert not unhandled
        assert (state.generations[pages] == 4).all()
        assert ctx.stats.fetched_pages == 4 * len(pages)
    finally:
        await store.close()


async def test_the_zstd_tier_alone_needs_consent(tracker: VmTracker) -> None:
    store = await open_backend(ZstdStoreConfig(budget_bytes=1 << 20))
    try:
        ctx, _ = vm(tracker, store)
        with pytest.raises(ValueError, match=r"not durable.*allow_volatile_store"):
            Evictor(ctx)
    finally:
        await store.close()


async def test_a_failing_tier_is_retried_and_never_yields_zeros(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    flaky = FlakyStore(file_store, failures=5)
    ctx, faults = vm(tracker, flaky, fetch_retry_initial_seconds=0.01)
    await tracker.cycle()
    await evict(ctx, np.array([3]))
    with serving_faults(tracker, faults):
        assert await read(puppet, [3]) == [0]
    assert ctx.stats.fetch_errors == 5 and ctx.stats.fetched_pages == 1


async def test_past_the_deadline_wait_keeps_the_vcpu_blocked_then_serves_it(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    flaky = FlakyStore(file_store, failures=None)
    ctx, faults = vm(
        tracker,
        flaky,
        fetch_retry_initial_seconds=0.01,
        fetch_retry_max_seconds=0.05,
        fetch_deadline_seconds=0.2,
        tier_call_deadline_seconds=0.2,
    )
    await tracker.cycle()
    await evict_unhurried(ctx, np.array([5]))
    with serving_faults(tracker, faults):
        rid = puppet.send("read", pages=[5])
        await asyncio.sleep(0.6)
        assert not puppet.done(rid), "the vCPU must stay blocked while the tier is down"
        assert ctx.stats.fetches_stuck == 1
        flaky.failures = 0
        assert await asyncio.to_thread(puppet.wait, rid) == [0]


async def test_past_the_deadline_poison_gives_the_guest_a_memory_error(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    flaky = FlakyStore(file_store, failures=None)
    ctx, faults = vm(
        tracker,
        flaky,
        fetch_retry_initial_seconds=0.01,
        fetch_deadline_seconds=0.1,
        tier_call_deadline_seconds=0.1,
        on_fetch_deadline=OnDeadline.POISON,
    )
    await tracker.cycle()
    await evict_unhurried(ctx, np.array([7]))
    with serving_faults(tracker, faults):
        puppet.send("read", pages=[7])
        code = await asyncio.to_thread(puppet.proc.wait, 10)
    assert code == -signal.SIGBUS
    assert ctx.stats.poisoned_pages == 1


async def test_prefetch_brings_neighbours_back_without_faults(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults = vm(tracker, file_store, prefetch_pages=8)
    state = tracker.regions[0].state
    await tracker.cycle()
    await evict(ctx, np.arange(100, 120))
    with serving_faults(tracker, faults):
        assert await read(puppet, [100]) == [0]
        for _ in range(100):
            if ctx.stats.prefetched_pages == 8:
                break
            await asyncio.sleep(0.01)
        assert ctx.stats.prefetched_pages == 8
        assert not state.evicted_mask(np.arange(100, 109)).any()
        assert state.evicted_mask(np.arange(109, 120)).all()
        assert await read(puppet, range(100, 120)) == [0] * 20
    # 100, 109 and 118 on demand, each bringing up to 8 more
    assert (ctx.stats.fetched_pages, ctx.stats.prefetched_pages) == (3, 17)


async def test_drain_brings_every_page_back_and_empties_the_store(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults = vm(tracker, file_store)
    await tracker.cycle()
    await evict(ctx, np.arange(0, puppet.npages, 3))
    with serving_faults(tracker, faults):
        await drain(ctx, faults)
    assert tracker.regions[0].state.evicted_pages == 0
    assert (await file_store.stats()).pages == 0
    assert await read(puppet, range(puppet.npages)) == [0] * puppet.npages


async def test_a_drain_without_memory_for_the_pages_leaves_them_in_storage(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UFFDIO_COPY says ENOMEM (a hugetlbfs pool with no free page, a cgroup at
    its limit): the drain stops as for a failing tier, and what it did not
    bring back stays evicted and stored, for the session to resume."""
    ctx, faults = vm(tracker, file_store)
    await tracker.cycle()
    pages = np.arange(0, 64)
    await evict(ctx, pages)

    def no_memory(*args: object, **kwargs: object) -> None:
        raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")

    monkeypatch.setattr(Userfaultfd, "copy", no_memory)
    assert not await drain(ctx, faults)
    assert tracker.regions[0].state.evicted_pages == len(pages)
    assert (await file_store.stats()).pages == len(pages)


async def test_drain_after_the_vmm_died_drops_its_pages(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults = vm(tracker, file_store)
    await tracker.cycle()
    await evict(ctx, np.arange(0, 64))
    puppet.proc.kill()
    puppet.proc.wait()
    await drain(ctx, faults)
    assert (await file_store.stats()).pages == 0


async def test_a_failed_put_evicts_nothing(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    class FailingPut(FlakyStore):
        async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
            raise TierUnavailable("disk gone", backend="failing")

    ctx, _ = vm(tracker, FailingPut(file_store, failures=0))
    await tracker.cycle()
    before = resident_bytes(puppet)
    ev = Evictor(ctx)
    assert await ev.evict_batch(0, tracker.regions[0], np.arange(10, dtype=np.int64)) == -1
    assert resident_bytes(puppet) == before
    assert tracker.regions[0].state.evicted_pages == 0 and ctx.stats.failed_batches == 1


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_a_failed_batch_starts_no_other_and_the_stored_ones_are_committed(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, in_flight: int
) -> None:
    """A batch already in flight when another fails finishes, and is kept."""
    puts: list[int] = []

    class ThirdPutFails(FlakyStore):
        async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
            puts.append(len(pages))
            if len(puts) == 3:
                raise TierUnavailable("disk gone", backend="failing")
            await self.inner.put(ns, pages, **kw)

    ps = tracker.regions[0].region.page_size
    ctx, faults = vm(
        tracker,
        ThirdPutFails(file_store, failures=0),
        batch_pages=16,
        batches_in_flight=in_flight,
    )
    await tracker.cycle()
    await tracker.cycle()
    ev = Evictor(ctx)
    stored = await ev.prepare_idle(256 * ps)
    assert ctx.stats.failed_batches == 1
    # The third put fails at once; a fourth may have started before it did.
    assert puts in ([16] * 3, [16] * (2 + in_flight))
    assert stored == (len(puts) - 1) * 16 * ps
    before = resident_bytes(puppet)
    await tracker.cycle(ev.commit)
    assert ctx.stats.evicted_pages * ps == stored
    assert resident_bytes(puppet) == before - stored
    with serving_faults(tracker, faults) as unhandled:
        assert await read(puppet, range(puppet.npages)) == [0] * puppet.npages
    assert not unhandled


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_a_cancelled_prepare_starts_no_batch_after_it_returns(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, in_flight: int
) -> None:
    """The puts in flight finish on their own (the tier's calls are never cancelled,
    deadline.py), but nothing starts or goes on to its sync once the cancelled
    prepare has returned."""
    started = running = syncs = 0

    class SlowPut(FlakyStore):
        async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
            nonlocal started, running
            started += 1
            running += 1
            try:
                await asyncio.sleep(0.2)
                await self.inner.put(ns, pages, **kw)
            finally:
                running -= 1

        async def sync(self) -> None:
            nonlocal syncs
            syncs += 1
            await self.inner.sync()

    ps = tracker.regions[0].region.page_size
    ctx, _ = vm(
        tracker, SlowPut(file_store, failures=0), batch_pages=16, batches_in_flight=in_flight
    )
    await tracker.cycle()
    await tracker.cycle()
    task = asyncio.create_task(Evictor(ctx).prepare_idle(256 * ps))
    async with asyncio.timeout(10):
        while not running:
            await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        while running:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert 1 <= started <= in_flight and syncs == 0


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_a_prepare_stores_batches_in_flight_at_once_and_lists_them_in_order(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore, in_flight: int
) -> None:
    running = most = 0

    class SlowPut(FlakyStore):
        async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await asyncio.sleep(0.2)  # long enough for the next reads to overlap it
                await self.inner.put(ns, pages, **kw)
            finally:
                running -= 1

    ps = tracker.regions[0].region.page_size
    ctx, faults = vm(
        tracker, SlowPut(file_store, failures=0), batch_pages=16, batches_in_flight=in_flight
    )
    await tracker.cycle()
    await tracker.cycle()
    pages = range(puppet.npages)
    before = await read(puppet, pages)
    ev = Evictor(ctx)
    started: list[int] = []  # each batch's first page, in the order its prepare began
    prepare = ev._prepare

    async def recorded(i: int, pages: np.ndarray) -> Any:
        started.append(int(pages[0]))
        return await prepare(i, pages)

    with mock.patch.object(ev, "_prepare", recorded):
        stored = await ev.prepare_idle(8 * 16 * ps)
    assert stored == 8 * 16 * ps and len(started) == 8
    assert most == in_flight
    assert [int(b.pages[0]) for b in ev._prepared] == started
    await tracker.cycle(ev.commit)
    assert ctx.stats.evicted_pages == 8 * 16
    with serving_faults(tracker, faults) as unhandled:
        assert await read(puppet, pages) == before
    assert not unhandled


async def test_closing_the_fault_service_cancels_fetches_stuck_on_the_tier(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    ctx, faults = vm(tracker, FlakyStore(file_store, failures=None))
    await tracker.cycle()
    await evict(ctx, np.array([9]))
    with serving_faults(tracker, faults):
        puppet.send("read", pages=[9])
        for _ in range(500):
            if faults.fetching:
                break
            await asyncio.sleep(0.01)
        assert faults.fetching
        await asyncio.wait_for(faults.close(), 5)
    assert not faults._tasks


async def test_a_batch_puts_at_most_max_batch_bytes(
    puppet: PuppetVMM, tracker: VmTracker, file_store: PageStore
) -> None:
    """The byte bound splits batches whatever batch_pages says (2 MiB pages on hugetlbfs)."""
    sizes: list[int] = []

    class CountingPut(FlakyStore):
        async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
            sizes.append(len(pages))
            await self.inner.put(ns, pages, **kw)

    ps = tracker.regions[0].region.page_size
    ctx, _ = vm(
        tracker, CountingPut(file_store, failures=0), batch_pages=1024, max_batch_bytes=16 * ps
    )
    await tracker.cycle()
    await tracker.cycle()
    stored = await Evictor(ctx).prepare_idle(256 * ps)
    assert stored == 256 * ps, stored
    assert sizes == [16] * 16, sizes


async def test_a_resumed_session_is_told_when_its_storage_holds_none_of_its_pages(
    tracker: VmTracker, file_store: PageStore, tmp_path: Path
) -> None:
    """``resume.check_stored``: the storage the pages went to says nothing;
    another (a changed ``[storage]``), or none at all, gets one error line."""
    ctx, _ = vm(tracker, file_store)
    await tracker.cycle()
    await evict(ctx, np.arange(0, 64))
    other = await open_backend(FileStoreConfig(root=tmp_path / "elsewhere"))
    try:
        for store, said in ((file_store, None), (other, "holds none"), (None, "no storage")):
            with capture_logs() as logs:
                await check_stored(vm(tracker, store)[0])
            errors = [e["event"] for e in logs if e["log_level"] == "error"]
            assert errors == ([] if said is None else [mock.ANY]), errors
            assert said is None or said in errors[0]
    finally:
        await other.close()
