"""Eviction's backoff while the store fails: gaps, one log line per outage, the gauge's state."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import cast

from structlog.testing import capture_logs

from wsd.evictor.context import EvictorStats, VmContext
from wsd.evictor.outage import MAX_BACKOFF_INTERVALS, StoreBackoff
from wsd.storage import StorageFull, TierUnavailable


def fake_ctx() -> SimpleNamespace:
    clock = SimpleNamespace(now=100.0)
    return SimpleNamespace(
        vm_id="vm-1",
        tracker=SimpleNamespace(cycles=0),
        stats=EvictorStats(),
        store=SimpleNamespace(name="redis"),
        clock=lambda: clock.now,
        time=clock,
    )


def attempt(b: StoreBackoff, ctx: SimpleNamespace, error: Exception | None) -> None:
    """One prepare: a failed batch (``error``) or stored batches."""
    b.begin()
    if error is None:
        b.end(cast(VmContext, ctx))
    else:
        b.failed(cast(VmContext, ctx), error, region=0, pages=128)


def test_attempts_back_off_doubling_up_to_the_cap_and_reset_on_success() -> None:
    ctx, b = fake_ctx(), StoreBackoff()
    down = TierUnavailable("redis unavailable: connection refused", backend="redis")
    tried = []
    for cycle in range(100):
        ctx.tracker.cycles = cycle
        if b.may_try(cycle):
            tried.append(cycle)
            attempt(b, ctx, down)
    gaps = [b - a for a, b in itertools.pairwise(tried)]
    assert gaps[:6] == [1, 2, 4, 8, 16, 16]
    assert set(gaps[4:]) == {MAX_BACKOFF_INTERVALS}
    ctx.tracker.cycles = tried[-1] + MAX_BACKOFF_INTERVALS
    attempt(b, ctx, None)
    assert b.failures == 0 and b.may_try(ctx.tracker.cycles + 1)


def test_an_outage_logs_once_when_it_starts_and_once_when_it_ends() -> None:
    ctx, b = fake_ctx(), StoreBackoff()
    full = StorageFull("writing 128 pages failed: No space left on device", backend="file")
    with capture_logs() as logs:
        for cycle in (1, 2, 4, 8):
            ctx.tracker.cycles = cycle
            ctx.time.now += 1
            attempt(b, ctx, full)
        assert ctx.stats.storage_failing_since == 101.0
        ctx.time.now = 130.0
        attempt(b, ctx, None)
    assert ctx.stats.storage_failing_since is None
    loud = [e for e in logs if e["log_level"] in ("error", "warning", "info")]
    assert [e["event"] for e in loud] == [
        "storage failing: eviction paused",
        "storage works again: eviction resumed",
    ]
    paused, resumed = loud
    assert paused["error"].startswith("writing 128 pages failed: No space left on device")
    assert (paused["vm_id"], paused["backend"], paused["region"]) == ("vm-1", "redis", 0)
    assert (resumed["paused_seconds"], resumed["failed_attempts"]) == (29.0, 4)


def test_an_attempt_that_fails_after_storing_some_batches_is_still_a_failure() -> None:
    ctx, b = fake_ctx(), StoreBackoff()
    full = StorageFull("No space left on device", backend="file")
    attempt(b, ctx, full)
    ctx.tracker.cycles = 1
    # The first batches fit in space freed meanwhile, the next one does not.
    b.begin()
    b.failed(cast(VmContext, ctx), full)
    b.failed(cast(VmContext, ctx), full)  # the same attempt: counted once
    b.end(cast(VmContext, ctx))
    assert b.failures == 2 and ctx.stats.storage_failing_since is not None
    assert not b.may_try(2) and b.may_try(3)
