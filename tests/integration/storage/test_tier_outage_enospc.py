"""The file tier's disk fills up under a running guest while wsd evicts (host, wp-async).

The tier sits on a 4 MiB tmpfs and the guest has 32 MiB, so the disk fills
after about a thousand pages; from then on another writer takes every block
that frees up.  Eviction pauses with one error naming ENOSPC, no page whose
write failed is punched, faults on the pages evicted before are served all
along, and once the writer's file is gone and the tmpfs grown, eviction
resumes by itself.  The guest checks every page it reads and, at exit, every
page.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wsd.evictor.outage import MAX_BACKOFF_INTERVALS
from wsd.storage import FileStoreConfig, PageNamespace, StorageFull
from wsd.storage.file_store import FileStore
from wsd.testing.outage import (
    INTERVAL,
    OUTAGE_EVICTOR,
    PAUSED,
    RESUMED,
    assert_nothing_lost,
    check_punched_pages_are_stored,
    evicted_now,
    outage_daemon,
    start_outage_guest,
    stop_guest,
    vm_metrics,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

VM = "disk-full"
SMALL = "4m"
GROWN = "64m"
FULL_SECONDS = 4.0
PAGE = 4096


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, CAP_SYS_ADMIN), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    result = _mount("-t", "tmpfs", "-o", f"size={SMALL},mode=0700", "wsd-outage", str(mountpoint))
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def keep_full(path: Path, stop: asyncio.Event) -> None:
    """Another writer: takes every block that frees up (pages fetched back free theirs).

    On the daemon's loop, so it also runs between the discards and the puts of
    an eviction attempt, while the pages are read in a thread.
    """
    with path.open("ab", buffering=0) as f:
        while not stop.is_set():
            with suppress(OSError):  # ENOSPC: nothing left to take
                while True:
                    f.write(bytes(PAGE))
            await asyncio.sleep(0.002)


async def test_disk_full_stops_eviction_punches_nothing_unstored_and_resumes(
    small_disk: Path, tmp_path: Path
) -> None:
    storage = FileStoreConfig(root=small_disk / "pages")
    capacity = int(SMALL[:-1]) << 20
    with capture_logs() as logs:
        async with outage_daemon(tmp_path, storage) as d:
            guest = await start_outage_guest(d, VM)
            try:
                s = d.sessions[VM]
                stats = s.ctx.stats
                await wait_until(
                    lambda: stats.storage_failing_since is not None,
                    60,
                    "the disk filled up and eviction paused",
                    guest=guest,
                    session=s,
                )
                ballast = small_disk / "ballast"
                stop_filling = asyncio.Event()
                filler = asyncio.create_task(keep_full(ballast, stop_filling))
                try:
                    paused = [e for e in logs if e["event"] == PAUSED]
                    assert len(paused) == 1 and paused[0]["vm_id"] == VM, paused
                    assert "No space left on device" in paused[0]["error"], paused[0]
                    m = await vm_metrics(d, VM)
                    assert m["wsd_evict_storage_failing"] == 1
                    assert m["wsd_evict_failed_batches_total"] >= 1

                    # Full: retries after 1, 2, 4, ... intervals, each failing.  Faults on
                    # the pages evicted before are served all along.  (Maybe none is out by
                    # now: the guest touches all of its memory within a second or two.)
                    evicted_when_full = evicted_now(s)
                    fetched_before = stats.fetched_pages
                    failed_before = stats.failed_batches
                    evicted_before = stats.evicted_pages
                    await asyncio.sleep(FULL_SECONDS)
                    assert stats.storage_failing_since is not None, "resumed on a full disk"
                    assert 2 <= s.evictor.backoff.failures <= 6, s.evictor.backoff
                    assert stats.failed_batches > failed_before, "no retry failed"
                    # At most a batch per retry fits in space freed just before it.
                    assert stats.evicted_pages - evicted_before <= 6 * OUTAGE_EVICTOR.batch_pages
                    # That guest touches every page within seconds: pages still out and
                    # none fetched back would be faults left waiting.
                    await wait_until(
                        lambda: stats.fetched_pages > fetched_before or evicted_now(s) == 0,
                        10,
                        "faults served on the full disk",
                        guest=guest,
                        session=s,
                    )
                    assert stats.fetch_errors == 0
                    stored_still_full = await check_punched_pages_are_stored(d, VM)
                    assert stored_still_full * PAGE < capacity
                finally:
                    stop_filling.set()
                    await filler

                # -- space comes back ---------------------------------------------------
                ballast.unlink()
                grown = _mount("-o", f"remount,size={GROWN}", str(small_disk))
                assert grown.returncode == 0, grown.stderr
                await wait_until(
                    lambda: stats.storage_failing_since is None,
                    (MAX_BACKOFF_INTERVALS + 5) * INTERVAL + 10,
                    "eviction resumed",
                )
                resumed = [e for e in logs if e["event"] == RESUMED]
                assert len(resumed) == 1 and resumed[0]["vm_id"] == VM, resumed
                paused = [e for e in logs if e["event"] == PAUSED]
                assert len(paused) == 1, paused
                # More than the old disk could hold, as wsd_store_pages shows it, once
                # the guest is idle.  While its writers run, how many of its 8,192
                # pages stay cold depends on how fast they go: on a quiet host, fewer
                # than the old disk's 1,024 (4 failures in 4 runs, about 650 stored).
                snapshot = d.metrics_state
                with guest.suspended():
                    await wait_until(
                        lambda: (
                            snapshot.store_stats is not None
                            and (snapshot.store_stats.pages or 0) * PAGE > capacity
                        ),
                        60,
                        f"more than {SMALL} stored",
                        session=s,
                    )
                stored_after = await check_punched_pages_are_stored(d, VM)
                m = await vm_metrics(d, VM)
                assert m["wsd_evict_storage_failing"] == 0

                report = await stop_guest(s, guest)
            finally:
                guest.close()
            await wait_until(lambda: VM not in d.sessions, 60, "the session drained")
            left = await d.store.stats() if d.store is not None else None
    print(
        f"\n{VM}: evicted when full {evicted_when_full}, stored while full {stored_still_full}, "
        f"after {stored_after}, "
        f"evicted {stats.evicted_pages}, fetched {stats.fetched_pages}, failed batches "
        f"{stats.failed_batches}, guest ops {report['ops']}"
    )
    assert_nothing_lost(report, stats)
    assert left is not None and left.pages == 0


async def test_a_put_that_fails_on_a_full_disk_leaves_no_blocks_behind(small_disk: Path) -> None:
    """Its entries are cleared and its data blocks freed: the space discards make is usable."""
    store = await FileStore.open(FileStoreConfig(root=small_disk / "pages"))
    ns = PageNamespace("vm-full", 0)
    stored: list[int] = []
    try:
        for n in itertools.count():
            batch = {(n * 64 + k) * PAGE: os.urandom(PAGE) for k in range(64)}
            try:
                await store.put(ns, batch, generation=1)
                await store.sync()
            except StorageFull:
                break
            stored += batch
        # ENOSPC: not a block left.
        with (small_disk / "ballast").open("wb", buffering=0) as ballast, suppress(OSError):
            while True:
                ballast.write(bytes(PAGE))
        await store.discard(ns, stored[:32])  # 128 KiB free again
        free = os.statvfs(small_disk).f_bfree
        with pytest.raises(StorageFull):  # 256 KiB: does not fit
            await store.put(
                ns, {(1 << 26) + k * PAGE: os.urandom(PAGE) for k in range(64)}, generation=1
            )
        assert os.statvfs(small_disk).f_bfree >= free - 1
        # What fits still fits.
        await store.put(
            ns, {(2 << 26) + k * PAGE: os.urandom(PAGE) for k in range(16)}, generation=1
        )
        await store.sync()
    finally:
        await store.close()
