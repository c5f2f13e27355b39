"""Fixed-bucket duration histograms: the daemon records into them, the metrics export them.

Fault latency is recorded on the fault path, so an observation is one bisect
over a short tuple and two additions: no allocation, no lock.  None is needed:
every observation happens on the daemon's event loop, and the metrics
collector reads there too (see :mod:`wsd.metrics`).  The buckets are fixed
up front, as Prometheus histograms need them to be.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

# Faults: a zero fill or an in-memory page is served in microseconds, a file
# or redis tier in hundreds of them, and a failing tier retries for up to
# `fetch_deadline_seconds` (30 s by default).
FAULT_BUCKETS: Final = (
    1e-5, 2.5e-5, 5e-5,
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip
# Scans, sync windows and cycles: from a small VM's scan (~100 µs) to a
# prepare that writes gigabytes to a slow tier.
CYCLE_BUCKETS: Final = (
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


class DurationHistogram:
    """Counts of durations (seconds) per bucket, their sum, and their count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"bucket bounds must be increasing and not empty, not {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        # counts[i]: observations in (bounds[i-1], bounds[i]]; the last one is
        # everything above the last bound (Prometheus's +Inf bucket).
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket
        # (Prometheus's `le` is inclusive).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: ``(le, observations <= le)``, ending with ``("+Inf", count)``."""
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


K = TypeVar("K", bound=Hashable)


class LabelledDurations(Generic[K]):
    """One :class:`DurationHistogram` per key, made on its first observation.

    Keys should be values the caller already holds (a constant string, a
    prebuilt tuple): building a new tuple per observation would allocate.
    """

    __slots__ = ("_by_key", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._by_key: dict[K, DurationHistogram] = {}

    def observe(self, key: K, seconds: float) -> None:
        histogram = self._by_key.get(key)
        if histogram is None:
            histogram = self._by_key[key] = DurationHistogram(self.bounds)
        histogram.observe(seconds)

    def items(self) -> list[tuple[K, DurationHistogram]]:
        return list(self._by_key.items())

    def __getitem__(self, key: K) -> DurationHistogram:
        return self._by_key[key]


@dataclass
class CycleTimings:
    """How long one VM's tracking work takes, per interval, and how long its vCPUs wait.

    - ``scan``: from the start of the cycle to the eviction hook: ``SET_MODE``
      sync, ``PAGEMAP_SCAN`` of every region, and updating the ages;
    - ``window``: the whole ``VmTracker.cycle`` in rwp mode, from ``SET_MODE``
      sync to ``SET_MODE`` async (wp-async mode has no window);
    - ``cycle``: the window plus ``Evictor.prepare`` (reading and storing the
      next pages): all the work of one interval;
    - ``stall``: per tracking fault (``"rwp"``, ``"minor"``), from wsd reading
      the message to the vCPU being released.
    """

    scan: DurationHistogram = field(default_factory=lambda: DurationHistogram(CYCLE_BUCKETS))
    window: DurationHistogram = field(default_factory=lambda: DurationHistogram(CYCLE_BUCKETS))
    cycle: DurationHistogram = field(default_factory=lambda: DurationHistogram(CYCLE_BUCKETS))
    stall: LabelledDurations[str] = field(
        default_factory=lambda: LabelledDurations[str](FAULT_BUCKETS)
    )
