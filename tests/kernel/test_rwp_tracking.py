"""RWP-FACTS facts 1, 3, 4, 5 and 6, across two processes.

A puppet VMM creates a memfd and a raw uffd and sends them here over
SCM_RIGHTS; this process plays wsd: UFFDIO_API, REGISTER on the VMM's
addresses, RWPROTECT, SET_MODE, PAGEMAP_SCAN on /proc/<vmm>/pagemap,
eviction and fetch-back.
"""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest

from wsd.kernel import (
    Feature,
    KernelError,
    PageCategory,
    PageFault,
    Pagemap,
    Userfaultfd,
    data_ranges,
    pread,
    punch_hole,
)
from wsd.testing.faults import assert_no_message, collect_faults, serve_faults
from wsd.testing.puppet_vmm import PuppetVMM, page_pattern

Session = tuple[PuppetVMM, Userfaultfd, Pagemap]


def hot_pages(p: PuppetVMM, pm: Pagemap) -> list[int]:
    res = pm.scan(p.base, p.size, category_mask=PageCategory.ACCESSED)
    return res.page_indices(p.base, p.page_size).tolist()


def page_of(p: PuppetVMM, f: PageFault) -> int:
    return (f.address - p.base) // p.page_size


def test_async_scan_reports_exactly_the_touched_pages(session: Session) -> None:
    p, uffd, pm = session
    assert hot_pages(p, pm) == [], "nothing touched yet, but pages report ACCESSED"
    rng = np.random.default_rng(3)
    hot = sorted(rng.choice(p.npages, size=p.npages // 10, replace=False).tolist())
    reads, writes = hot[::2], hot[1::2]
    p.call("touch", pages=reads, write=False)
    p.call("touch", pages=writes, write=True)
    assert_no_message(uffd, 0.1)  # async: resolved in the kernel, no messages
    assert hot_pages(p, pm) == hot
    # Re-arming starts a new interval.
    uffd.rwprotect(p.base, p.size, protect=True)
    assert hot_pages(p, pm) == []
    assert p.call("read", pages=hot) == [0] * len(hot)


def test_sync_mode_faults_carry_rwp_flag_and_resolve_intact(session: Session) -> None:
    p, uffd, pm = session
    uffd.set_mode(disable=Feature.RWP_ASYNC)
    r = p.send("touch", pages=[10], write=False)
    w = p.send("touch", pages=[20], write=True)
    faults = sorted(collect_faults(uffd, 2), key=lambda f: f.address)
    assert [page_of(p, f) for f in faults] == [10, 20]
    assert [int(f.flags) for f in faults] == [0x8, 0x9]  # RWP, RWP|WRITE
    assert faults[0].address == p.addr(10), "fault address not exact to 4 KiB"
    time.sleep(0.2)
    assert not p.done(r) and not p.done(w), "threads ran on while their RWP fault was pending"
    for f in faults:
        uffd.rwprotect(f.address, p.page_size, protect=False)
    p.wait(r)
    p.wait(w)
    assert hot_pages(p, pm) == [10, 20]
    assert p.call("read", pages=[10, 20]) == [0, 0]


def test_wake_without_unprotect_refaults(session: Session) -> None:
    p, uffd, _pm = session
    uffd.set_mode(disable=Feature.RWP_ASYNC)
    rid = p.send("touch", pages=[7], write=False)
    (first,) = collect_faults(uffd, 1)
    uffd.wake(first.address, p.page_size)
    (again,) = collect_faults(uffd, 1)
    assert again.is_rwp and again.address == first.address
    assert not p.done(rid)
    uffd.rwprotect(again.address, p.page_size, protect=False)
    p.wait(rid)


def test_set_mode_async_releases_blocked_threads(session: Session) -> None:
    p, uffd, pm = session
    uffd.set_mode(disable=Feature.RWP_ASYNC)
    rid = p.send("touch", pages=[3, 4], write=False)
    collect_faults(uffd, 1)
    uffd.set_mode(enable=Feature.RWP_ASYNC)
    p.wait(rid, timeout=10)
    assert hot_pages(p, pm) == [3, 4]


def test_evict_during_sync_window_then_fetch_back(session: Session) -> None:
    """Fact 5: pread, punch, WAKE; the blocked thread re-faults MISSING; COPY fixes it."""
    p, uffd, pm = session
    victims = [100, 101, 300]
    p.call("write", pages=victims, version=5)
    uffd.rwprotect(p.base, p.size, protect=True)
    uffd.set_mode(disable=Feature.RWP_ASYNC)
    rid = p.send("read", pages=victims)  # blocks on the first victim's RWP fault
    (rwp,) = collect_faults(uffd, 1)
    assert rwp.is_rwp and page_of(p, rwp) == 100

    saved = {}
    for page in victims:
        saved[page] = bytes(pread(p.memfd, p.page_size, p.offset(page)))
        assert saved[page] == page_pattern(page, 5, p.page_size)
        punch_hole(p.memfd, p.offset(page), p.page_size)
        # The punch dropped the marker; RWPROTECT on the hole is a no-op.
        uffd.rwprotect(p.addr(page), p.page_size, protect=True)
        uffd.wake(p.addr(page), p.page_size)
    uffd.set_mode(enable=Feature.RWP_ASYNC)
    resident = data_ranges(p.memfd)
    for v in victims:
        assert not any(s <= p.offset(v) < e for s, e in resident), f"page {v} still resident"

    fetched: list[PageFault] = []

    def fetch(f: PageFault) -> None:
        assert f.is_missing, f"expected a MISSING fault, got {f}"
        fetched.append(f)
        uffd.copy(p.addr(page_of(p, f)), saved[page_of(p, f)])

    serve_faults(uffd, fetch, until=lambda: p.done(rid))
    assert p.wait(rid) == [5, 5, 5]
    assert sorted(page_of(p, f) for f in fetched) == victims
    assert sorted(set(hot_pages(p, pm)) & set(victims)) == victims  # fact 6


def test_copy_does_not_rearm_and_copy_wp_is_einval(session: Session) -> None:
    """Fact 6: fetched pages report ACCESSED until re-armed with RWPROTECT."""
    p, uffd, pm = session
    page = 42
    data = bytes(pread(p.memfd, p.page_size, p.offset(page)))
    punch_hole(p.memfd, p.offset(page), p.page_size)
    with pytest.raises(KernelError) as exc:
        uffd.copy(p.addr(page), data, wp=True)
    assert exc.value.errno == errno.EINVAL
    uffd.copy(p.addr(page), data)  # a prefetch: no fault pending
    assert hot_pages(p, pm) == [page]
    uffd.rwprotect(p.addr(page), p.page_size, protect=True)
    assert hot_pages(p, pm) == []
    assert p.call("read", pages=[page]) == [0]
