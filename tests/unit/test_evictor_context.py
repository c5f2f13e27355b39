"""The evictor's per-VM context as a session starts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np

from wsd.evictor import EvictorConfig
from wsd.evictor.context import VmContext
from wsd.tracker.session import TrackedRegion, VmTracker
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region

PAGE = 4096


def tracked(index: int, pages: int, listed_resident: list[int]) -> TrackedRegion:
    region = Region(
        guest_phys_addr=index * pages * PAGE,
        host_virt_addr=0x7F0000000000 + index * pages * PAGE,
        size=pages * PAGE,
        fd_index=0,
        page_size=PAGE,
        offset=index * pages * PAGE,
    )
    state = RegionState(pages, Granularity.PAGE_4K, started_at=0.0)
    return TrackedRegion(region, -1, state, listed_resident=np.array(listed_resident, np.int64))


def test_a_resumed_session_starts_by_discarding_the_stale_copies_of_listed_resident_pages() -> None:
    tracker = SimpleNamespace(regions=[tracked(0, 8, [2, 5]), tracked(1, 8, [])])
    ctx = VmContext("vm", cast(VmTracker, tracker), None, EvictorConfig())
    assert ctx.discards == [{2, 5}, set()]
    # Taken once: the region does not keep a guest-sized list for the session's life.
    assert all(len(t.listed_resident) == 0 for t in tracker.regions)
