"""What eviction and fault service of one VM share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wsd.storage import PageNamespace, PageStore
from wsd.tracker.session import VmTracker

from .config import EvictorConfig
from .deadline import TierCalls
from .inflight import InFlight
from .policy import RegionPolicy, VmPolicy


@dataclass
class EvictorStats:
    windows: int = 0
    evicted_pages: int = 0
    evicted_bytes: int = 0
    batches: int = 0
    failed_batches: int = 0
    skipped_touched: int = 0  # candidates touched during their window: not evicted
    fetched_pages: int = 0
    fetched_bytes: int = 0
    prefetched_pages: int = 0
    zero_fills: int = 0
    fetch_errors: int = 0
    fetches_stuck: int = 0  # past the deadline, still waiting
    poisoned_pages: int = 0
    copy_races: int = 0  # EEXIST on install: someone else populated the page
    punch_remnants: int = 0  # punched pages left zeroed in a THP (restored on access)
    remnants_restored: int = 0  # ... restored by the prepare after their window, untouched
    # wp-async: pages written between their read and their punch, found by the
    # verified punch and put back with their final bytes (not evicted).
    raced_writes: int = 0
    held_back_pages: int = 0  # punched, bytes unread: faults wait for a re-read or a restart
    # rwp: prepared pages whose bytes changed since their read although the
    # scan saw no access (an unmap of their PTE erased it): not evicted.
    unseen_writes: int = 0
    # When eviction was paused because the store failed a batch (clock of the
    # VmContext); None while it works.  Not a counter: see outage.py.
    storage_failing_since: float | None = None


@dataclass
class VmContext:
    vm_id: str
    tracker: VmTracker
    store: PageStore | None
    config: EvictorConfig
    clock: Callable[[], float] = time.monotonic
    # The store's calls the evictor makes, each with a deadline (None: no store).
    tier: TierCalls | None = field(init=False)
    namespaces: list[PageNamespace] = field(init=False)
    policies: list[RegionPolicy] = field(init=False)
    vm: VmPolicy = field(init=False)
    stats: EvictorStats = field(default_factory=EvictorStats)
    # Pages fetched back whose stored copy can go; flushed by the evictor before
    # it puts anything, so a flush never races a newer copy of the same page.
    # A resumed session starts with the listed pages its memfd holds.
    discards: list[set[int]] = field(init=False)
    # The chunk a verified punch works on off the loop; faults on it wait.
    in_flight: InFlight = field(init=False, default_factory=InFlight)

    def __post_init__(self) -> None:
        regions = self.tracker.regions
        self.tier = None
        if self.store is not None:
            self.tier = TierCalls(
                self.store, lambda: self.config.tier_call_deadline_seconds, self.vm_id
            )
        self.namespaces = [
            PageNamespace(self.vm_id, i, t.region.page_size) for i, t in enumerate(regions)
        ]
        self.policies = [RegionPolicy(t.npages) for t in regions]
        self.vm = VmPolicy(self.config, started_at=self.clock())
        self.discards = [set(t.take_listed_resident().tolist()) for t in regions]
