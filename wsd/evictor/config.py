"""The ``[evictor]`` table: when pages leave guest memory, and how fast.

Every field has a default a host can run with; ``config.example.toml``
documents them for operators.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator


class OnDeadline(enum.StrEnum):
    """What a fetch that keeps failing past ``fetch_deadline_seconds`` does."""

    WAIT = "wait"
    """Keep the vCPU blocked and keep retrying; alert (log and metric)."""
    POISON = "poison"
    """``UFFDIO_POISON`` the page: the guest sees a memory error, never wrong data."""


class EvictorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_idle_cycles: int = Field(default=8, ge=1, le=255)
    """A page must have been idle this many tracking intervals to be evicted."""
    max_idle_cycles: int = Field(default=128, ge=1, le=255)
    """The ceiling the promotion-rate guard may raise the idle threshold to."""
    max_pages_per_window: int = Field(default=32768, ge=1)
    """Pages evicted in one sync window at most: bounds how long a vCPU that
    touches a cold page waits (it blocks until the window closes)."""
    batch_pages: int = Field(default=1024, ge=1, le=65536)
    """Pages per put/sync/punch transaction."""
    max_batch_bytes: ByteSize = Field(default=ByteSize(16 << 20), gt=0)
    """Bytes per transaction at most, whatever the page size: a batch of 1024
    hugetlbfs pages would be 2 GiB in one put, past any sane tier-call deadline.
    A batch holds at least one page."""
    batches_in_flight: int = Field(default=1, ge=1, le=8)
    """Batches a prepare reads and stores at once.  More than 1: while one is
    compressed or synced on a worker, another worker reads the next, so
    eviction runs faster, and a fault served meanwhile waits more often
    behind eviction's work (docs/evictor.md)."""
    rate_mb_per_second: float | None = Field(default=256.0, gt=0)
    """Eviction bandwidth per VM (10^6 bytes/s); ``None`` is unlimited."""
    resident_target_bytes: ByteSize | None = Field(default=None, gt=0)
    """Per VM: while more than this is resident, evict the oldest idle pages
    even below ``min_idle_cycles`` (never a page touched in the last interval)."""
    host_evicted_fraction_max: float | None = Field(default=None, gt=0, le=1)
    """Host-wide: stop evicting once this fraction of all tracked guest memory is evicted."""
    refault_window_cycles: int = Field(default=8, ge=1, le=255)
    """A page fetched back within this many intervals of its eviction was evicted too early."""
    refault_penalty_cycles: int = Field(default=8, ge=1, le=255)
    """Extra idle cycles such a page must wait before its next eviction; doubles on each
    early refault (hysteresis), decays by one per eviction that sticks."""
    promotion_target_percent_per_minute: float | None = Field(default=5.0, gt=0)
    """Keep refaults per minute below this percentage of the working set by raising the idle
    threshold (and lowering it again when refaults stay well below); ``None`` disables it."""
    fetch_retry_initial_seconds: float = Field(default=0.005, gt=0)
    fetch_retry_max_seconds: float = Field(default=1.0, gt=0)
    fetch_deadline_seconds: float = Field(default=30.0, gt=0)
    """How long a fetch may keep failing before ``on_fetch_deadline`` applies."""
    on_fetch_deadline: OnDeadline = OnDeadline.WAIT
    tier_call_deadline_seconds: float = Field(default=10.0, gt=0)
    """How long one call to the storage tier (a put, sync, get or discard) may take
    before it counts as failed: a tier that hangs pauses eviction and makes fetches
    retry, as one that fails does (deadline.py)."""
    prefetch_pages: int = Field(default=0, ge=0, le=256)
    """On a fetch, also bring back up to this many evicted neighbours that follow the page."""
    allow_volatile_store: bool = False
    """Evict into a store that does not survive a wsd crash (the zstd tier alone).  A crash
    then loses every evicted page: off unless asked for."""

    @model_validator(mode="after")
    def _consistent(self) -> EvictorConfig:
        if self.max_idle_cycles < self.min_idle_cycles:
            raise ValueError(
                f"max_idle_cycles ({self.max_idle_cycles}) is below "
                f"min_idle_cycles ({self.min_idle_cycles})"
            )
        if self.fetch_retry_max_seconds < self.fetch_retry_initial_seconds:
            raise ValueError("fetch_retry_max_seconds is below fetch_retry_initial_seconds")
        if self.tier_call_deadline_seconds > self.fetch_deadline_seconds:
            raise ValueError(
                f"tier_call_deadline_seconds ({self.tier_call_deadline_seconds:g}) is above "
                f"fetch_deadline_seconds ({self.fetch_deadline_seconds:g}): a tier call that "
                "hangs would hold a fault past its deadline"
            )
        return self
