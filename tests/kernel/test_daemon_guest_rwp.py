"""wsd's daemon and ``wsd guest`` as separate processes, in rwp mode on Linux 7.3.

The guest touches exactly its hot set (10% of 256 MiB) over and over; every
tracking interval must then report exactly that set, and after the guest
moves its hot set the 1-interval WSS must match the new set within 1%.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from wsd.daemon import Daemon, Session, Settings
from wsd.guest.process import GuestProcess
from wsd.kernel import Feature
from wsd.testing.running import running_daemon
from wsd.tracker.mode import TrackingMode

pytestmark = pytest.mark.asyncio
INTERVAL = 1.0


@pytest_asyncio.fixture
async def daemon(rwp_supported: Feature, tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(Settings(socket=tmp_path / "wsd.sock", interval=INTERVAL)) as d:
        assert d.decision.mode is TrackingMode.RWP
        yield d


async def start_guest(d: Daemon, *args: str) -> GuestProcess:
    argv = ["--socket", str(d.settings.socket), "--size", "256M", "--hot", "0.1", *args]
    return await asyncio.to_thread(functools.partial(GuestProcess.start, argv, ready_timeout=300))


async def next_cycle(s: Session) -> None:
    """Wait for a cycle that began after now, so its whole interval is in the future."""
    target = s.tracker.cycles + 2
    for _ in range(int(60 / 0.05)):
        if s.tracker.cycles >= target:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the tracker stopped cycling")


async def test_hot_set_matches_the_guest_exactly(daemon: Daemon) -> None:
    guest = await start_guest(daemon, "--vm-id", "g-uniform", "--pattern", "uniform")
    try:
        assert guest.ready and guest.ready.handoff and guest.ready.handoff["mode"] == "rwp"
        truth = guest.truth()[0].hot
        s = daemon.sessions["g-uniform"]
        for _ in range(3):
            await next_cycle(s)
            seen = s.hot_pages(0)
            assert len(seen) == len(truth) and np.array_equal(seen, np.sort(truth))
        wss = s.tracker.regions[0].state.working_set()
        assert wss[1].pages == len(truth)
    finally:
        # Off the loop: the guest's munmap at exit waits for wsd (this loop)
        # to read its UNMAP event.
        assert await asyncio.to_thread(guest.stop) == 0, guest.stderr()
        guest.close()
    assert guest.report()["verify_errors"] == 0


async def test_wss_follows_a_phase_change(daemon: Daemon) -> None:
    guest = await start_guest(
        daemon, "--vm-id", "g-phases", "--pattern", "phases", "--phase-seconds", "8"
    )
    try:
        s = daemon.sessions["g-phases"]
        for _ in range(int(120 / 0.5)):
            if len(guest.truth()) >= 2:
                break
            await asyncio.sleep(0.5)
        new = guest.truth()[1]
        await next_cycle(s)  # an interval entirely inside the new phase
        state = s.tracker.regions[0].state
        wss1 = state.working_set()[1].pages
        assert wss1 is not None
        assert abs(wss1 - len(new.hot)) <= 0.01 * len(new.hot), (wss1, len(new.hot))
        assert np.array_equal(s.hot_pages(0), np.sort(new.hot))
    finally:
        await asyncio.to_thread(guest.stop)
        guest.close()
