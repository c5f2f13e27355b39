"""The pages a verified punch is working on off the event loop, and the faults that wait for them.

wp-async's verified punch of a chunk (:func:`.transaction.punch_held`: take
the pages' references, punch, read their final bytes back, digest them) costs
about 0.7 ms per 128 pages.  On the loop that delayed every fault of every VM
behind it, so it runs in a thread, and the loop serves faults meanwhile:
all but those on the chunk's own pages.  A MISSING fault there may be on a
hole the thread has just punched, which the page state does not yet call
evicted, so the fault service would zero-fill it; a MINOR fault may be on a
page the punch is about to drop.  Such a fault waits here, its vCPU blocked
in the kernel, until the chunk's outcome is applied on the loop
(:func:`.transaction.put_back`, the page state); then it is served like any
other, timed from when its message was read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import structlog

from wsd.kernel import PageFault

log = structlog.get_logger("wsd.evictor")

ServeFault = Callable[[PageFault, float], None]
"""Serve one fault read at the given clock time: the uffd reader's own path."""


class InFlight:
    """At most one chunk of one VM at a time: a VM's commit is sequential."""

    def __init__(self) -> None:
        self.serve: ServeFault | None = None
        """Set by whoever reads the uffd; without it nothing can have waited."""
        self._region = -1
        self._pages: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        self._waiting: list[tuple[PageFault, float]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def busy(self) -> bool:
        return self._region >= 0

    def hold(self, region: int, pages: npt.NDArray[np.int64]) -> None:
        """``pages`` (ascending) of ``region`` are about to leave the loop's hands."""
        if self.busy:
            raise RuntimeError(f"pages of region {self._region} are in flight already")
        self._region, self._pages = region, pages
        self._idle.clear()

    def holds(self, region: int, page: int) -> bool:
        if region != self._region:
            return False
        k = int(np.searchsorted(self._pages, page))
        return k < len(self._pages) and int(self._pages[k]) == page

    def wait(self, fault: PageFault, read_at: float) -> None:
        """Serve ``fault`` (on a page :meth:`holds`) once the chunk is settled."""
        self._waiting.append((fault, read_at))

    def release(self) -> None:
        """The chunk is settled: serve the faults that waited, in the order read."""
        waiting, self._waiting = self._waiting, []
        self._region, self._pages = -1, self._pages[:0]
        self._idle.set()
        serve = self.serve
        if serve is None:
            if waiting:
                log.error("faults waited on a punch, nobody serves them", faults=len(waiting))
            return
        for fault, read_at in waiting:
            try:
                serve(fault, read_at)
            except Exception:
                # The commit that released them must finish whatever happens.
                log.exception("serving a fault that waited on a punch failed")

    async def settled(self) -> None:
        """Return once no chunk is in flight."""
        await self._idle.wait()
