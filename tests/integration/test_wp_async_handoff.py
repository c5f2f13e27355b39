"""Host kernel (no RWP): the hand-off and fetch-back path in wp-async mode.

A puppet VMM process hands its raw uffd and memfd to this process, which does
what wsd does on kernels before 7.3: UFFDIO_API with WP_ASYNC, REGISTER
WP|MISSING on the VMM's addresses, write tracking with PAGE_IS_WRITTEN on
/proc/<vmm>/pagemap, eviction by pread + punch + wake, and fetch-back of
MISSING faults with UFFDIO_COPY.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterator

import numpy as np
import pytest
import uvloop

from wsd.kernel import (
    PageCategory,
    PageFault,
    Pagemap,
    RegisterMode,
    ScanFlag,
    Userfaultfd,
    data_ranges,
    pread,
    probe_api,
    punch_hole,
)
from wsd.testing.faults import serve_faults
from wsd.testing.puppet_vmm import PuppetVMM, page_pattern
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import REQUIRED

pytestmark = pytest.mark.integration

WP_FEATURES = REQUIRED[TrackingMode.WP_ASYNC]
GUEST = 16 << 20


@pytest.fixture
def puppet() -> Iterator[PuppetVMM]:
    supported = probe_api().features
    if WP_FEATURES & ~supported:
        pytest.skip(f"kernel lacks {WP_FEATURES & ~supported!r} (needs Linux 6.7)")
    with PuppetVMM.spawn(GUEST) as p:
        yield p


@pytest.fixture
def armed(puppet: PuppetVMM) -> Iterator[tuple[PuppetVMM, Userfaultfd, Pagemap]]:
    uffd = Userfaultfd(os.dup(puppet.uffd_fd))
    uffd.api(WP_FEATURES)
    uffd.register(puppet.base, puppet.size, RegisterMode.WP | RegisterMode.MISSING)
    uffd.writeprotect(puppet.base, puppet.size, protect=True)
    with uffd, Pagemap.open(puppet.pid) as pm:
        yield puppet, uffd, pm


def written(p: PuppetVMM, pm: Pagemap, flags: ScanFlag = ScanFlag(0)) -> np.ndarray:
    res = pm.scan(p.base, p.size, category_mask=PageCategory.WRITTEN, flags=flags)
    return res.page_indices(p.base, p.page_size)


def evict(p: PuppetVMM, uffd: Userfaultfd, pages: list[int]) -> dict[int, bytes]:
    saved = {}
    for page in pages:
        saved[page] = bytes(pread(p.memfd, p.page_size, p.offset(page)))
        punch_hole(p.memfd, p.offset(page), p.page_size)
        uffd.wake(p.addr(page), p.page_size)
    return saved


def test_written_scan_reports_exactly_the_written_pages(armed) -> None:
    p, _uffd, pm = armed
    assert len(written(p, pm)) == 0, "freshly protected range reports writes"
    rng = np.random.default_rng(1)
    hot = sorted(rng.choice(p.npages, size=p.npages // 10, replace=False).tolist())
    p.call("write", pages=hot, version=1)
    assert written(p, pm).tolist() == hot
    # WP_MATCHING re-arms what it reports: the next interval starts clean.
    assert written(p, pm, ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC).tolist() == hot
    assert len(written(p, pm)) == 0
    assert p.call("read", pages=hot) == [1] * len(hot)


def test_evicted_pages_come_back_byte_identical(armed) -> None:
    p, uffd, _pm = armed
    cold = list(range(3, p.npages, 97))
    saved = evict(p, uffd, cold)
    for page, data in saved.items():
        assert data == page_pattern(page, 0, p.page_size)
    resident = sum(e - s for s, e in data_ranges(p.memfd))
    assert resident == p.size - len(cold) * p.page_size

    faults: list[PageFault] = []

    def fetch(f: PageFault) -> None:
        faults.append(f)
        page = (f.address - p.base) // p.page_size
        uffd.copy(p.addr(page), saved[page])

    rid = p.send("read", pages=cold)
    serve_faults(uffd, fetch, until=lambda: p.done(rid))
    assert p.wait(rid) == [0] * len(cold)
    assert sorted((f.address - p.base) // p.page_size for f in faults) == cold
    assert all(f.is_missing and not f.is_write for f in faults)


def test_write_to_evicted_page_faults_missing_with_write_flag(armed) -> None:
    p, uffd, _pm = armed
    saved = evict(p, uffd, [5])
    seen: list[PageFault] = []

    def fetch(f: PageFault) -> None:
        seen.append(f)
        uffd.copy(p.addr(5), saved[5])

    rid = p.send("write", pages=[5], version=7)
    serve_faults(uffd, fetch, until=lambda: p.done(rid))
    p.wait(rid)
    assert len(seen) == 1 and seen[0].is_missing and seen[0].is_write
    assert p.call("read", pages=[5]) == [7]


def test_fault_service_on_uvloop_add_reader(armed) -> None:
    """The daemon's shape: the uffd watched with loop.add_reader on uvloop."""
    p, uffd, _pm = armed
    cold = list(range(0, p.npages, 211))
    saved = evict(p, uffd, cold)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        served = 0

        def on_readable() -> None:
            nonlocal served
            for msg in uffd.read_messages():
                assert isinstance(msg, PageFault) and msg.is_missing
                page = (msg.address - p.base) // p.page_size
                uffd.copy(p.addr(page), saved[page])
                served += 1

        loop.add_reader(uffd.fd, on_readable)
        try:
            result = await loop.run_in_executor(None, functools.partial(p.call, "read", pages=cold))
        finally:
            loop.remove_reader(uffd.fd)
        assert result == [0] * len(cold)
        return served

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == len(cold)
