"""Which cold pages to evict, and how many: pure policy, no I/O, no clock of its own.

Per region, two uint8 arrays beside the tracker's state (2 bytes per page):

``penalty``
    Extra idle cycles a page must wait before its next eviction.  An early
    refault (fetched back within ``refault_window_cycles`` of its eviction)
    doubles it (at least ``refault_penalty_cycles``); each later eviction
    halves it.  Hysteresis for pages with a long reuse distance.
``evicted_at``
    The tracker cycle (modulo 256) of the page's last eviction, to tell an
    early refault from a late one.

Per VM, the idle threshold adapts (the promotion-rate guard of far-memory
systems): while refaults per minute exceed the configured percentage of the
working set it rises by a quarter per cycle, up to ``max_idle_cycles``; while
they stay under half the target it falls back by one per cycle to
``min_idle_cycles``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from wsd.tracker.state import MAX_AGE, RegionState

from .config import EvictorConfig

# Refault rate is judged over this window (seconds), or over the time since the
# VM started when that is shorter but at least GUARD_MIN_SECONDS: a handful of
# refaults in the first seconds says little.
GUARD_WINDOW = 60.0
GUARD_MIN_SECONDS = 10.0


class RegionPolicy:
    """Eviction history of one region's pages."""

    def __init__(self, npages: int) -> None:
        self.penalty = np.zeros(npages, dtype=np.uint8)
        self.evicted_at = np.zeros(npages, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self.penalty.nbytes + self.evicted_at.nbytes

    def note_evicted(self, pages: npt.NDArray[np.int64], cycle: int) -> None:
        self.evicted_at[pages] = cycle & 0xFF
        self.penalty[pages] >>= 1

    def note_refault(self, page: int, cycle: int, config: EvictorConfig) -> bool:
        """A demand fetch of ``page``; True if it came back too early (penalised)."""
        since = (cycle - int(self.evicted_at[page])) & 0xFF
        if since >= config.refault_window_cycles:
            return False
        doubled = max(config.refault_penalty_cycles, 2 * int(self.penalty[page]))
        self.penalty[page] = min(MAX_AGE, doubled)
        return True


@dataclass
class VmPolicy:
    """The adaptive idle threshold, the rate budget and the refault log of one VM."""

    config: EvictorConfig
    started_at: float
    threshold: int = 0
    refaults: int = 0
    early_refaults: int = 0
    _refault_log: deque[tuple[float, int]] = field(default_factory=deque)
    _budget_at: float | None = None

    def __post_init__(self) -> None:
        self.threshold = self.config.min_idle_cycles
        self._budget_at = self.started_at

    def reconfigure(self, config: EvictorConfig) -> None:
        """A reloaded config: keep the learned threshold within the new bounds."""
        self.config = config
        self.threshold = min(max(self.threshold, config.min_idle_cycles), config.max_idle_cycles)

    def note_refaults(self, now: float, count: int = 1) -> None:
        self.refaults += count
        log = self._refault_log
        if log and log[-1][0] == now:
            log[-1] = (now, log[-1][1] + count)
        else:
            log.append((now, count))

    def refaults_per_minute(self, now: float) -> float | None:
        """Over the last minute, or None while too little time has passed to say."""
        log = self._refault_log
        while log and log[0][0] < now - GUARD_WINDOW:
            log.popleft()
        span = min(GUARD_WINDOW, now - self.started_at)
        if span < GUARD_MIN_SECONDS:
            return None
        return sum(n for _, n in log) * 60.0 / span

    def adapt(self, now: float, working_set_pages: int) -> int:
        """Move the idle threshold toward keeping refaults under the target; the new value."""
        target = self.config.promotion_target_percent_per_minute
        rate = self.refaults_per_minute(now)
        if target is None or rate is None:
            return self.threshold
        percent = 100.0 * rate / max(working_set_pages, 1)
        if percent > target:
            step = max(1, self.threshold // 4)
            self.threshold = min(self.config.max_idle_cycles, self.threshold + step)
        elif percent < target / 2:
            self.threshold = max(self.config.min_idle_cycles, self.threshold - 1)
        return self.threshold

    def byte_budget(self, now: float) -> int | None:
        """Bytes the rate limit allows in this window (accrued since the last one)."""
        rate = self.config.rate_mb_per_second
        since = self._budget_at if self._budget_at is not None else now
        self._budget_at = now
        if rate is None:
            return None
        # Accrue at most 10 s: a VM that was idle does not earn a burst.
        return int(rate * 1e6 * min(max(now - since, 0.0), 10.0))

    def refund(self, now: float, unused_bytes: int) -> None:
        """Give back budget a window did not use (fewer cold pages than allowed)."""
        rate = self.config.rate_mb_per_second
        if rate is not None and unused_bytes > 0 and self._budget_at is not None:
            self._budget_at -= min(unused_bytes / (rate * 1e6), 10.0)


def select(
    state: RegionState,
    policy: RegionPolicy,
    *,
    threshold: int,
    limit: int,
    over_target_pages: int = 0,
) -> npt.NDArray[np.int64]:
    """Up to ``limit`` pages to evict, oldest first (ties by index).

    A page qualifies when it is resident, not evicted, and idle for at least
    ``threshold`` plus its own penalty.  ``over_target_pages`` > 0 (the VM is
    above its resident target) adds that many more of the oldest idle pages
    below the threshold, never one accessed in the last interval.
    """
    if limit <= 0:
        return np.empty(0, dtype=np.int64)
    floor = 1 if over_target_pages > 0 else threshold
    cands = state.cold_candidates(min(floor, MAX_AGE))
    if not len(cands):
        return cands
    ages = state.ages[cands].astype(np.int16)
    need = np.minimum(policy.penalty[cands].astype(np.int16) + threshold, MAX_AGE)
    eligible = ages >= need
    chosen = _oldest_first(cands[eligible], ages[eligible], limit)
    extra = min(over_target_pages - len(chosen), limit - len(chosen))
    if extra > 0:
        rest = _oldest_first(cands[~eligible], ages[~eligible], extra)
        chosen = np.concatenate([chosen, rest])
    return chosen


def _oldest_first(
    pages: npt.NDArray[np.int64], ages: npt.NDArray[np.int16], limit: int
) -> npt.NDArray[np.int64]:
    if len(pages) <= limit and (len(pages) < 2 or bool(np.all(ages == ages[0]))):
        return pages
    order = np.argsort(-ages, kind="stable")[:limit]
    return pages[order]


def pages_for_bytes(nbytes: int | None, page_size: int) -> int:
    """Whole pages a byte budget allows (None: unlimited)."""
    if nbytes is None:
        return 1 << 62
    return max(0, math.floor(nbytes / page_size))
