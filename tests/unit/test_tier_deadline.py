"""Deadlines on the evictor's tier calls (wsd/evictor/deadline.py), against a tier that hangs.

The tier is the zstd store behind :class:`~wsd.testing.outage.HangingTier`,
whose calls block a thread each until released, as a wedged NFS mount does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable

import pytest
import pytest_asyncio

from wsd import config
from wsd.evictor import EvictorConfig
from wsd.evictor.deadline import MAX_STUCK_CALLS, TierCalls
from wsd.storage import PageNamespace, TierTimeout, ZstdStoreConfig
from wsd.storage.zstd_store import ZstdStore
from wsd.testing.outage import HangingTier

DEADLINE = 0.1
PAGE = 4096
NS = PageNamespace("vm-hung", 0, PAGE)


@pytest_asyncio.fixture
async def hung() -> AsyncIterator[HangingTier]:
    tier = HangingTier(ZstdStore(ZstdStoreConfig(budget_bytes=1 << 24)))
    try:
        yield tier
    finally:
        await tier.close()


def calls(tier: HangingTier) -> TierCalls:
    return TierCalls(tier, lambda: DEADLINE, "vm-hung")


async def timed_out(call: Awaitable[object]) -> float:
    """Await ``call``, which must raise TierTimeout; how long that took."""
    started = time.monotonic()
    with pytest.raises(TierTimeout):
        await call
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_a_get_that_hangs_fails_at_the_deadline_and_its_retries_reuse_the_call(
    hung: HangingTier,
) -> None:
    page = os.urandom(PAGE)
    await hung.put(NS, {0: page}, generation=3)
    tier = calls(hung)
    hung.hang()
    took = await timed_out(tier.get(NS, 0, generation=3))
    assert DEADLINE <= took < DEADLINE + 0.5
    for _ in range(20):  # a fault's fetch retrying
        await timed_out(tier.get(NS, 0, generation=3))
    assert hung.started["get"] == 1 and hung.blocked == 1
    assert tier.stuck == 1 and tier.timeouts == 1
    hung.release()
    stored = await tier.get(NS, 0, generation=3)  # the same call, answered at last
    assert (stored.data, stored.generation) == (page, 3)
    assert hung.started["get"] == 1 and tier.stuck == 0


@pytest.mark.asyncio
async def test_stuck_reads_are_capped_and_then_new_ones_fail_at_once(hung: HangingTier) -> None:
    tier = calls(hung)
    hung.hang()
    n = MAX_STUCK_CALLS + 12
    results = await asyncio.gather(
        *(tier.get(NS, p * PAGE, generation=1) for p in range(n)), return_exceptions=True
    )
    assert all(isinstance(r, TierTimeout) for r in results)
    # Started at once, before any timed out: each holds a thread until released.
    assert hung.started["get"] == n
    # From now on, at most MAX_STUCK_CALLS: a fault on another page fails at once.
    took = await timed_out(tier.get(NS, (n + 1) * PAGE, generation=1))
    assert took < DEADLINE / 2
    assert hung.started["get"] == n
    hung.release()
    await asyncio.sleep(0.2)
    assert hung.blocked == 0 and tier.stuck == 0
    with pytest.raises(LookupError):  # the tier answers again: nothing stored there
        await tier.get(NS, (n + 1) * PAGE, generation=1)


@pytest.mark.asyncio
async def test_no_write_starts_while_one_is_stuck_so_a_late_put_cannot_land_last(
    hung: HangingTier,
) -> None:
    old, new = os.urandom(PAGE), os.urandom(PAGE)
    tier = calls(hung)
    hung.hang({"put", "sync", "discard"})
    await timed_out(tier.put(NS, {0: old}, generation=5))
    # Same page, same generation, newer bytes: refused, not queued behind the stuck put.
    assert await timed_out(tier.put(NS, {0: new}, generation=5)) < DEADLINE / 2
    assert await timed_out(tier.sync()) < DEADLINE / 2
    assert await timed_out(tier.discard(NS, [0])) < DEADLINE / 2
    assert hung.started == {"put": 1, "sync": 0, "get": 0, "get_many": 0, "discard": 0}
    hung.release()
    await asyncio.sleep(0.2)  # the stuck put lands now ...
    await tier.put(NS, {0: new}, generation=5)  # ... and the retried one after it
    await tier.sync()
    assert (await tier.get(NS, 0, generation=5)).data == new


@pytest.mark.asyncio
async def test_reads_go_on_while_only_writes_hang(hung: HangingTier) -> None:
    page = os.urandom(PAGE)
    await hung.put(NS, {PAGE: page}, generation=1)
    tier = calls(hung)
    hung.hang({"put", "sync"})
    await timed_out(tier.put(NS, {0: os.urandom(PAGE)}, generation=1))
    got = await tier.get_many(NS, [PAGE], generations={PAGE: 1})
    assert got[PAGE].data == page


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[evictor]\ntier_call_deadline_seconds = 60\n",
            "tier_call_deadline_seconds (60) is above fetch_deadline_seconds (30): a tier "
            "call that hangs would hold a fault past its deadline",
        ),
        (
            "[evictor]\ntier_call_deadline_seconds = 0\n",
            "`evictor.tier_call_deadline_seconds` = 0: Input should be greater than 0",
        ),
    ],
)
def test_a_bad_deadline_is_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, source="/etc/wsd/wsd.toml")
    assert message in str(info.value)


def test_the_default_deadline_is_below_the_fetch_deadline() -> None:
    cfg = EvictorConfig()
    assert 0 < cfg.tier_call_deadline_seconds <= cfg.fetch_deadline_seconds
