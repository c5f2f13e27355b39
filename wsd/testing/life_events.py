"""Helpers shared by the life-event tests: on the host (wp-async) and in the 7.3 VM (rwp).

They run wsd's evictor pieces against a puppet VMM inside the test's event
loop (:func:`evictor_session`), or a whole daemon that evicts everything idle
for an interval (:func:`evicting_settings`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from wsd.daemon import Settings
from wsd.evictor import EvictorConfig
from wsd.evictor.context import VmContext
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import probe_kernel
from wsd.kernel.procfs import read_smaps, uffd_flags
from wsd.storage import FileStoreConfig
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.tracker.mode import choose_mode
from wsd.tracker.session import VmTracker
from wsd.vmm.protocol import Region, UffdSpec


def evictor_session(
    tracker: VmTracker, store: Any, state_dir: Path | None = None, **config: Any
) -> tuple[VmContext, FaultService, Evictor]:
    """The per-VM pieces the daemon builds for a session, minus its cycle task."""
    ctx = VmContext(tracker.vm_id, tracker, store, EvictorConfig(**config))
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    return ctx, FaultService(ctx, spawn), Evictor(ctx, state_dir=state_dir)


EVICT_IDLE_FOR_ONE_CYCLE: dict[str, Any] = {
    "min_idle_cycles": 1,
    "max_idle_cycles": 1,
    "rate_mb_per_second": None,
}
"""Evictor settings that take every page idle for one cycle, at no rate limit."""


def evicting_settings(tmp_path: Path, interval: float, **evictor: Any) -> Settings:
    """A daemon with a file tier that evicts every page idle for one interval."""
    return Settings(
        socket=tmp_path / "wsd.sock",
        interval=interval,
        storage=FileStoreConfig(root=tmp_path / "pages"),
        evictor=EvictorConfig(**(EVICT_IDLE_FOR_ONE_CYCLE | evictor)),
        state_dir=tmp_path / "state",
    )


def track_split(p: PuppetVMM, parts: int, vm_id: str = "puppet") -> VmTracker:
    """Track a puppet's memory as ``parts`` equal regions of its one memfd (DIMMs
    of one backing file), so one of them can be unplugged alone."""
    k = probe_kernel()
    step = p.size // parts
    regions = [
        (
            Region(
                guest_phys_addr=i * step,
                host_virt_addr=p.base + i * step,
                size=step,
                fd_index=1,
                offset=i * step,
                page_size=p.page_size,
            ),
            p.memfd,
        )
        for i in range(parts)
    ]
    return VmTracker.start(
        vm_id,
        vmm_pid=p.pid,
        spec=UffdSpec(),
        uffd_fd=os.dup(p.uffd_fd),
        regions=regions,
        decision=choose_mode(k),
        kernel=k,
    )


async def call(p: PuppetVMM, op: str, **args: Any) -> Any:
    """A puppet request, off the loop: the loop must stay free to read wsd's uffd."""
    return await asyncio.to_thread(p.call, op, **args)


async def evict(ev: Evictor, pages: range | list[int], region: int = 0) -> None:
    """Evict exactly ``pages`` of ``region`` now (the puppet must be quiescent)."""
    arr = np.array(sorted(pages), dtype=np.int64)
    assert await ev.evict_batch(region, ev.ctx.tracker.regions[region], arr) == len(arr)


async def wait_until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def uffd_vmflags(pid: int, start: int, length: int) -> set[str]:
    """The userfaultfd ``VmFlags`` (``um``, ``uw``, ...) of ``pid``'s mappings that
    overlap ``[start, start + length)``: empty once no uffd watches any of it."""
    return uffd_flags(read_smaps(pid), start, start + length)
