"""A session that ends lets go of the VMM's memory: its later munmap must not hang.

With life events negotiated, a ``munmap`` of a registered range waits until
wsd reads the UNMAP event, and the VMM holds its own copy of the uffd.  A
session that ended without unregistering would leave every later munmap (a
VMM's exit path, a hot-unplug) blocked forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from wsd.daemon import Settings
from wsd.evictor import EvictorConfig
from wsd.storage import FileStoreConfig
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
SIZE = 4 << 20


async def test_after_wsd_stops_the_vmm_can_still_unmap_its_memory(tmp_path: Path) -> None:
    settings = Settings(
        socket=tmp_path / "wsd.sock",
        interval=0.1,
        storage=FileStoreConfig(root=tmp_path / "pages"),
        evictor=EvictorConfig(min_idle_cycles=1, max_idle_cycles=1, rate_mb_per_second=None),
        state_dir=tmp_path / "state",
    )
    p = None
    try:
        async with running_daemon(settings) as d:
            p = await asyncio.to_thread(PuppetVMM.spawn, SIZE, handoff=settings.socket, vm_id="rel")
            state = d.sessions["rel"].tracker.regions[0].state
            for _ in range(3000):
                if state.evicted_pages >= 256:
                    break
                await asyncio.sleep(0.01)
            assert state.evicted_pages >= 256
        # wsd stopped: every page was drained back, and the memory released.
        versions = await asyncio.to_thread(p.call, "read", pages=list(range(p.npages)))
        assert versions == [0] * p.npages
        await asyncio.to_thread(p.call, "unmap", timeout=10)
    finally:
        if p is not None:
            await asyncio.to_thread(p.close)
