"""Eviction while the storage tier fails: pause, back off, say so once, resume.

A put or sync that fails (Redis down, a full disk) drops its batch with
nothing punched (:meth:`~wsd.evictor.evictor.Evictor._prepare`), so a failing
tier never costs a page.  Trying again at every interval would still read and
send whole batches to a tier that cannot take them and write a log line per
batch, so after a failed attempt the evictor sits out intervals, doubling the
gap up to :data:`MAX_BACKOFF_INTERVALS`.  The outage is logged once when it
starts (an error naming the tier's error) and once when a batch is stored
again; ``EvictorStats.storage_failing_since`` shows it in the metrics
meanwhile.

Faults on pages already evicted are not held back by this: each retries on
its own, with its own backoff (:meth:`~wsd.evictor.faults.FaultService._get`).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from wsd.storage import StorageError

from .context import VmContext

log = structlog.get_logger("wsd.evictor")

# The longest gap between two attempts to store pages while the tier fails,
# in tracking intervals (16 s at the default interval of 1 s).
MAX_BACKOFF_INTERVALS = 16


@dataclass
class StoreBackoff:
    """When the evictor may next try to store pages, after failures.

    An attempt is one prepare: :meth:`begin`, then any number of batches, each
    reported by :meth:`failed` or not, then :meth:`end` once it stored at least
    one batch.  It succeeds only if no batch failed: on a full disk the first
    batches of an attempt may fit in space just freed and the next one not, and
    that is still a full disk.
    """

    failures: int = 0
    """Consecutive attempts that failed (0: the store works)."""
    retry_at_cycle: int = 0
    """The first tracking cycle at which the next attempt may be made."""
    failed_now: bool = False
    """Whether the current attempt failed: it stops at its first failure."""

    def may_try(self, cycle: int) -> bool:
        return cycle >= self.retry_at_cycle

    def begin(self) -> None:
        self.failed_now = False

    def failed(self, ctx: VmContext, error: StorageError, **where: int) -> None:
        """A put, sync or discard failed: back off, and log it if the outage is new."""
        if self.failed_now:
            return  # the same attempt
        self.failed_now = True
        self.failures += 1
        gap = min(1 << min(self.failures - 1, 30), MAX_BACKOFF_INTERVALS)
        self.retry_at_cycle = ctx.tracker.cycles + gap
        if ctx.stats.storage_failing_since is None:
            ctx.stats.storage_failing_since = ctx.clock()
            log.error(
                "storage failing: eviction paused",
                vm_id=ctx.vm_id,
                backend=ctx.store.name if ctx.store is not None else None,
                error=str(error),
                retry=f"with backoff, at least every {MAX_BACKOFF_INTERVALS} intervals",
                **where,
            )
        else:
            log.debug(
                "storage still failing",
                vm_id=ctx.vm_id,
                error=str(error),
                failures=self.failures,
                retry_in_intervals=gap,
                **where,
            )

    def end(self, ctx: VmContext) -> None:
        """An attempt stored at least one batch: if none failed, any outage is over."""
        since = ctx.stats.storage_failing_since
        if self.failed_now:
            return
        failures, self.failures, self.retry_at_cycle = self.failures, 0, 0
        if since is None:
            return
        ctx.stats.storage_failing_since = None
        log.info(
            "storage works again: eviction resumed",
            vm_id=ctx.vm_id,
            paused_seconds=round(ctx.clock() - since, 1),
            failed_attempts=failures,
        )
