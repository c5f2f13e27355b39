"""FaultService times each fault it serves, by store and result, on a fake clock.

The uffd and the store are fakes; the region state, policy and stats are real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from wsd.evictor import EvictorConfig, OnDeadline
from wsd.evictor.context import VmContext
from wsd.evictor.faults import FaultResult, FaultService
from wsd.kernel import PageFault
from wsd.kernel.uffd import FaultFlag
from wsd.storage import PageNamespace, StoredPage, TierUnavailable
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion, VmTracker
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region

BASE = 0x7F00_0000_0000
PAGES = 16
PAGE = 4096
EVICTED = 3  # the page that is in the store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeUffd:
    calls: list[tuple[str, int]] = field(default_factory=list)

    def zeropage(self, addr: int, size: int) -> None:
        self.calls.append(("zeropage", addr))

    def copy(self, addr: int, data: bytes, *, wake: bool = True, wp: bool = False) -> None:
        self.calls.append(("copy", addr))

    def wake(self, addr: int, size: int) -> None:
        self.calls.append(("wake", addr))

    def poison(self, addr: int, size: int) -> None:
        self.calls.append(("poison", addr))


class FakeStore:
    """A store whose ``get`` takes ``get_seconds`` of the clock and fails ``failures`` times."""

    name = "file"

    def __init__(self, clock: Clock, *, get_seconds: float, failures: int = 0) -> None:
        self.clock = clock
        self.get_seconds = get_seconds
        self.failures = failures

    async def get(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage:
        self.clock.now += self.get_seconds
        if self.failures:
            self.failures -= 1
            raise TierUnavailable("down", backend=self.name)
        return StoredPage(bytes(PAGE), generation or 0)


def service(store: FakeStore | None, clock: Clock, **config: Any) -> FaultService:
    region = Region(
        guest_phys_addr=0, host_virt_addr=BASE, size=PAGES * PAGE, fd_index=0, page_size=PAGE
    )
    state = RegionState(PAGES, Granularity.PAGE_4K, started_at=0.0)
    state.note_evicted(np.array([EVICTED]))
    tracker = SimpleNamespace(
        regions=[TrackedRegion(region, -1, state)],
        uffd=FakeUffd(),
        cycles=0,
        mode=TrackingMode.RWP,
    )
    tracker.locate = lambda address: VmTracker.locate(cast(VmTracker, tracker), address)
    cfg = EvictorConfig(fetch_retry_initial_seconds=0.001, **config)
    ctx = VmContext("vm", cast(VmTracker, tracker), cast(Any, store), cfg, clock)
    return FaultService(ctx, spawn)


SPAWNED: list[asyncio.Future[None]] = []


@pytest.fixture(autouse=True)
def no_tasks_left_from_another_test() -> None:
    SPAWNED.clear()


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    task = asyncio.ensure_future(coro)
    SPAWNED.append(task)
    return task


async def settle() -> None:
    """Wait for every fetch task, including those spawned while waiting.

    A fetch that fails unexpectedly is retried every second for ever, so a
    bound turns that into a failure instead of a hang.
    """
    async with asyncio.timeout(5):
        while SPAWNED:
            await SPAWNED.pop()


def fault(page: int) -> PageFault:
    return PageFault(BASE + page * PAGE, FaultFlag(0), thread_id=1)


def observed(faults: FaultService) -> dict[tuple[str, str], tuple[int, float]]:
    return {(b, str(r)): (h.count, h.sum) for (b, r), h in faults.latency.items()}


@pytest.mark.asyncio
async def test_a_zero_fill_is_timed_from_the_read_with_no_backend() -> None:
    clock = Clock()
    faults = service(FakeStore(clock, get_seconds=0.0), clock)
    faults.on_missing(fault(0), read_at=clock.now - 0.00002)
    assert observed(faults) == {("", "zero"): (1, pytest.approx(0.00002))}


@pytest.mark.asyncio
async def test_a_fetch_is_timed_until_the_page_is_installed() -> None:
    clock = Clock()
    faults = service(FakeStore(clock, get_seconds=0.003), clock)
    faults.on_missing(fault(EVICTED), read_at=clock.now)
    faults.on_missing(fault(EVICTED), read_at=clock.now)  # waits on the same fetch: not timed
    await settle()
    assert observed(faults) == {("file", "ok"): (1, pytest.approx(0.003))}
    assert faults.ctx.stats.fetched_pages == 1


@pytest.mark.asyncio
async def test_a_fetch_that_failed_first_counts_as_retried() -> None:
    clock = Clock()
    faults = service(FakeStore(clock, get_seconds=0.01, failures=2), clock)
    faults.on_missing(fault(EVICTED), read_at=clock.now)
    await settle()
    assert observed(faults) == {("file", "retried"): (1, pytest.approx(0.03))}
    assert faults.ctx.stats.fetch_errors == 2


@pytest.mark.asyncio
async def test_a_poisoned_page_is_timed_as_poisoned() -> None:
    clock = Clock()
    store = FakeStore(clock, get_seconds=1.0, failures=10)
    faults = service(
        store,
        clock,
        fetch_deadline_seconds=1.5,
        tier_call_deadline_seconds=1.5,
        on_fetch_deadline=OnDeadline.POISON,
    )
    faults.on_missing(fault(EVICTED), read_at=clock.now)
    await settle()
    assert observed(faults) == {("file", "poisoned"): (1, pytest.approx(2.0))}
    assert faults.ctx.stats.poisoned_pages == 1


def test_every_result_is_a_distinct_label_value() -> None:
    assert len({str(r) for r in FaultResult}) == len(FaultResult)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "timed"),
    [
        # EAGAIN: a REMOVE/UNMAP/REMAP queued, not read.  The thread must fault
        # again, not wait, and nothing is timed: its next fault is.
        (BlockingIOError(11, "EAGAIN"), {}),
        # EEXIST: populated meanwhile, perhaps by a write that woke nobody.
        (FileExistsError(17, "EEXIST"), {("file", "race"): (1, 0.0)}),
    ],
)
async def test_a_zero_fill_that_cannot_be_done_wakes_its_thread_and_counts_no_zero_fill(
    error: OSError, timed: dict[tuple[str, str], tuple[int, float]]
) -> None:
    clock = Clock()
    faults = service(FakeStore(clock, get_seconds=0.0), clock)
    uffd = faults.ctx.tracker.uffd

    def refused(addr: int, size: int) -> None:
        raise error

    uffd.zeropage = refused  # type: ignore[method-assign]
    faults.on_missing(fault(0), read_at=clock.now)
    assert uffd.calls == [("wake", BASE)]
    assert faults.ctx.stats.zero_fills == 0 and observed(faults) == timed
