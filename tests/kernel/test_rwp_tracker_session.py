"""VmTracker in rwp mode: exact hot sets per cycle, sync-window faults resolved."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from wsd.kernel import Feature
from wsd.testing.arming import track_puppet
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import serving_faults
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import VmTracker
from wsd.tracker.state import Granularity

pytestmark = pytest.mark.asyncio


async def test_rwp_cycles(rwp_supported: Feature) -> None:
    with PuppetVMM.spawn(32 << 20) as p:
        tracker = track_puppet(p)
        try:
            with serving_faults(tracker) as unhandled:
                assert tracker.mode is TrackingMode.RWP
                rng = np.random.default_rng(11)
                for _ in range(3):
                    hot = np.sort(rng.choice(p.npages, p.npages // 10, replace=False))
                    await asyncio.to_thread(p.call, "touch", pages=hot[::2].tolist(), write=False)
                    await asyncio.to_thread(p.call, "touch", pages=hot[1::2].tolist(), write=True)
                    (seen,) = await tracker.cycle()
                    assert np.array_equal(np.flatnonzero(seen), hot)
                    assert tracker.regions[0].state.working_set()[1].pages == len(hot)

                async def touch_during_window(
                    t: VmTracker, hot: list[npt.NDArray[np.bool_]]
                ) -> None:
                    rid = p.send("touch", pages=[5, 6], write=True)
                    for _ in range(3000):
                        if p.done(rid):
                            break
                        await asyncio.sleep(0.01)
                    p.wait(rid, timeout=1)

                await tracker.cycle(touch_during_window)
                assert tracker.sync_faults == 2
                assert tracker.regions[0].state.faults == 2
                (seen,) = await tracker.cycle()
                assert not seen.any(), "the window's faults leaked into the next interval"
                assert await asyncio.to_thread(p.call, "read", pages=[5, 6]) == [0, 0]
                assert not unhandled, unhandled
        finally:
            tracker.close()


async def test_hugetlb_region_is_tracked_per_2m(rwp_supported: Feature, hugepages: int) -> None:
    with PuppetVMM.spawn(4 << 21, page_size=2 << 20) as p:
        tracker = track_puppet(p)
        try:
            (t,) = tracker.regions
            assert t.state.granularity is Granularity.HUGE_2M and t.state.npages == 4
            await asyncio.to_thread(p.call, "touch", pages=[2], write=False)
            (seen,) = await tracker.cycle()
            assert np.flatnonzero(seen).tolist() == [2]
        finally:
            tracker.close()
