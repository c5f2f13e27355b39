"""``wsd demo``: one tracking cycle and one eviction on a puppet guest, for real.

It plays both sides on this kernel: a puppet VMM process hands over its memfd
and raw uffd, and this process arms tracking in the mode the kernel supports,
lets the guest touch a known hot set, scans it, evicts the cold rest into a
dict standing in for a storage tier, and serves the fetch-back faults while
the guest re-reads and verifies every page.
"""

from __future__ import annotations

import os
import time

import numpy as np

from wsd.kernel import (
    Feature,
    PageCategory,
    PageFault,
    Pagemap,
    Userfaultfd,
    data_ranges,
    pread,
    probe_kernel,
    punch_hole,
)
from wsd.testing.faults import serve_faults
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.tracker.mode import TrackingMode, choose_mode
from wsd.tracker.session import REQUIRED


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(size_mib: int = 64, hot_percent: float = 10.0) -> int:
    decision = choose_mode(probe_kernel())
    mode = decision.mode
    print(f"tracking mode: {mode} ({decision.reason})")
    for lim in decision.limitations:
        print(f"  limitation: {lim}")
    with (
        PuppetVMM.spawn(size_mib << 20) as p,
        Userfaultfd(os.dup(p.uffd_fd)) as uffd,
        Pagemap.open(p.pid) as pm,
    ):
        print(f"guest: pid {p.pid}, {_mib(p.size)} memfd at {p.base:#x}, {p.npages} pages")
        uffd.api(REQUIRED[mode])
        uffd.register(p.base, p.size, decision.register_mode)
        t0 = time.perf_counter()
        if mode is TrackingMode.RWP:
            uffd.rwprotect(p.base, p.size, protect=True)
        else:
            uffd.writeprotect(p.base, p.size, protect=True)
        arm_ms = (time.perf_counter() - t0) * 1e3
        print(f"armed {mode} on the whole guest in {arm_ms:.2f} ms")

        rng = np.random.default_rng(0)
        hot = np.sort(rng.choice(p.npages, size=int(p.npages * hot_percent / 100), replace=False))
        # wp-async sees writes only, so the guest writes its hot set here.
        p.call("touch", pages=hot.tolist(), write=mode is TrackingMode.WP_ASYNC)
        category = PageCategory.ACCESSED if mode is TrackingMode.RWP else PageCategory.WRITTEN
        t0 = time.perf_counter()
        if mode is TrackingMode.RWP:
            uffd.set_mode(disable=Feature.RWP_ASYNC)  # the sync window opens before the scan
        seen = pm.scan(p.base, p.size, category_mask=category).page_indices(p.base, p.page_size)
        scan_ms = (time.perf_counter() - t0) * 1e3
        exact = np.array_equal(seen, hot)
        print(
            f"guest touched {len(hot)} pages; scan found {len(seen)} hot pages in"
            f" {scan_ms:.2f} ms ({'exact match' if exact else 'MISMATCH'})"
        )

        cold = np.setdiff1d(np.arange(p.npages), seen)
        tier: dict[int, bytes] = {}
        t0 = time.perf_counter()
        for page in cold.tolist():
            tier[page] = bytes(pread(p.memfd, p.page_size, p.offset(page)))
            punch_hole(p.memfd, p.offset(page), p.page_size)
            uffd.wake(p.addr(page), p.page_size)
        if mode is TrackingMode.RWP:
            uffd.set_mode(enable=Feature.RWP_ASYNC)
        evict_ms = (time.perf_counter() - t0) * 1e3
        resident = sum(e - s for s, e in data_ranges(p.memfd))
        print(
            f"evicted {len(cold)} cold pages in {evict_ms:.1f} ms;"
            f" resident {_mib(resident)} of {_mib(p.size)}"
        )

        def fetch(f: PageFault) -> None:
            page = (f.address - p.base) // p.page_size
            uffd.copy(p.addr(page), tier[page])

        t0 = time.perf_counter()
        rid = p.send("read", pages=list(range(p.npages)))
        faults = serve_faults(uffd, fetch, until=lambda: p.done(rid), timeout=120)
        p.wait(rid)
        fetch_s = time.perf_counter() - t0
        print(
            f"guest re-read all {p.npages} pages: {faults} fetch-back faults served in"
            f" {fetch_s:.2f} s; every page verified intact"
        )
        return 0 if exact and faults == len(cold) else 1
