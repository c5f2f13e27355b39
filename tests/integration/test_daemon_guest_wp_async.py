"""The daemon and ``wsd guest`` as separate processes on the host kernel (wp-async).

wp-async sees writes only, so the guest writes its hot set.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from wsd.daemon import Daemon, Settings
from wsd.guest.process import GuestProcess
from wsd.testing.running import running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(Settings(socket=tmp_path / "wsd.sock", interval=0.5)) as d:
        yield d


async def test_written_hot_set_matches_the_guest_exactly(daemon: Daemon) -> None:
    argv = [
        "--socket",
        str(daemon.settings.socket),
        "--vm-id",
        "g",
        "--size",
        "64M",
        "--hot",
        "0.1",
        "--pattern",
        "uniform",
        "--write-ratio",
        "1",
    ]
    guest = await asyncio.to_thread(functools.partial(GuestProcess.start, argv))
    try:
        truth = np.sort(guest.truth()[0].hot)
        s = daemon.sessions["g"]
        for _ in range(3):
            target = s.tracker.cycles + 2
            while s.tracker.cycles < target:
                await asyncio.sleep(0.05)
            assert np.array_equal(s.hot_pages(0), truth)
    finally:
        # Off the loop: the guest's munmap at exit waits for wsd (this loop)
        # to read its UNMAP event.
        assert await asyncio.to_thread(guest.stop) == 0, guest.stderr()
        guest.close()
    assert guest.report()["verify_errors"] == 0
