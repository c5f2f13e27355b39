"""Eviction in wp-async mode on the host kernel: no window, and still no write lost.

Linux 6.18 has no RWP, so these run natively.  The verified punch (take
references to the pages, punch, read their final bytes, put back any that
changed) must keep every write that lands between a page's read and its
punch.  One test places such writes deterministically; the hammers race a
real multi-threaded guest against an evictor that evicts everything idle for
one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt
import pytest

from wsd import fdstore, resume
from wsd.daemon import Daemon
from wsd.evictor import EvictorConfig, pagemap, transaction
from wsd.evictor import evictor as evictor_module
from wsd.evictor import held as evictor_held
from wsd.evictor.context import VmContext
from wsd.evictor.drain import drain
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import HeldPages, KernelError, PipePool, Userfaultfd, close_fds, probe_kernel
from wsd.storage import (
    FileStoreConfig,
    PageNamespace,
    PageStore,
    StorageConfig,
    StorageError,
    ZstdStoreConfig,
)
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_puppet
from wsd.testing.hammer import AGGRESSIVE, free_huge_pages, hammer, hammer_daemon
from wsd.testing.puppet_vmm import DISCARDED, PuppetVMM
from wsd.testing.running import serving_faults
from wsd.testing.supervisor import Supervisor
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import VmTracker
from wsd.tracker.state import Granularity
from wsd.vmm.kept import KeptPipes, VmmKeeper

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
INTERVAL = 0.2


class WritesDuringSync:
    """A store whose ``sync`` lets the puppet write some pages first.

    ``sync`` is the last step before the commit punches: a write there lands
    after the pages were read and stored, and no scan sees it before the punch.
    """

    def __init__(self, inner: PageStore, puppet: PuppetVMM, pages: list[int]) -> None:
        self.inner = inner
        self.puppet = puppet
        self.pages = pages

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
        await self.inner.put(ns, pages, **kw)

    async def sync(self) -> None:
        await self.inner.sync()
        if self.pages:
            await asyncio.to_thread(self.puppet.call, "write", pages=self.pages, version=7)
            self.pages = []


@contextlib.asynccontextmanager
async def racing_puppet(
    tmp_path: Path, vm_id: str, raced: list[int]
) -> AsyncIterator[tuple[PuppetVMM, VmTracker, VmContext]]:
    """A puppet tracked in wp-async mode, writing ``raced`` (version 7) between
    the store and the punch of the next eviction (:class:`WritesDuringSync`)."""
    with PuppetVMM.spawn(4 << 20) as puppet:
        tracker = track_puppet(puppet, vm_id=vm_id)
        store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
        try:
            assert tracker.mode is TrackingMode.WP_ASYNC
            await tracker.cycle()
            writes = WritesDuringSync(store, puppet, raced)
            yield puppet, tracker, VmContext(vm_id, tracker, writes, EvictorConfig())  # type: ignore[arg-type]
        finally:
            await store.close()
            tracker.close()


async def read_back_raced(
    puppet: PuppetVMM, ctx: VmContext, pages: npt.NDArray[np.int64], raced: list[int]
) -> None:
    """The guest reads ``pages``: the raced ones at version 7, the rest at 0, none zero-filled."""
    faults = FaultService(ctx, asyncio.ensure_future)
    with serving_faults(ctx.tracker, faults) as unhandled:
        versions = await asyncio.to_thread(puppet.call, "read", pages=pages.tolist())
    assert not unhandled
    assert [p for p, v in enumerate(versions) if v == 7] == raced
    assert all(v == 0 for p, v in enumerate(versions) if p not in raced)
    assert ctx.stats.zero_fills == 0


async def test_a_write_between_the_read_and_the_punch_is_put_back(tmp_path: Path) -> None:
    raced = [3, 4, 40, 41, 42, 100]
    async with racing_puppet(tmp_path, "wp-race", raced) as (puppet, tracker, ctx):
        pages = np.arange(0, 128, dtype=np.int64)
        done = await Evictor(ctx).evict_batch(0, tracker.regions[0], pages)
        assert done == len(pages) - len(raced)
        assert ctx.stats.raced_writes == len(raced)
        state = tracker.regions[0].state
        assert not state.evicted_mask(np.array(raced)).any()
        assert ctx.discards[0] >= set(raced)
        await read_back_raced(puppet, ctx, pages, raced)
        # The raced pages never left the memfd; the others came back by fault.
        assert ctx.stats.fetched_pages == len(pages) - len(raced)


async def test_a_put_back_refused_with_eagain_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UFFDIO_COPY says EAGAIN while a life event is unread, and the verified
    punch cannot wait for it: the raced bytes go in with pwrite instead."""
    raced = [5, 6, 90]
    async with racing_puppet(tmp_path, "wp-eagain", raced) as (puppet, tracker, ctx):
        pages = np.arange(0, 128, dtype=np.int64)

        def eagain(*args: object, **kwargs: object) -> int:
            raise BlockingIOError(errno.EAGAIN, "mmap changing")

        with monkeypatch.context() as m:
            m.setattr(Userfaultfd, "copy", eagain)
            done = await Evictor(ctx).evict_batch(0, tracker.regions[0], pages)
        assert done == len(pages) - len(raced) and ctx.stats.raced_writes == len(raced)
        await read_back_raced(puppet, ctx, pages, raced)


@pytest.mark.parametrize(
    ("failures", "stored"),
    [(3, []), (5, [5, 6])],
    ids=["until-the-pipes-let-go", "stored-then-fetched"],
)
async def test_a_put_back_without_memory_is_retried_and_never_reads_as_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int, stored: list[int]
) -> None:
    """UFFDIO_COPY says ENOMEM (a hugetlbfs pool whose spare pages the pipes hold):
    the raced page is put back once the pipes let go of the punched pages, or
    else stored with its final bytes and evicted, to be fetched at its next
    fault.  Never left a hole that would be zero-filled as a page that was
    never written, nor kept in wsd's memory alone."""
    raced = [5, 6, 90]
    async with racing_puppet(tmp_path, "wp-enomem", raced) as (puppet, tracker, ctx):
        pages = np.arange(0, 128, dtype=np.int64)
        copy = Userfaultfd.copy
        calls = 0

        def short_of_memory(self: Userfaultfd, *args: Any, **kwargs: Any) -> int:
            nonlocal calls
            calls += 1
            if calls <= failures:
                raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")
            return copy(self, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(Userfaultfd, "copy", short_of_memory)
            done = await Evictor(ctx).evict_batch(0, tracker.regions[0], pages)
        assert calls > failures
        assert done == len(pages) - len(raced) and ctx.stats.raced_writes == len(raced)
        t = tracker.regions[0]
        assert [p for p in raced if t.state.is_evicted(p)] == stored
        assert t.resident()[[p for p in raced if p not in stored]].all()
        await read_back_raced(puppet, ctx, pages, raced)


async def test_raced_pages_whose_store_failed_are_stored_again_while_memory_stays_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No memory for the raced pages' put-back, and the store of their final
    bytes fails once: the next try stores them again, and they are evicted
    and fetched with their raced writes.  Before, they stayed in wsd's memory
    alone until memory came, and a kill meanwhile lost them."""
    raced = [5, 6, 90]
    async with racing_puppet(tmp_path, "wp-store-again", raced) as (puppet, tracker, ctx):
        pages = np.arange(0, 128, dtype=np.int64)
        store = cast(WritesDuringSync, ctx.store)
        put, refused = store.put, cast(list[list[int]], [])

        def no_memory(*args: object, **kwargs: object) -> int:
            raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")

        async def refused_once(ns: PageNamespace, batch: Mapping[int, bytes], **kw: Any) -> None:
            if len(batch) == len(raced) and not refused:
                refused.append(sorted(batch))
                raise StorageError("injected", backend="file")
            await put(ns, batch, **kw)

        with monkeypatch.context() as m:
            m.setattr(Userfaultfd, "copy", no_memory)
            m.setattr(store, "put", refused_once)
            done = await Evictor(ctx).evict_batch(0, tracker.regions[0], pages)
        ps = tracker.regions[0].region.page_size
        assert refused == [[p * ps for p in raced]]
        assert done == len(pages) - len(raced) and ctx.stats.raced_writes == len(raced)
        t = tracker.regions[0]
        assert [p for p in raced if t.state.is_evicted(p)] == raced
        await read_back_raced(puppet, ctx, pages, raced)


async def test_a_detached_regions_stored_copies_stay_until_its_pages_are_written_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The region is detached while its verified punch runs, and the memfd has
    no memory for two of its pages (an exact hugetlbfs pool).  Until they are
    written back their stored copies are all that would outlive a crash, so
    they are kept until then; the other pages' copies go at once."""
    short = {2, 5}
    async with racing_puppet(tmp_path, "wp-detached-nomem", []) as (_, tracker, ctx):
        t = tracker.regions[0]
        ps, base = t.region.page_size, t.region.offset
        pages = np.arange(0, 8, dtype=np.int64)
        before = [os.pread(t.memfd, ps, base + p * ps) for p in pages.tolist()]
        punch, write = evictor_module.punch_held, transaction.write_into
        refused: list[set[int]] = []

        def detached_meanwhile(*args: Any, **kwargs: Any) -> Any:
            try:
                return punch(*args, **kwargs)
            finally:
                t.vanished = "unmapped (injected)"

        def short_of_memory(fd: int, data: Any, offset: int) -> None:
            if (offset - base) // ps in short and len(refused) < 3 * len(short):
                refused.append(set(ctx.discards[0]))
                raise KernelError(errno.ENOMEM, "mmap", detail="injected")
            write(fd, data, offset)

        with monkeypatch.context() as m:
            m.setattr(evictor_module, "punch_held", detached_meanwhile)
            m.setattr(transaction, "write_into", short_of_memory)
            assert await Evictor(ctx).evict_batch(0, t, pages) == 0
        # Refused twice by put_back (before and after the pipes let go), then
        # once by _place, when the other pages' copies were already let go.
        assert len(refused) == 3 * len(short)
        assert refused[-1] == set(pages.tolist()) - short
        assert ctx.discards[0] == set(pages.tolist())
        assert not t.state.evicted_pages
        assert [os.pread(t.memfd, ps, base + p * ps) for p in pages.tolist()] == before


async def test_a_resumed_hugetlbfs_session_serves_its_evicted_pages_from_storage(
    tmp_path: Path,
) -> None:
    """hugetlbfs has no SEEK_HOLE: taken for resident, the evicted pages of a
    resumed session were holes the next fault zero-filled."""
    ps = 2 << 20
    with free_huge_pages(4) as free:
        if free < 4:
            pytest.skip(f"needs 4 free 2 MiB huge pages, {free} free (vm.nr_hugepages; not root?)")
        with PuppetVMM.spawn(4 * ps, page_size=ps) as puppet:
            tracker = track_puppet(puppet, vm_id="wp-huge-resume")
            store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
            resumed: VmTracker | None = None
            memfd_copy = os.dup(puppet.memfd)
            try:
                resume.park(tmp_path, tracker.vm_id, puppet.pid, tracker, [puppet.memfd])
                await tracker.cycle()
                ctx = VmContext(tracker.vm_id, tracker, store, EvictorConfig())
                ev = Evictor(ctx, state_dir=tmp_path)
                pages = np.array([1, 2], dtype=np.int64)
                assert await ev.evict_batch(0, tracker.regions[0], pages) == 2
                await ev.save_map(force=True)
                assert ev.parking is not None
                ev.parking.close()
                record, vmap, ceiling = resume.load(tmp_path, tracker.vm_id)
                resumed = resume.adopt(
                    record,
                    vmap,
                    os.dup(tracker.uffd.fd),
                    [memfd_copy],
                    ceiling=ceiling,
                    kernel=probe_kernel(),
                )
                assert resumed.regions[0].state.evicted_pages == 2
                after = VmContext(tracker.vm_id, resumed, store, EvictorConfig())
                faults = FaultService(after, asyncio.ensure_future)
                with serving_faults(resumed, faults) as unhandled:
                    versions = await asyncio.to_thread(puppet.call, "read", pages=[0, 1, 2, 3])
                    await faults.close()
                assert not unhandled and versions == [0, 0, 0, 0]
                assert after.stats.fetched_pages == 2 and after.stats.zero_fills == 0
            finally:
                await store.close()
                tracker.close()
                if resumed is not None:
                    resumed.close()
                os.close(memfd_copy)


def wp_daemon(
    tmp_path: Path, storage: StorageConfig, evictor: EvictorConfig = AGGRESSIVE
) -> AbstractAsyncContextManager[Daemon]:
    return hammer_daemon(tmp_path, storage, evictor, interval=INTERVAL, mode=TrackingMode.WP_ASYNC)


async def test_nothing_lost_4k_shmem_wp_async(tmp_path: Path) -> None:
    async with wp_daemon(tmp_path, FileStoreConfig(root=tmp_path / "pages")) as d:
        c = await hammer(d, "wp-hammer-4k", "32M", 15, "--thp", "never", "--zipf-s", "1.3")
    assert c["mode"] == "wp-async" and c["granularity"] == str(Granularity.PAGE_4K)


@pytest.fixture
def huge_128m() -> Iterator[None]:
    """A pool of exactly the guest's 64 pages: a raced page's put-back and a
    fault's fetch then often find no free page, which hugetlbfs reports as
    EEXIST (transaction.copy_page).  Before that was known, this hammer lost
    raced pages in about a quarter of its runs."""
    with free_huge_pages(64, exactly=True) as free:
        if free != 64:
            pytest.skip(f"{free} free 2 MiB huge pages, exactly 64 needed (not root?)")
        yield


async def test_nothing_lost_hugetlb_wp_async(huge_128m: None, tmp_path: Path) -> None:
    cfg = AGGRESSIVE.model_copy(update={"rate_mb_per_second": 64.0})
    async with wp_daemon(tmp_path, ZstdStoreConfig(budget_bytes=512 << 20), cfg) as d:
        c = await hammer(d, "wp-hammer-2m", "128M", 15, "--hugetlb", "--zipf-s", "1.3")
    assert c["mode"] == "wp-async" and c["granularity"] == str(Granularity.HUGE_2M)


DISCARDED_PAGE = 10  # not one of ParkedSession.RACED


def _unreadable(*args: object, **kwargs: object) -> None:
    raise KernelError(errno.EIO, "tee", detail="injected")


def leave_parked(parking: evictor_held.Parking | None) -> None:
    """What wsd's death, or a session that stays parked, leaves: the pipes parked."""
    assert parking is not None
    close_fds(list(parking.stay_parked().values()))


class Killed(BaseException):
    """Where wsd dies: nothing in wsd catches it, as nothing survives a SIGKILL."""


@dataclass
class ParkedSession:
    """A puppet's session parked in a test supervisor's fd store, about to evict
    ``PAGES`` while the puppet writes ``RACED`` in the middle (version 7)."""

    sup: Supervisor
    puppet: PuppetVMM
    tracker: VmTracker
    store: PageStore
    ctx: VmContext
    ev: Evictor
    resumed: VmTracker | None = None
    memfd_copy: int = -1
    vmm_end: socket.socket | None = None
    """Without an fd store: the VMM's end of the connection the pipes go to."""
    wsd_end: socket.socket | None = None

    RACED: ClassVar[list[int]] = [3, 4, 40]
    PAGES: ClassVar[npt.NDArray[np.int64]] = np.arange(0, 64, dtype=np.int64)

    async def restart(self, tmp_path: Path) -> VmTracker:
        """Resume the session from copies of what the store holds, as a restarted wsd."""
        self.sup.kill()
        vm_id = self.tracker.vm_id
        stored = fdstore.parse([(n, os.dup(fd)) for n, fd in self.sup.stored])[vm_id]
        back = await resume.resume(
            stored, state_dir=tmp_path, store=self.store, kernel=probe_kernel()
        )
        assert back is not None
        self.resumed = back.tracker
        return back.tracker

    def reattach(self, tmp_path: Path) -> VmTracker:
        """wsd died; take the session back as ``Daemon._reattach`` does, with the
        VMM's copies of the uffd and memfd and the pipes it kept."""
        assert self.vmm_end is not None and self.ev.parking is not None
        leave_parked(self.ev.parking)  # what wsd's death closes
        assert self.wsd_end is not None
        self.wsd_end.close()
        kept = KeptPipes()
        while kept.receive(self.vmm_end):
            pass
        record, vmap, ceiling = resume.load(tmp_path, self.tracker.vm_id)
        held, kept.parts = dict(enumerate(kept.parts)), []
        self.resumed = resume.adopt(
            record,
            vmap,
            os.dup(self.tracker.uffd.fd),
            [self.memfd_copy],
            ceiling=ceiling,
            kernel=probe_kernel(),
            held=held,
        )
        return self.resumed

    async def die_after_the_punch(
        self, monkeypatch: pytest.MonkeyPatch, dies_in: tuple[type, str]
    ) -> None:
        """Evict ``PAGES``, with wsd killed in ``dies_in`` (class, method) after the punch."""

        def killed(*args: object, **kwargs: object) -> None:
            raise Killed

        with monkeypatch.context() as m:
            m.setattr(*dies_in, killed)
            with pytest.raises(Killed):
                await self.ev.evict_batch(0, self.tracker.regions[0], self.PAGES)
        assert not self.tracker.regions[0].resident()[self.PAGES].any(), "not punched"

    async def evict_with_unreadable_pipes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Evict ``PAGES`` with their held bytes unreadable after the punch: all held back."""
        t = self.tracker.regions[0]
        with monkeypatch.context() as m:
            m.setattr(HeldPages, "read_into", _unreadable)
            assert await self.ev.evict_batch(0, t, self.PAGES) == 0
        assert sorted(t.held_back) == self.PAGES.tolist()

    @staticmethod
    def assert_every_page_back(resumed: VmTracker) -> None:
        """The resumed session put every punched page back: none evicted, all resident."""
        state = resumed.regions[0].state
        assert state.evicted_pages == 0 and state.resident_pages == resumed.regions[0].npages

    async def check_every_raced_write_is_back(self, discarded: Sequence[int] = ()) -> None:
        """Every raced write is back, every other page at version 0, but ``discarded``
        pages (the VMM gave them back) read as zeros."""
        versions = await asyncio.to_thread(self.puppet.call, "read", pages=self.PAGES.tolist())
        assert [p for p, v in enumerate(versions) if v == 7] == self.RACED
        assert [p for p, v in enumerate(versions) if v == DISCARDED] == list(discarded)
        assert all(v == 0 for p, v in enumerate(versions) if p not in {*self.RACED, *discarded})

    async def read_back_after_restart(self, after: VmContext) -> None:
        """Serve ``after``'s faults (the resumed session's context) while the guest
        reads every page: raced writes back, ``DISCARDED_PAGE`` one zero fill."""
        assert self.resumed is not None
        faults = FaultService(after, asyncio.ensure_future)
        with serving_faults(self.resumed, faults) as unhandled:
            await self.check_every_raced_write_is_back(discarded=[DISCARDED_PAGE])
            await faults.close()
        assert not unhandled and after.stats.zero_fills == 1


@contextlib.asynccontextmanager
async def parked_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm_id: str, *, kept_by_vmm: bool = False
) -> AsyncIterator[ParkedSession]:
    """``kept_by_vmm``: no fd store; the pipes go to the VMM on a connection."""
    sup = Supervisor([], tmp_path)  # only its notify socket and fd store
    if kept_by_vmm:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sup.notify_path))
    wsd_end, vmm_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with PuppetVMM.spawn(4 << 20) as puppet:
            tracker = track_puppet(puppet, vm_id=vm_id)
            store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
            session: ParkedSession | None = None
            try:
                resume.park(tmp_path, vm_id, puppet.pid, tracker, [puppet.memfd])
                await tracker.cycle()
                ctx = VmContext(
                    vm_id,
                    tracker,
                    WritesDuringSync(store, puppet, ParkedSession.RACED),  # type: ignore[arg-type]
                    EvictorConfig(),
                )
                ev = Evictor(ctx, state_dir=tmp_path)
                session = ParkedSession(sup, puppet, tracker, store, ctx, ev)
                if kept_by_vmm:
                    assert ev.parking is not None and not ev.parking.systemd
                    ev.parking.vmm = VmmKeeper(vm_id, wsd_end)
                    session.vmm_end, session.wsd_end = vmm_end, wsd_end
                    session.memfd_copy = os.dup(puppet.memfd)
                yield session
            finally:
                await store.close()
                tracker.close()
                if session is not None and session.resumed is not None:
                    session.resumed.close()
                if session is not None and session.memfd_copy >= 0:
                    os.close(session.memfd_copy)
    finally:
        sup.close()
        wsd_end.close()
        vmm_end.close()


# Where a kill lands between a punch and its put-back.
DIES_IN = pytest.mark.parametrize(
    "dies_in",
    [
        pytest.param((HeldPages, "read_into"), id="before-reading-the-pipes"),
        # After the pipes were read: reading must not have emptied them.
        pytest.param((Userfaultfd, "copy"), id="at-the-first-put-back"),
    ],
)


@DIES_IN
async def test_a_kill_between_the_punch_and_the_put_back_loses_no_raced_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: tuple[type, str]
) -> None:
    """The pipes that hold raced writes across the punch are parked in the fd
    store, and the resume of the session puts their pages back (wsd.evictor.held)."""
    vm_id = "wp-kill"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        await s.die_after_the_punch(monkeypatch, dies_in)
        s.sup.kill()  # no process; reads what was sent first, as systemd does
        names = sorted(s.sup.stored_names())
        assert names == [f"wsd.{vm_id}.held0", f"wsd.{vm_id}.mem0", f"wsd.{vm_id}.uffd"]
        resumed = await s.restart(tmp_path)
        s.assert_every_page_back(resumed)
        s.sup.kill()
        assert f"wsd.{vm_id}.held0" not in s.sup.stored_names(), "pipes left in the store"
        # Every page is back in place: reading them faults nothing.
        await s.check_every_raced_write_is_back()


async def test_a_restart_puts_back_held_pages_that_had_no_memory_once_their_pipes_are_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On hugetlbfs the pipes' punched pages may be all the pool has: a
    restart's put-back meets ENOMEM until the pipes are emptied.  It empties
    them and goes on from the bytes it read (evictor.held)."""
    vm_id = "wp-kill-nomem"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        await s.die_after_the_punch(monkeypatch, (HeldPages, "read_into"))
        emptied: list[int] = []
        copy, empty_pipe = Userfaultfd.copy, evictor_held.empty_pipe

        def no_memory_while_held(self: Userfaultfd, *args: Any, **kwargs: Any) -> int:
            if not emptied:
                raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")
            return copy(self, *args, **kwargs)

        def emptying(fd: int) -> None:
            emptied.append(fd)
            empty_pipe(fd)

        monkeypatch.setattr(Userfaultfd, "copy", no_memory_while_held)
        monkeypatch.setattr(evictor_held, "empty_pipe", emptying)
        resumed = await s.restart(tmp_path)
        assert emptied, "the pipes were never emptied"
        s.assert_every_page_back(resumed)
        await s.check_every_raced_write_is_back()


async def test_a_kill_after_raced_pages_without_memory_were_stored_loses_no_raced_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every put-back of the raced pages says ENOMEM, even once the pipes let
    go: their final bytes, in wsd's memory alone, are stored at the generation
    the page map lists them at, then the pages count as evicted.  wsd killed
    right after the store: the restart serves the raced writes from storage.
    Before, the put-back retried for as long as it took, and a kill lost them."""
    vm_id = "wp-kill-stored"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        mark, marked = Evictor._mark_evicted, 0

        def no_memory(*args: object, **kwargs: object) -> int:
            raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")

        def killed_once_the_raced_are_stored(self: Evictor, *args: Any) -> None:
            nonlocal marked
            marked += 1
            if marked == 2:  # the first: the chunk's pages whose stored bytes were right
                raise Killed
            mark(self, *args)

        with monkeypatch.context() as m:
            m.setattr(Userfaultfd, "copy", no_memory)
            m.setattr(Evictor, "_mark_evicted", killed_once_the_raced_are_stored)
            with pytest.raises(Killed):
                await s.ev.evict_batch(0, s.tracker.regions[0], s.PAGES)
        assert marked == 2
        resumed = await s.restart(tmp_path)
        assert resumed.regions[0].state.evicted_pages == len(s.PAGES)
        after = VmContext(vm_id, resumed, s.store, EvictorConfig())
        faults = FaultService(after, asyncio.ensure_future)
        with serving_faults(resumed, faults) as unhandled:
            await s.check_every_raced_write_is_back()
            await faults.close()
        assert not unhandled and after.stats.zero_fills == 0


@DIES_IN
async def test_without_an_fd_store_the_vmm_keeps_the_pipes_and_a_reattach_loses_no_raced_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: tuple[type, str]
) -> None:
    """No systemd: the pipes went to the VMM on its connection before the punch
    (``keep``), and the reattach that gives them back puts every raced write
    back (wsd.vmm.kept)."""
    vm_id = "wp-kill-vmm"
    async with parked_session(tmp_path, monkeypatch, vm_id, kept_by_vmm=True) as s:
        await s.die_after_the_punch(monkeypatch, dies_in)
        assert s.ev.parking is not None and s.ev.parking.parked > 0
        resumed = s.reattach(tmp_path)
        s.assert_every_page_back(resumed)
        await s.check_every_raced_write_is_back()


async def test_held_bytes_unread_after_the_punch_are_served_neither_as_zeros_nor_from_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the pipes fails after the punch, so which pages raced is unknown:
    a fault on one of them waits (no zero fill, no stale stored copy), and the
    restart puts them all back from the parked pipes with their final bytes."""
    vm_id = "wp-unread"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        pages, ctx, t = s.PAGES, s.ctx, s.tracker.regions[0]
        await s.evict_with_unreadable_pipes(monkeypatch)
        assert not t.resident()[pages].any(), "not punched"
        assert t.state.evicted_mask(pages).all()
        assert ctx.stats.held_back_pages == len(pages) and ctx.stats.evicted_pages == 0
        # While the pipes still do not read, no verified punch can use them:
        # nothing more is stored.
        for _ in range(ctx.config.min_idle_cycles):
            await s.tracker.cycle()
        put = (await s.store.stats()).counters.pages_put
        with monkeypatch.context() as m:
            m.setattr(evictor_held, "peek_pipe", _unreadable)
            await s.ev.prepare()
        assert t.state.evicted_mask(pages).all(), "put back"
        assert (await s.store.stats()).counters.pages_put == put

        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults) as unhandled:
            reading = asyncio.ensure_future(
                asyncio.to_thread(s.puppet.call, "read", pages=[s.RACED[0]])
            )
            await asyncio.sleep(1.0)
            assert not reading.done(), "a held-back page was served"
            assert ctx.stats.fetch_errors > 0 and ctx.stats.zero_fills == 0
            await faults.close()
        assert not unhandled
        # Stopping does not serve them from storage either: the session stays
        # parked, and its pipes with it (as Daemon._end does).
        assert not await drain(ctx, FaultService(ctx, asyncio.ensure_future))
        assert t.state.evicted_pages == len(pages)
        leave_parked(s.ev.parking)

        # -- wsd restarts: the pipes come back from the store --------------------
        s.sup.kill()
        assert f"wsd.{vm_id}.held0" in s.sup.stored_names()
        resumed = await s.restart(tmp_path)
        assert await asyncio.wait_for(reading, 10) == [7], "the waiting read"
        assert resumed.regions[0].state.evicted_pages == 0
        await s.check_every_raced_write_is_back()


async def test_a_held_back_page_the_vmm_discarded_stays_discarded_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restart puts back from the parked pipes only pages the page map
    still lists as evicted: one the VMM discarded after the punch (its
    REMOVE seen and the map rewritten before wsd died) reads as zeros, not
    as the bytes it had before the discard."""
    vm_id = "wp-discarded"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        ctx, t = s.ctx, s.tracker.regions[0]
        await s.evict_with_unreadable_pipes(monkeypatch)
        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults, s.ev) as unhandled:
            await asyncio.to_thread(s.puppet.call, "discard", pages=[DISCARDED_PAGE])
            assert not t.is_held_back(DISCARDED_PAGE)
            await s.ev.save_map(force=True)
            await faults.close()
        assert not unhandled
        leave_parked(s.ev.parking)

        resumed = await s.restart(tmp_path)
        assert resumed.regions[0].state.evicted_pages == 0
        # The discarded page is a hole that nothing lists: its fault gets zeros.
        after = VmContext(vm_id, resumed, s.store, EvictorConfig())
        await s.read_back_after_restart(after)


async def test_a_page_the_vmm_discarded_stays_discarded_when_wsd_dies_before_the_map_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wsd reads a REMOVE of an evicted page and dies before the page map,
    rewritten in a thread, drops the page.  The removal was logged beside the
    map as it was read: the restarted wsd serves zeros there, not the bytes
    the page had before the discard, and its first map write retires the log."""
    vm_id = "wp-removed-log"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        ctx, t = s.ctx, s.tracker.regions[0]
        assert await s.ev.evict_batch(0, t, s.PAGES) == len(s.PAGES) - len(s.RACED)
        faults = FaultService(ctx, asyncio.ensure_future)

        async def killed_first() -> None:
            pass  # the rewrite the REMOVE spawns never runs: wsd is gone

        with serving_faults(s.tracker, faults, s.ev) as unhandled, monkeypatch.context() as m:
            m.setattr(s.ev, "save_map", killed_first)
            await asyncio.to_thread(s.puppet.call, "discard", pages=[DISCARDED_PAGE])
            assert not t.state.evicted_mask(np.array([DISCARDED_PAGE])).any()
            await faults.close()
        assert not unhandled
        vm = pagemap.load_vm(tmp_path, vm_id)
        assert vm is not None
        listed = vm.regions[0].pages
        assert DISCARDED_PAGE in listed.tolist(), "the map on disk still lists it"
        leave_parked(s.ev.parking)

        resumed = await s.restart(tmp_path)
        state = resumed.regions[0].state
        assert state.evicted_pages == len(s.PAGES) - len(s.RACED) - 1
        after = VmContext(vm_id, resumed, s.store, EvictorConfig())
        assert DISCARDED_PAGE in after.discards[0], "its stored copy is garbage"
        await s.read_back_after_restart(after)
        # The new wsd's next snapshot holds the removal; the journals go.
        ev = Evictor(after, state_dir=tmp_path)
        ev.map_dirty = True
        await ev.save_map()
        vm = pagemap.load_vm(tmp_path, vm_id)
        assert vm is not None and not len(vm.removed)
        assert DISCARDED_PAGE not in vm.regions[0].pages.tolist()
        assert pagemap.journals(tmp_path, vm_id) == []


async def test_a_page_fetched_back_then_discarded_stays_discarded_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page evicted, fetched back, then discarded by the VMM: the map on disk
    still lists it (only a snapshot drops fetched-back pages), and its stored
    copy is still there.  The discard is journalled, so the restarted wsd
    takes its hole for a fresh page and serves zeros, not the stored bytes."""
    vm_id = "wp-fetched-removed"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        ctx, t = s.ctx, s.tracker.regions[0]
        assert await s.ev.evict_batch(0, t, s.PAGES) == len(s.PAGES) - len(s.RACED)
        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults, s.ev) as unhandled:
            await asyncio.to_thread(s.puppet.call, "read", pages=[DISCARDED_PAGE])
            assert not t.state.evicted_mask(np.array([DISCARDED_PAGE])).any()
            await asyncio.to_thread(s.puppet.call, "discard", pages=[DISCARDED_PAGE])
            await faults.close()
        assert not unhandled and ctx.stats.fetched_pages == 1
        listed = pagemap.load_vm(tmp_path, vm_id)
        assert listed is not None and DISCARDED_PAGE in listed.regions[0].pages.tolist()
        leave_parked(s.ev.parking)

        resumed = await s.restart(tmp_path)
        after = VmContext(vm_id, resumed, s.store, EvictorConfig())
        await s.read_back_after_restart(after)


async def test_a_page_fetched_back_before_a_restart_is_never_stored_at_an_old_generation_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetched back, a page leaves the map at the next snapshot, and its generation
    with it.  The restarted wsd starts it at the map's ceiling, above every
    generation it was ever stored at, so a record kept from before (a replay
    by whoever can write to the store) never passes for the current one."""
    vm_id = "wp-ceiling"
    page = 10
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        ctx, t = s.ctx, s.tracker.regions[0]
        assert await s.ev.evict_batch(0, t, s.PAGES) == len(s.PAGES) - len(s.RACED)
        ns = ctx.namespaces[0]
        before = await s.store.get(ns, page * 4096)
        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults, s.ev) as unhandled:
            await asyncio.to_thread(s.puppet.call, "read", pages=[page])
            await faults.close()
        assert not unhandled
        s.ev.map_dirty = True
        await s.ev.save_map()  # a snapshot: the page is listed no more
        on_disk = pagemap.load_vm(tmp_path, vm_id)
        assert on_disk is not None and page not in on_disk.regions[0].pages.tolist()
        ceiling = pagemap.load_ceiling(tmp_path, vm_id)
        assert ceiling > before.generation
        leave_parked(s.ev.parking)

        resumed = await s.restart(tmp_path)
        assert resumed.regions[0].state.generations[page] == ceiling - 1
        after = VmContext(vm_id, resumed, s.store, EvictorConfig())
        ev = Evictor(after, state_dir=tmp_path)
        await resumed.cycle()
        assert await ev.evict_batch(0, resumed.regions[0], np.array([page], np.int64)) == 1
        again = await s.store.get(ns, page * 4096)
        assert again.data == before.data
        assert again.generation >= ceiling > before.generation
        assert pagemap.load_ceiling(tmp_path, vm_id) > again.generation
        leave_parked(ev.parking)


async def test_a_record_stored_but_never_listed_before_a_crash_is_never_current_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wsd dies between storing a batch and listing it: the map on disk does not
    know the records' generation, but its ceiling is above it."""
    vm_id = "wp-orphan"
    pages = np.array([20, 21], np.int64)
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:

        async def killed(*args: object, **kwargs: object) -> None:
            raise Killed

        with monkeypatch.context() as m:
            m.setattr(Evictor, "save_map", killed)
            with pytest.raises(Killed):
                await s.ev.evict_batch(0, s.tracker.regions[0], pages)
        stored = await s.store.get(s.ctx.namespaces[0], 20 * 4096)
        assert pagemap.load_vm(tmp_path, vm_id) is None  # nothing listed, ever
        ceiling = pagemap.load_ceiling(tmp_path, vm_id)
        assert ceiling > stored.generation
        leave_parked(s.ev.parking)

        resumed = await s.restart(tmp_path)
        assert (resumed.regions[0].state.generations[pages] == ceiling - 1).all()


async def test_the_next_session_of_a_vm_starts_above_every_generation_of_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm_id = "wp-next-session"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        t = s.tracker.regions[0]
        assert await s.ev.evict_batch(0, t, np.array([8, 9], np.int64)) == 2
        ceiling = pagemap.load_ceiling(tmp_path, vm_id)
        assert ceiling > t.state.generations[8] > 0
        leave_parked(s.ev.parking)
        resume.unpark(tmp_path, vm_id, 1)  # the session ends, its map with it
        assert pagemap.load_vm(tmp_path, vm_id) is None

        with PuppetVMM.spawn(4 << 20) as puppet:  # the VM again, a new hand-off
            tracker = track_puppet(puppet, vm_id=vm_id)
            try:
                resume.park(tmp_path, vm_id, puppet.pid, tracker, [puppet.memfd])
                assert tracker.generation_ceiling == ceiling
                assert (tracker.regions[0].state.generations == ceiling - 1).all()
            finally:
                tracker.close()
                resume.unpark(tmp_path, vm_id, 1)


async def test_held_bytes_unread_after_the_punch_are_put_back_once_the_pipes_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without waiting for a restart: each prepare reads the pipes again, and
    once they read, the waiting fault gets its page with its final bytes and
    the pipes serve the next verified punch.  A held-back page the VMM
    discarded meanwhile stays discarded: it reads as zeros."""
    vm_id = "wp-retry"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        pages, ctx, t = s.PAGES, s.ctx, s.tracker.regions[0]
        await s.evict_with_unreadable_pipes(monkeypatch)

        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults, s.ev) as unhandled:
            reading = asyncio.ensure_future(
                asyncio.to_thread(s.puppet.call, "read", pages=[s.RACED[0]])
            )
            with monkeypatch.context() as m:
                m.setattr(evictor_held, "peek_pipe", _unreadable)
                s.ev.put_back_held()  # still unreadable: nothing changes
            await asyncio.sleep(0.5)
            assert not reading.done() and sorted(t.held_back) == pages.tolist()
            await asyncio.to_thread(s.puppet.call, "discard", pages=[DISCARDED_PAGE])

            s.ev.put_back_held()
            assert not t.held_back and t.state.evicted_pages == 0
            assert await asyncio.wait_for(reading, 10) == [7], "the waiting read"
            await s.check_every_raced_write_is_back(discarded=[DISCARDED_PAGE])
            # The pipes are empty again: the next verified punch can use them.
            assert await s.ev.evict_batch(0, t, pages) > 0
            await s.check_every_raced_write_is_back(discarded=[DISCARDED_PAGE])
            await faults.close()
        assert not unhandled


async def test_held_pages_that_meet_no_memory_are_put_back_once_their_pipes_hold_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On hugetlbfs the pipes' punched pages may be all the pool has: every
    install from the pipes says ENOMEM while they hold them.  The retry
    writes the pipes' bytes back into them (``PipePool.refill``), which
    frees the pages, and installs from those; a try that still meets no
    memory leaves the bytes in the parked pipes for the next."""
    vm_id = "wp-retry-nomem"
    async with parked_session(tmp_path, monkeypatch, vm_id) as s:
        pages, ctx, t = s.PAGES, s.ctx, s.tracker.regions[0]
        await s.evict_with_unreadable_pipes(monkeypatch)
        assert s.ev.parking is not None
        pool = s.ev.parking.pool
        held = b"".join(evictor_held.peek_pipe(r) for r in pool.read_ends)
        refilled: list[bytes] = []
        memory_comes = False
        waited_for = t.region.host_virt_addr + s.RACED[0] * t.region.page_size
        copy, refill = Userfaultfd.copy, PipePool.refill

        def no_memory_until_refilled(self: Userfaultfd, dst: int, *args: Any, **kw: Any) -> int:
            if not refilled or (dst == waited_for and not memory_comes):
                raise KernelError(errno.ENOMEM, "UFFDIO_COPY", detail="injected")
            return copy(self, dst, *args, **kw)

        def refilling(self: PipePool, data: bytes) -> None:
            refilled.append(bytes(data))
            refill(self, data)

        monkeypatch.setattr(Userfaultfd, "copy", no_memory_until_refilled)
        monkeypatch.setattr(PipePool, "refill", refilling)
        faults = FaultService(ctx, asyncio.ensure_future)
        with serving_faults(s.tracker, faults, s.ev) as unhandled:
            reading = asyncio.ensure_future(
                asyncio.to_thread(s.puppet.call, "read", pages=[s.RACED[0]])
            )
            s.ev.put_back_held()  # the waited-for page meets no memory even then
            assert refilled == [held], "the pipes were not given their bytes"
            assert sorted(t.held_back) == pages.tolist()
            assert b"".join(evictor_held.peek_pipe(r) for r in pool.read_ends) == held
            await asyncio.sleep(0.5)
            assert not reading.done()

            memory_comes = True
            s.ev.put_back_held()
            assert len(refilled) == 1, "refilled again: they held bytes already"
            assert not t.held_back and t.state.evicted_pages == 0
            assert await asyncio.wait_for(reading, 10) == [7], "the waiting read"
            await s.check_every_raced_write_is_back()
            assert all(evictor_held.peek_pipe(r) == b"" for r in pool.read_ends)
            await faults.close()
        assert not unhandled
