"""Async helpers that run wsd's pieces inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

from wsd.daemon import Daemon, Settings
from wsd.evictor.events import on_event
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import PageFault
from wsd.tracker.session import VmTracker


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """A Daemon serving on ``settings.socket`` (and its other sockets) until the block ends."""
    d = Daemon(settings)
    task = asyncio.create_task(d.run())
    ready = asyncio.create_task(d.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        task.result()  # raises what stopped it
        raise RuntimeError("the daemon stopped before it was ready")
    try:
        yield d
    finally:
        d.stop()
        await task


@contextlib.contextmanager
def serving_faults(
    tracker: VmTracker, faults: FaultService | None = None, evictor: Evictor | None = None
) -> Iterator[list[PageFault]]:
    """Resolve the tracker's faults from the running loop, as the daemon does.

    With ``faults``, MISSING faults go to it (zero-fill or fetch-back); with
    ``evictor`` too, life events (REMOVE, UNMAP, REMAP) are handled.  Yields
    the list of faults nobody handled (should stay empty).
    """
    loop = asyncio.get_running_loop()
    unhandled: list[PageFault] = []

    def serve(msg: PageFault, read_at: float | None = None) -> None:
        if tracker.on_fault(msg):
            return
        if msg.is_missing and faults is not None:
            faults.on_missing(msg, read_at)
        elif not (msg.is_minor and faults is not None and faults.on_minor(msg, read_at)):
            unhandled.append(msg)

    def readable() -> None:
        for msg in tracker.uffd.read_messages():
            if not isinstance(msg, PageFault):
                if faults is not None and evictor is not None:
                    on_event(faults, evictor, msg)
                else:
                    unhandled.append(msg)  # type: ignore[arg-type]
            elif faults is None or not faults.waits_for_punch(msg, faults.ctx.clock()):
                serve(msg)

    if faults is not None:
        faults.ctx.in_flight.serve = serve
    loop.add_reader(tracker.uffd.fd, readable)
    try:
        yield unhandled
    finally:
        loop.remove_reader(tracker.uffd.fd)
        if faults is not None:
            faults.ctx.in_flight.serve = None


def wsd_cli(*args: str, timeout: float = 120.0) -> str:
    """Run ``python -m wsd ARGS`` as a user would; return its stdout, raise on failure."""
    return subprocess.run(
        [sys.executable, "-m", "wsd", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout
