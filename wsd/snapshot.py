"""What one tracked VM looks like right now, read from its session's live state.

``wsd status`` reports these numbers; they are the same ones the Prometheus
collector reads (``RegionState``, ``EvictorStats``, ``VmPolicy``), computed
the same way, so the two never disagree.  Take a snapshot on the daemon's
event loop: ``RegionState`` and ``VmPolicy`` are not safe to read from another
thread (see :mod:`wsd.metrics`).  Its working sets are counted when first
asked for, from what :meth:`RegionState.usage` took, in whichever thread
asks: a thread other than the loop, which serves faults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from wsd.daemon import Session
    from wsd.tracker.state import RegionUsage

__all__ = ["RegionSnapshot", "VmSnapshot", "WorkingSet", "hot_count", "vm_snapshot"]


def hot_count(packed: npt.NDArray[np.uint8]) -> int:
    """How many pages a packed hot bitmap (``Session.last_hot``) marks hot."""
    return int(np.bitwise_count(packed).sum())


@dataclass(frozen=True)
class WorkingSet:
    """Memory accessed within the last ``horizon`` intervals."""

    horizon: int
    bytes: int | None
    """None until ``horizon`` intervals were observed (it would under-count)."""
    window_seconds: float | None
    """The wall time those intervals spanned."""


@dataclass(frozen=True)
class RegionSnapshot:
    index: int
    granularity: str
    page_size: int
    guest_bytes: int
    resident_bytes: int
    evicted_bytes: int
    hot_bytes: int | None
    """Accessed in the last interval scanned; None before the first scan."""
    not_evicted_because: str | None
    """Why no page of this region is ever evicted, or None."""
    usage: RegionUsage = field(repr=False, compare=False)

    def working_set(self) -> tuple[WorkingSet, ...]:
        """By horizon; counts every page of the region the first time."""
        return tuple(
            WorkingSet(h, e.bytes, e.window_seconds)
            for h, e in sorted(self.usage.working_set().items())
        )


@dataclass(frozen=True)
class VmSnapshot:
    vm_id: str
    mode: str
    paused: bool
    """Eviction paused by an operator (``wsd vm pause``); tracking goes on."""
    regions: tuple[RegionSnapshot, ...]
    cycles: int
    refaults: int
    refaults_per_minute: float | None
    """Over the last minute; None while too little time has passed to say."""
    idle_threshold: int
    """Idle intervals a page needs before eviction (the promotion-rate guard moves it)."""
    evicted_bytes_total: int
    fetched_bytes_total: int

    def total(self, field: str) -> int | None:
        """A per-region byte count summed over regions; None if any region lacks it."""
        values = [getattr(r, field) for r in self.regions]
        return None if None in values else sum(values)

    def working_set(self) -> tuple[WorkingSet, ...]:
        """Per horizon, over all regions (bytes None unless every region has it)."""
        out = []
        by_region = [r.working_set() for r in self.regions]
        for estimates in zip(*by_region, strict=True):
            sizes = [e.bytes for e in estimates]
            windows = [e.window_seconds for e in estimates if e.window_seconds is not None]
            out.append(
                WorkingSet(
                    estimates[0].horizon,
                    None if None in sizes else sum(s or 0 for s in sizes),
                    max(windows, default=None),
                )
            )
        return tuple(out)


def vm_snapshot(session: Session, now: float) -> VmSnapshot:
    """``session`` as of ``now`` (the daemon's clock), taken on the event loop."""
    tracker, ctx = session.tracker, session.ctx
    regions = []
    for i, t in enumerate(tracker.regions):
        page_size = t.region.page_size
        state = t.state
        hot = None
        if i < len(session.last_hot):
            hot = hot_count(session.last_hot[i]) * page_size
        reasons = session.evictor.reasons
        regions.append(
            RegionSnapshot(
                index=i,
                granularity=str(state.granularity),
                page_size=page_size,
                guest_bytes=t.region.size,
                resident_bytes=state.resident_pages * page_size,
                evicted_bytes=state.evicted_pages * page_size,
                hot_bytes=hot,
                not_evicted_because=reasons[i] if i < len(reasons) else None,
                usage=state.usage(),
            )
        )
    return VmSnapshot(
        vm_id=session.vm_id,
        mode=str(tracker.mode),
        paused=session.paused,
        regions=tuple(regions),
        cycles=tracker.cycles,
        refaults=ctx.vm.refaults,
        refaults_per_minute=ctx.vm.refaults_per_minute(now),
        idle_threshold=ctx.vm.threshold,
        evicted_bytes_total=ctx.stats.evicted_bytes,
        fetched_bytes_total=ctx.stats.fetched_bytes,
    )
