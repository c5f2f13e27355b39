"""VmTracker on the host kernel: the hot set of each interval, exactly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from wsd.testing.arming import track_puppet
from wsd.testing.puppet_vmm import PuppetVMM

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_each_cycle_reports_exactly_that_intervals_writes() -> None:
    with PuppetVMM.spawn(32 << 20) as p:
        tracker = track_puppet(p)
        try:
            rng = np.random.default_rng(7)
            for version in (1, 2, 3):
                hot = np.sort(rng.choice(p.npages, p.npages // 10, replace=False))
                await asyncio.to_thread(p.call, "write", pages=hot.tolist(), version=version)
                (seen,) = await tracker.cycle()
                assert np.array_equal(np.flatnonzero(seen), hot), f"cycle {version}"
                wss = tracker.regions[0].state.working_set()
                assert wss[1].pages == len(hot)
            assert tracker.cycles == 3
            state = tracker.regions[0].state
            assert state.working_set()[4].pages is None, "4-interval WSS before 4 intervals"
            assert tracker.regions[0].resident().all()
        finally:
            tracker.close()
