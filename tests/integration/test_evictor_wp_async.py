"""Eviction in wp-async mode on the host kernel: no window, and still no write lost.

Linux 6.18 has no RWP, so these run natively.  The verified punch (take
references to the pages, punch, read their final bytes, put back any that
changed) must keep every write that lands between a page's read and its
punch.  One test places such writes deterministically; the hammers race a
real multi-threaded guest against an evictor that evicts everything idle for
one interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsd.daemon import Daemon
from wsd.evictor import Evictor, EvictorConfig, FaultService, VmContext
from wsd.storage import (
    FileStoreConfig,
    PageNamespace,
    PageStore,
    StorageConfig,
    ZstdStoreConfig,
    open_backend,
)
from wsd.testing.arming import track_puppet
from wsd.testing.hammer import AGGRESSIVE, free_huge_pages, hammer, hammer_daemon
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import serving_faults
from wsd.tracker.mode import TrackingMode
from wsd.tracker.state import Granularity

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
INTERVAL = 0.2


class WritesDuringSync:
    """A store whose ``sync`` lets the puppet write some pages first.

    ``sync`` is the last step before the commit punches: a write there lands
    after the pages were read and stored, and no scan sees it before the punch.
    """

    def __init__(self, inner: PageStore, puppet: PuppetVMM, pages: list[int]) -> None:
        self.inner = inner
        self.puppet = puppet
        self.pages = pages

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
        await self.inner.put(ns, pages, **kw)

    async def sync(self) -> None:
        await self.inner.sync()
        if self.pages:
            await asyncio.to_thread(self.puppet.call, "write", pages=self.pages, version=7)
            self.pages = []


async def test_a_write_between_the_read_and_the_punch_is_put_back(tmp_path: Path) -> None:
    with PuppetVMM.spawn(4 << 20) as puppet:
        tracker = track_puppet(puppet, vm_id="wp-race")
        store = await open_backend(FileStoreConfig(root=tmp_path / "pages"))
        try:
            assert tracker.mode is TrackingMode.WP_ASYNC
            await tracker.cycle()
            raced = [3, 4, 40, 41, 42, 100]
            ctx = VmContext(
                tracker.vm_id,
                tracker,
                WritesDuringSync(store, puppet, raced),  # type: ignore[arg-type]
                EvictorConfig(),
            )
            faults = FaultService(ctx, asyncio.ensure_future)
            pages = np.arange(0, 128, dtype=np.int64)
            done = await Evictor(ctx).evict_batch(0, tracker.regions[0], pages)
            assert done == len(pages) - len(raced)
            assert ctx.stats.raced_writes == len(raced)
            state = tracker.regions[0].state
            assert not state.evicted_mask(np.array(raced)).any()
            assert ctx.discards[0] >= set(raced)
            with serving_faults(tracker, faults) as unhandled:
                versions = await asyncio.to_thread(puppet.call, "read", pages=pages.tolist())
            assert not unhandled
            assert [p for p, v in enumerate(versions) if v == 7] == raced
            assert all(v == 0 for p, v in enumerate(versions) if p not in raced)
            # The raced pages never left the memfd; the others came back by fault.
            assert ctx.stats.fetched_pages == len(pages) - len(raced)
        finally:
            await store.close()
            tracker.close()


def wp_daemon(
    tmp_path: Path, storage: StorageConfig, evictor: EvictorConfig = AGGRESSIVE
) -> AbstractAsyncContextManager[Daemon]:
    return hammer_daemon(tmp_path, storage, evictor, interval=INTERVAL, mode=TrackingMode.WP_ASYNC)


async def test_nothing_lost_4k_shmem_wp_async(tmp_path: Path) -> None:
    async with wp_daemon(tmp_path, FileStoreConfig(root=tmp_path / "pages")) as d:
        c = await hammer(d, "wp-hammer-4k", "32M", 15, "--thp", "never", "--zipf-s", "1.3")
    assert c["mode"] == "wp-async" and c["granularity"] == str(Granularity.PAGE_4K)


@pytest.fixture
def huge_128m() -> Iterator[None]:
    with free_huge_pages(64) as free:
        if free < 64:
            pytest.skip(f"only {free} free 2 MiB huge pages, 64 needed (not root?)")
        yield


async def test_nothing_lost_hugetlb_wp_async(huge_128m: None, tmp_path: Path) -> None:
    cfg = AGGRESSIVE.model_copy(update={"rate_mb_per_second": 64.0})
    async with wp_daemon(tmp_path, ZstdStoreConfig(budget_bytes=512 << 20), cfg) as d:
        c = await hammer(d, "wp-hammer-2m", "128M", 15, "--hugetlb", "--zipf-s", "1.3")
    assert c["mode"] == "wp-async" and c["granularity"] == str(Granularity.HUGE_2M)
