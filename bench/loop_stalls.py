"""How long a VM's session keeps wsd's event loop from serving faults, against the
kernel work it does.

    .venv/bin/python bench/loop_stalls.py [--size 4G] [--seconds 5] [--json]

Every guest's faults are read and served by the one event loop, so whatever runs
on it delays every other VM's faults.  A session does three kinds of kernel work
that grow with its guest:

* **hand-off**: arming the whole guest (``UFFDIO_WRITEPROTECT``, or ``RWPROTECT``
  on Linux 7.3);
* **cycles**: each interval's ``PAGEMAP_SCAN`` of the whole guest (and, in rwp
  mode, the re-arm), and every 16th cycle the ``SEEK_DATA``/``SEEK_HOLE`` walk of
  its memfds;
* **end**: closing the guest's memfds, which frees its memory once the VMM is gone.

and one that is not kernel work but grows with the guest too:

* **scrape**: a Prometheus scrape's working-set estimates and idle-age histogram,
  which count every page's age;
* **status**: a ``wsd status`` request, whose working sets count them too.

The baseline is that work alone, bare, in this process: on a second puppet VMM
of the same size, the arming ioctl and one scan through ``wsd.kernel`` (one ioctl
each, no tracker); on a memfd of the same size, populated with ``fallocate``, the
``SEEK_DATA``/``SEEK_HOLE`` walk and the ``close``; on a ``RegionState`` of the
same size, ``working_set()`` and ``age_histogram()``.  Then a daemon runs in this
process on uvloop, and a puppet VMM (``wsd.testing.puppet_vmm``, guest filled)
hands its memory over; a task on the daemon's loop sleeps 1 ms at a time and
records how late it wakes.  The worst lateness in each phase is the longest a
fault arriving then would have waited before the loop read it.  ``stall / op``
near 1 means the loop waited for the kernel work; near 0, that the work ran
beside it.

Phases: hand-off, from the puppet's start until its session exists; cycles,
``--seconds`` of tracking (interval 0.25 s) with no eviction; scrape, ``--scrapes``
scrapes from another thread, each after a cycle (so nothing is cached), of which
the longest time the collector held the loop is reported (the sleeper would see
the cycles' stalls too); status, as many ``status`` requests to the control
commands, each after a cycle, and the longest time one held the loop; end, from
the puppet's exit until wsd has closed everything (2 s of lingering included).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from wsd.control import Command, Request
from wsd.control import commands as control_commands
from wsd.control import status as control_status
from wsd.daemon import Settings
from wsd.kernel import (
    REGION_DTYPE,
    PageCategory,
    Pagemap,
    ScanFlag,
    Userfaultfd,
    data_ranges,
    memfd_create,
    probe_kernel,
)
from wsd.metrics import MetricsState, WsdCollector
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.running import running_daemon
from wsd.tracker.mode import TrackingMode, choose_mode
from wsd.tracker.session import REQUIRED
from wsd.tracker.state import Granularity, RegionState

INTERVAL = 0.25
PAGE = 4096


@dataclass
class Result:
    mode: str
    size: int
    arm_ms: float
    scan_ms: float
    walk_ms: float
    close_ms: float
    count_ms: float
    handoff_stall_ms: float
    cycle_stall_ms: float
    scrape_hold_ms: float
    status_hold_ms: float
    end_stall_ms: float
    cycles: int


def parse_size(text: str) -> int:
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def raw_kernel_work(size: int) -> tuple[float, float, float, float]:
    """ms of the bare arming ioctl, one scan, and the walk and close of a populated memfd."""
    decision = choose_mode(probe_kernel())
    p = PuppetVMM.spawn(size)
    try:
        uffd = Userfaultfd(os.dup(p.uffd_fd))
        pagemap = Pagemap.open(p.pid)
        try:
            uffd.api(REQUIRED[decision.mode])
            uffd.register(p.base, p.size, decision.register_mode)
            rwp = decision.mode is TrackingMode.RWP
            arm = uffd.rwprotect if rwp else uffd.writeprotect
            start = time.perf_counter()
            arm(p.base, p.size, protect=True)
            arm_ms = (time.perf_counter() - start) * 1e3
            vec = np.zeros(8192, dtype=REGION_DTYPE)
            if rwp:
                scan = functools.partial(pagemap.scan_calls, category_mask=PageCategory.ACCESSED)
            else:
                scan = functools.partial(
                    pagemap.scan_calls,
                    category_mask=PageCategory.WRITTEN,
                    flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                )
            start = time.perf_counter()
            for _ in scan(p.base, p.size, vec=vec):
                pass
            scan_ms = (time.perf_counter() - start) * 1e3
        finally:
            pagemap.close()
            uffd.close()
    finally:
        p.close()
    fd = memfd_create("loop-stalls", size=size)
    os.posix_fallocate(fd, 0, size)
    start = time.perf_counter()
    data_ranges(fd, 0, size)
    walk_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    os.close(fd)
    close_ms = (time.perf_counter() - start) * 1e3
    return arm_ms, scan_ms, walk_ms, close_ms


def raw_count(size: int) -> float:
    """ms of ``working_set()`` and ``age_histogram()`` of a fresh state of ``size``."""
    state = RegionState(size // PAGE, Granularity.PAGE_4K, started_at=0.0)
    start = time.perf_counter()
    state.working_set()
    state.age_histogram()
    return (time.perf_counter() - start) * 1e3


class Lateness:
    """The loop's worst lateness since the last :meth:`take`, from a 1 ms sleeper."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, (time.perf_counter() - start - 0.001) * 1e3)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


async def after_each_cycle(session: Any, times: int) -> AsyncIterator[None]:
    """``times`` times, right after a cycle changed the ages (so nothing is cached)."""
    for _ in range(times):
        seen = session.tracker.cycles
        while session.tracker.cycles == seen:
            await asyncio.sleep(0.01)
        yield


def timed(fn: Callable[..., Any], held: list[float]) -> Callable[..., Any]:
    """``fn``, appending each call's milliseconds to ``held``."""

    def wrapper(*args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            held.append((time.perf_counter() - start) * 1e3)

    return wrapper


async def measure_daemon(
    size: int, seconds: float, scrapes: int
) -> tuple[str, float, float, float, float, float, int]:
    work = Path(tempfile.mkdtemp(prefix="wsd-bench-"))
    async with running_daemon(Settings(socket=work / "wsd.sock", interval=INTERVAL)) as d:
        lateness = Lateness()
        ticker = asyncio.get_running_loop().create_task(lateness.run())
        await asyncio.sleep(0.2)
        lateness.take()
        spawn = functools.partial(PuppetVMM.spawn, size, handoff=d.settings.socket, vm_id="big")
        p = await asyncio.to_thread(spawn)
        handoff = lateness.take()
        session = d.sessions["big"]
        mode = str(session.tracker.mode)
        first = session.tracker.cycles
        await asyncio.sleep(seconds)
        cycles = session.tracker.cycles - first
        cycle = lateness.take()
        collector = WsdCollector(d, MetricsState())  # made on the loop: reads on it
        scrape_held: list[float] = []
        collector._families = timed(collector._families, scrape_held)  # type: ignore[method-assign]
        async for _ in after_each_cycle(session, scrapes):
            await asyncio.to_thread(lambda: list(collector.collect()))
        status_held: list[float] = []
        take = control_status.take_status  # commands.py calls it by its own name
        control_commands.take_status = timed(take, status_held)  # type: ignore[attr-defined]
        try:
            commands = control_commands.ControlCommands(d)
            async for _ in after_each_cycle(session, scrapes):
                await commands(Request(Command.STATUS))
        finally:
            control_commands.take_status = take  # type: ignore[attr-defined]
        lateness.take()
        await asyncio.to_thread(p.close)
        while d.sessions or d.draining:
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.5)  # the released uffd lingers 2 s, then everything is closed
        end = lateness.take()
        ticker.cancel()
    os.rmdir(work)
    return mode, handoff, cycle, max(scrape_held), max(status_held), end, cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4G", help="guest size (default 4G)")
    parser.add_argument("--seconds", type=float, default=5.0, help="of tracking cycles")
    parser.add_argument(
        "--scrapes", type=int, default=10, help="scrapes and status requests, each after a cycle"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size)
    arm, scan, walk, close = raw_kernel_work(size)
    count = raw_count(size)
    run = measure_daemon(size, args.seconds, args.scrapes)
    mode, handoff, cycle, scrape, status, end, cycles = uvloop.run(run)
    r = Result(
        mode, size, arm, scan, walk, close, count, handoff, cycle, scrape, status, end, cycles
    )
    if args.json:
        print(json.dumps(asdict(r), indent=2))
        return 0
    print(f"{mode}, guest {args.size}, {cycles} cycles in {args.seconds:g} s")
    print(f"{'phase':<9} {'op, bare':<22} {'loop stall max':>15} {'stall / op':>11}")
    for phase, op, ms, stall in (
        ("hand-off", "arm", arm, handoff),
        ("cycles", "scan", scan, cycle),
        ("", "walk", walk, cycle),
        ("scrape", "count", count, scrape),
        ("status", "count", count, status),
        ("end", "close", close, end),
    ):
        print(f"{phase:<9} {op:<6} {ms:9.1f} ms      {stall:12.1f} ms {stall / ms:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
