"""What the tier-outage tests check on a running daemon (docs/reliability.md, "Tier outages").

A real ``wsd guest`` hammers its self-checking pages while wsd evicts to a
tier that then fails (Redis killed, a file tier's disk full).  Between the
phases the tests call :func:`check_punched_pages_are_stored`: every page
missing from the guest's memfd is one wsd counts as evicted, and the store
holds each of them at the generation wsd expects.  A page punched after its
write failed would break the first half, or be absent from the store.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from wsd.daemon import Daemon, Session
from wsd.evictor.faults import FaultResult
from wsd.kernel import data_ranges
from wsd.testing.hammer import AGGRESSIVE, STEEP_4K

# The hammer's settings (evict whatever was idle for one interval), durable
# tiers only; fetches wait out an outage of up to two minutes before alerting.
OUTAGE_EVICTOR = AGGRESSIVE.model_copy(
    update={"allow_volatile_store": False, "fetch_deadline_seconds": 120}
)

# A 32 MiB guest of the hammer's writers: eviction never runs dry and faults
# keep hitting the tier.
GUEST_ARGS = ("--size", "32M", *STEEP_4K)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` on the loop (the daemon runs meanwhile) until true or ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


async def cycles(session: Session, n: int, timeout: float = 30.0) -> None:
    """Wait until ``n`` more tracking cycles have run."""
    target = session.tracker.cycles + n
    await wait_until(lambda: session.tracker.cycles >= target, timeout, f"{n} more cycles")


async def vm_metrics(d: Daemon, vm_id: str) -> dict[str, float]:
    """The daemon's per-VM samples for ``vm_id``, scraped over HTTP like Prometheus does."""
    assert d.metrics_server is not None, "the daemon serves no metrics"
    host, port = d.metrics_server.address

    def get() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    # In a thread: the collector reads the daemon's state on this loop.
    text = await asyncio.to_thread(get)
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels == {"vm_id": vm_id}
    }


def retried_faults(session: Session) -> int:
    """Faults served after at least one failed fetch (they waited out an outage)."""
    return sum(
        sum(hist.counts)
        for (_, result), hist in session.faults.latency.items()
        if result is FaultResult.RETRIED
    )


async def check_punched_pages_are_stored(d: Daemon, vm_id: str) -> int:
    """Holes in the memfd are exactly the pages wsd counts as evicted, each stored at its
    generation; returns how many.

    Eviction is paused for the check (tracking and faults go on), so no discard
    of a fetched page's copy and no new punch happens while the store is read.
    """
    session = d.sessions[vm_id]
    assert d.store is not None
    session.paused = True
    try:
        # A prepare under way ends, the next window commits it, the next prepare is skipped.
        await cycles(session, 2)
        total = 0
        for i, t in enumerate(session.tracker.regions):
            r = t.region
            ps = r.page_size
            # No await between the walk and the snapshot: faults cannot fill holes in between.
            present = np.zeros(t.npages, dtype=np.bool_)
            for b, e in data_ranges(t.memfd, r.offset, r.offset + r.size):
                present[(b - r.offset) // ps : -(-(e - r.offset) // ps)] = True
            holes = np.flatnonzero(~present)
            evicted = np.flatnonzero(t.state.evicted)
            gens = {int(p) * ps: int(t.state.generations[p]) for p in evicted}
            assert np.array_equal(holes, evicted), (
                f"region {i}: punched but not evicted {np.setdiff1d(holes, evicted)[:10]}, "
                f"evicted but present {np.setdiff1d(evicted, holes)[:10]}"
            )
            # Raises PageNotFound naming every page missing, IntegrityError on a generation.
            got = await d.store.get_many(session.ctx.namespaces[i], list(gens), generations=gens)
            assert len(got) == len(gens)
            total += len(gens)
        return total
    finally:
        session.paused = False
