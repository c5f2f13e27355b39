"""The "nothing lost" hammer: ``wsd guest`` writers against a daemon evicting hard.

The guest's threads read and write self-verifying pages (every access checks
the page holds exactly the version last written) while wsd evicts every page
idle for a single interval, so pages in the middle of eviction get touched all
the time.  At the end the guest stops cleanly and re-reads every page,
fetching back whatever is still evicted.  Used by the rwp tests in the 7.3 VM
and by the wp-async tests on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from wsd.daemon import Daemon, Settings
from wsd.evictor import EvictorConfig
from wsd.evictor.context import EvictorStats
from wsd.guest.process import GuestProcess
from wsd.storage import StorageConfig
from wsd.testing.running import running_daemon
from wsd.tracker.mode import TrackingMode

# Evict anything idle for one interval.  Windows stay small so that, under
# TCG, eviction does not starve the guest of the CPU; prefetch keeps the final
# sequential check of every page from taking one fault per evicted page.
AGGRESSIVE = EvictorConfig(
    min_idle_cycles=1,
    max_idle_cycles=1,
    max_pages_per_window=1024,
    batch_pages=128,
    rate_mb_per_second=None,
    promotion_target_percent_per_minute=None,
    prefetch_pages=8,
    allow_volatile_store=True,
)


# Writers that keep pages in the middle of eviction busy: 3 threads, half of
# the accesses writes, Zipf-skewed so that cold pages are many and still
# touched now and then.
ZIPF_WRITERS = ("--threads", "3", "--pattern", "zipf", "--write-ratio", "0.5")
# The same with a steep skew and 4 KiB pages only (no shmem THP).
STEEP_4K = (*ZIPF_WRITERS, "--zipf-s", "1.3", "--thp", "never")


@contextlib.asynccontextmanager
async def hammer_daemon(
    tmp_path: Path,
    storage: StorageConfig,
    evictor: EvictorConfig = AGGRESSIVE,
    *,
    interval: float,
    mode: TrackingMode,
) -> AsyncIterator[Daemon]:
    """A daemon evicting into ``storage`` with a state directory; it must run in ``mode``."""
    settings = Settings(
        socket=tmp_path / "wsd.sock",
        interval=interval,
        storage=storage,
        evictor=evictor,
        state_dir=tmp_path / "state",
    )
    async with running_daemon(settings) as d:
        assert d.decision.mode is mode, d.decision
        yield d


# How much longer than asked a hammer may run for its first eviction and fetch.
SLOW_MACHINE_SECONDS = 120.0


async def start_guest(d: Daemon, *args: str) -> GuestProcess:
    argv = ["--socket", str(d.settings.socket), *args]
    return await asyncio.to_thread(functools.partial(GuestProcess.start, argv, ready_timeout=300))


async def hammer(
    d: Daemon,
    vm_id: str,
    size: str,
    seconds: float,
    *args: str,
    until: Callable[[EvictorStats], bool] | None = None,
) -> dict[str, Any]:
    """Run a Zipf guest with 3 writer threads for ``seconds``; check it lost nothing.

    After ``seconds`` it runs on until pages went out and came back and
    ``until`` (say, that an access raced an eviction) holds, for at most
    :data:`SLOW_MACHINE_SECONDS`.  Returns what happened, for the caller's
    mode-specific checks.
    """
    guest = await start_guest(
        d,
        "--vm-id",
        vm_id,
        "--size",
        size,
        *ZIPF_WRITERS,
        *args,
    )
    try:
        s = d.sessions[vm_id]
        stats = s.ctx.stats
        tracker = s.tracker
        await asyncio.sleep(seconds)
        # At least ``seconds``, and on until pages went out and came back: on a
        # loaded machine, under TCG, the first cycles can take seconds each,
        # and a race with an eviction window may take a few of them.
        for _ in range(int(SLOW_MACHINE_SECONDS / 0.5)):
            if stats.evicted_pages and stats.fetched_pages and (until is None or until(stats)):
                break
            await asyncio.sleep(0.5)
        tm = s.timings
        assert stats.evicted_pages > 0, (
            f"nothing was evicted in {tracker.cycles} cycles "
            f"(scan {tm.scan.sum:.1f} s, window {tm.window.sum:.1f} s, "
            f"cycle {tm.cycle.sum:.1f} s in all): {stats}; the guest: {guest.stderr()}"
        )
        # Stop evicting before the guest's final check reads every page back:
        # under TCG, evicting what the check just read would make it crawl.
        s.ctx.config = s.ctx.config.model_copy(update={"enabled": False})
        assert await asyncio.to_thread(guest.stop, 300) == 0, guest.stderr()
    finally:
        guest.close()
    report = guest.report()
    assert report["verify_errors"] == 0 and report["unverified"] == 0
    assert report["final_check_pages"] == report["pages"]
    counts = {
        "mode": str(tracker.mode),
        "granularity": str(tracker.regions[0].state.granularity),
        "guest_ops": report["ops"],
        "guest_writes": report["writes"],
        "pages_verified_at_exit": report["final_check_pages"],
        "evicted": stats.evicted_pages,
        "fetched": stats.fetched_pages,
        "prefetched": stats.prefetched_pages,
        "touched_in_window_not_evicted": stats.skipped_touched,
        "raced_writes_put_back": stats.raced_writes,
        "unseen_writes_kept": stats.unseen_writes,
        "rwp_faults_in_window": tracker.sync_faults,
        "minor_faults": tracker.minor_faults,
        "windows": stats.windows,
    }
    print(f"\n{vm_id}: {counts}")
    assert stats.fetched_pages > 0, "no evicted page was ever touched again"
    return counts


HUGE_FREE = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def free_huge_pages(wanted: int, *, exactly: bool = False) -> Iterator[int]:
    """Make ``wanted`` 2 MiB pages free (``exactly``: no more) if we may (root),
    restoring the pool after.

    Yields how many are free, which may still be fewer than ``wanted``.
    """
    before = int(NR_HUGEPAGES.read_text())
    free = int(HUGE_FREE.read_text())
    target = before - free + wanted if exactly or free < wanted else before
    resized = target != before and os.access(NR_HUGEPAGES, os.W_OK)
    if resized:
        NR_HUGEPAGES.write_text(f"{target}\n")
    try:
        yield int(HUGE_FREE.read_text())
    finally:
        if resized:
            NR_HUGEPAGES.write_text(f"{before}\n")
