"""Async helpers that run wsd's pieces inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

from wsd.daemon import Daemon, Settings
from wsd.kernel import PageFault
from wsd.tracker.session import VmTracker


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """A Daemon serving on ``settings.socket`` until the block ends."""
    d = Daemon(settings)
    task = asyncio.create_task(d.run())
    while not settings.socket.exists():
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    try:
        yield d
    finally:
        d.stop()
        await task


@contextlib.contextmanager
def serving_faults(tracker: VmTracker) -> Iterator[list[PageFault]]:
    """Resolve the tracker's faults from the running loop, as the daemon does.

    Yields the list of faults the tracker did not handle (should stay empty).
    """
    loop = asyncio.get_running_loop()
    unhandled: list[PageFault] = []

    def readable() -> None:
        for msg in tracker.uffd.read_messages():
            if not (isinstance(msg, PageFault) and tracker.on_fault(msg)):
                unhandled.append(msg)  # type: ignore[arg-type]

    loop.add_reader(tracker.uffd.fd, readable)
    try:
        yield unhandled
    finally:
        loop.remove_reader(tracker.uffd.fd)


def wsd_cli(*args: str, timeout: float = 120.0) -> str:
    """Run ``python -m wsd ARGS`` as a user would; return its stdout, raise on failure."""
    return subprocess.run(
        [sys.executable, "-m", "wsd", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout
