"""wp-async: the verified punch runs in a thread, and the loop serves faults meanwhile.

Faults on the chunk's own pages must wait for it (wsd.evictor.inflight): a
MISSING fault there may be on a hole the thread has punched and the page
state does not yet call evicted, which the fault service would zero-fill.
Each test holds the thread right after its punch, makes the puppet act on the
chunk's pages, and checks what it reads once the thread lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from wsd.evictor import evictor as evictor_module
from wsd.evictor.context import VmContext
from wsd.evictor.transaction import HeldPunch, punch_held
from wsd.kernel import PageFault, pread
from wsd.storage import FileStoreConfig, PageStore
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_puppet
from wsd.testing.life_events import call, evictor_session, uffd_vmflags, wait_until
from wsd.testing.puppet_vmm import DISCARDED, PuppetVMM, page_pattern
from wsd.testing.running import serving_faults
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion, VmTracker

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
PAGES = np.arange(0, 128, dtype=np.int64)


@dataclass
class HeldThread:
    """Stops the punch's thread after the punch, until :meth:`let_go`."""

    punched: threading.Event
    go: threading.Event

    def punch(self, *args: Any, **kwargs: Any) -> HeldPunch:
        done = punch_held(*args, **kwargs)
        self.punched.set()
        self.go.wait(30)
        return done

    async def wait_for_punch(self) -> None:
        assert await asyncio.to_thread(self.punched.wait, 30), "the punch never ran"

    def let_go(self) -> None:
        self.go.set()


@pytest.fixture
def held_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldThread]:
    h = HeldThread(threading.Event(), threading.Event())
    monkeypatch.setattr(evictor_module, "punch_held", h.punch)
    yield h
    h.let_go()  # never leave a worker blocked


@dataclass
class CommitInFlight:
    """A commit of ``PAGES`` whose punch's thread is held after the punch."""

    ctx: VmContext
    region: TrackedRegion
    commit: asyncio.Future[int]
    unhandled: list[PageFault]
    """Faults nobody served; read it after the block."""


@contextlib.asynccontextmanager
async def commit_in_flight(
    tracker: VmTracker, store: PageStore, held_thread: HeldThread
) -> AsyncIterator[CommitInFlight]:
    """Serve faults and life events as the daemon does, and start a commit of
    ``PAGES``; the block runs once its thread has punched them."""
    ctx, faults, ev = evictor_session(tracker, store)
    t = tracker.regions[0]
    with serving_faults(tracker, faults, ev) as unhandled:
        commit = asyncio.ensure_future(ev.evict_batch(0, t, PAGES))
        await held_thread.wait_for_punch()
        yield CommitInFlight(ctx, t, commit, unhandled)


@pytest.fixture
def puppet() -> Iterator[PuppetVMM]:
    with PuppetVMM.spawn(4 << 20) as p:
        yield p


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[PageStore]:
    s = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
    yield s
    await s.close()


@pytest_asyncio.fixture
async def tracker(puppet: PuppetVMM) -> AsyncIterator[VmTracker]:
    t = track_puppet(puppet, vm_id="in-flight")
    assert t.mode is TrackingMode.WP_ASYNC
    await t.cycle()
    yield t
    t.close()


async def test_a_fault_on_a_page_in_flight_waits_and_gets_the_stored_bytes(
    puppet: PuppetVMM, tracker: VmTracker, store: PageStore, held_thread: HeldThread
) -> None:
    async with commit_in_flight(tracker, store, held_thread) as c:
        reading = asyncio.ensure_future(call(puppet, "read", pages=[1, 2, 70]))
        # Far longer than a fault takes, which is being served to nobody else.
        await asyncio.sleep(0.3)
        assert not reading.done() and c.ctx.stats.zero_fills == 0
        # The loop is not blocked: another page of the region is served.
        assert await call(puppet, "read", pages=[500]) == [0]
        held_thread.let_go()
        assert await c.commit == len(PAGES)
        assert await reading == [0, 0, 0]
    assert not c.unhandled
    assert c.ctx.stats.fetched_pages == 3 and c.ctx.stats.zero_fills == 0
    assert not c.ctx.in_flight.busy


async def test_a_cancelled_commit_settles_its_punch_first(
    puppet: PuppetVMM, tracker: VmTracker, store: PageStore, held_thread: HeldThread
) -> None:
    """A cancellation (the session ending) must not leave holes nobody accounts for."""
    async with commit_in_flight(tracker, store, held_thread) as c:
        c.commit.cancel()
        await asyncio.sleep(0.1)
        assert not c.commit.done()
        held_thread.let_go()
        with pytest.raises(asyncio.CancelledError):
            await c.commit
        assert c.region.state.evicted_mask(PAGES).all() and not c.ctx.in_flight.busy
        assert await call(puppet, "read", pages=PAGES.tolist()) == [0] * len(PAGES)
    assert not c.unhandled and c.ctx.stats.zero_fills == 0


async def test_a_page_removed_while_in_flight_reads_zeros_and_the_rest_its_bytes(
    puppet: PuppetVMM, tracker: VmTracker, store: PageStore, held_thread: HeldThread
) -> None:
    async with commit_in_flight(tracker, store, held_thread) as c:
        # The REMOVE event is read (the madvise returns) while the thread holds on.
        await call(puppet, "discard", pages=[9, 10], how="remove")
        held_thread.let_go()
        assert await c.commit == len(PAGES) - 2
        assert not c.region.state.evicted_mask(np.array([9, 10])).any()
        versions = await call(puppet, "read", pages=PAGES.tolist())
    assert not c.unhandled
    assert [p for p, v in enumerate(versions) if v == DISCARDED] == [9, 10]
    assert c.ctx.stats.zero_fills == 2 and c.ctx.stats.fetched_pages == len(PAGES) - 2


async def test_a_region_partly_unmapped_while_in_flight_gets_every_page_back(
    puppet: PuppetVMM, tracker: VmTracker, store: PageStore, held_thread: HeldThread
) -> None:
    """The detached region's release waits for the punch, which writes the
    pages back into the memfd instead of counting them evicted, before it
    unregisters what the VMM still maps: a guest thread waiting there is
    then woken onto its bytes, not onto a hole the kernel would fill with zeros."""
    async with commit_in_flight(tracker, store, held_thread) as c:
        reading = asyncio.ensure_future(call(puppet, "read", pages=[0, 1, 63]))
        await call(puppet, "unmap", pages=[64, 960])
        await wait_until(lambda: c.region.vanished is not None, "the UNMAP event")
        await asyncio.sleep(0.2)
        assert not reading.done()
        held_thread.let_go()
        assert await c.commit == 0
        assert await reading == [0, 0, 0]
        await wait_until(
            lambda: not uffd_vmflags(puppet.pid, puppet.base, 4 << 20), "the unregistration"
        )
    assert not c.unhandled and c.region.state.evicted_pages == 0
    for p in PAGES.tolist():
        assert bytes(pread(puppet.memfd, 4096, p * 4096)) == page_pattern(p, 0, 4096), p
