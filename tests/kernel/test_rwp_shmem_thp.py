"""RWP-FACTS fact 8: RWPROTECT zaps PMD-mapped shmem THP; MINOR co-registration traps it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from wsd.kernel import Feature, PageCategory, Pagemap, RegisterMode
from wsd.testing.arming import arm_rwp, track_puppet
from wsd.testing.faults import assert_no_message
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import serving_faults
from wsd.tracker.state import Granularity

SIZE = 8 << 20


def huge_pages(p: PuppetVMM) -> int:
    with Pagemap.open(p.pid) as pm:
        res = pm.scan(p.base, p.size, category_mask=PageCategory.HUGE)
    return res.page_count(4096)


def test_rwprotect_zaps_shmem_thp_silently(rwp_supported: Feature, shmem_thp_always: None) -> None:
    with PuppetVMM.spawn(SIZE) as p:
        assert huge_pages(p) > 0, "the guest memory is not PMD-mapped shmem THP"
        with arm_rwp(p, mode=RegisterMode.RWP | RegisterMode.MISSING) as uffd:
            uffd.set_mode(disable=Feature.RWP_ASYNC)
            # In sync mode an access to a protected 4 KiB page would block; on a
            # zapped THP it remaps silently: no message, the thread runs on.
            p.call("touch", pages=[1], write=False, timeout=20)
            assert_no_message(uffd)


@pytest.mark.asyncio
async def test_minor_coregistration_keeps_thp_pages_trackable(
    rwp_supported: Feature, shmem_thp_always: None
) -> None:
    with PuppetVMM.spawn(SIZE) as p:
        assert huge_pages(p) > 0
        tracker = track_puppet(p)
        try:
            with serving_faults(tracker) as unhandled:
                (t,) = tracker.regions
                assert t.minor and t.state.granularity is Granularity.PAGE_4K
                await tracker.cycle()
                hot = [1, 600, 1500]
                await asyncio.to_thread(p.call, "touch", pages=hot, write=False)
                (seen,) = await tracker.cycle()
                assert np.flatnonzero(seen).tolist() == hot
                assert tracker.minor_faults > 0, "the zapped THP was remapped without a MINOR fault"
                assert await asyncio.to_thread(p.call, "read", pages=hot) == [0, 0, 0]
                assert not unhandled, unhandled
        finally:
            tracker.close()
