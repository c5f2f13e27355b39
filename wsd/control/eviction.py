"""An operator's one-shot eviction (``wsd vm evict``), carried through two cycles.

The daemon's cycle task drives it, so it follows the evictor's own two
phases and needs no extra safety argument: after a cycle, instead of the
usual :meth:`~wsd.evictor.evictor.Evictor.prepare`, :meth:`EvictionRequest.prepare`
stores the pages idle in the last interval
(:meth:`~wsd.evictor.evictor.Evictor.prepare_idle`); the next cycle's window commits
them as it commits any prepared batch; then :meth:`EvictionRequest.committed`
answers with what that commit evicted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from wsd.evictor.context import EvictorStats
from wsd.evictor.evictor import Evictor

from .protocol import ControlError, ErrorCode

__all__ = ["EvictionRequest"]


@dataclass
class EvictionRequest:
    vm_id: str
    max_bytes: int | None
    done: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    prepared_bytes: int | None = None
    """Bytes stored for the next commit; None until :meth:`prepare` ran."""
    _before: tuple[int, int, int] = (0, 0, 0)

    @property
    def prepared(self) -> bool:
        return self.prepared_bytes is not None

    async def prepare(self, evictor: Evictor) -> None:
        """Store the pages to evict; answer at once when there are none."""
        stats = evictor.ctx.stats
        self._before = (stats.evicted_pages, stats.evicted_bytes, stats.skipped_touched)
        self.prepared_bytes = await evictor.prepare_idle(self.max_bytes)
        if self.prepared_bytes == 0:
            self.committed(stats)

    def committed(self, stats: EvictorStats) -> None:
        """The commit after :meth:`prepare` has run: answer with what it evicted."""
        pages, nbytes, skipped = self._before
        self._answer(
            {
                "vm_id": self.vm_id,
                "max_bytes": self.max_bytes,
                "prepared_bytes": self.prepared_bytes or 0,
                "evicted_pages": stats.evicted_pages - pages,
                "evicted_bytes": stats.evicted_bytes - nbytes,
                "skipped_touched_pages": stats.skipped_touched - skipped,
            }
        )

    def abandon(self, why: str) -> None:
        """The session ended first: nothing more will be evicted for this request."""
        if not self.done.done():
            self.done.set_exception(ControlError(ErrorCode.SESSION_ENDED, why))
            # Nobody may be waiting any more (the client went away).
            self.done.exception()

    def _answer(self, result: dict[str, Any]) -> None:
        if not self.done.done():
            self.done.set_result(result)
