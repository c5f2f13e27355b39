"""What the tier-outage tests check on a running daemon (docs/reliability.md, "Tier outages").

A real ``wsd guest`` hammers its self-checking pages while wsd evicts to a
tier that then fails (Redis killed, a file tier's disk full).  Between the
phases the tests call :func:`check_punched_pages_are_stored`: every page
missing from the guest's memfd is one wsd counts as evicted, and the store
holds each of them at the generation wsd expects.  A page punched after its
write failed would break the first half, or be absent from the store.

:class:`HangingTier` makes a tier hang instead of fail, as a wedged NFS mount
does: while it hangs, each call blocks a thread of its own until released.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from wsd.config import MetricsSection
from wsd.daemon import Daemon, Session, Settings
from wsd.evictor import EvictorConfig
from wsd.evictor.context import EvictorStats
from wsd.evictor.faults import FaultResult
from wsd.guest.process import GuestProcess
from wsd.storage import PageNamespace, PageStore, StorageConfig, StoredPage, StoreStats
from wsd.storage.page import BackendKind, Generations
from wsd.testing.hammer import AGGRESSIVE, STEEP_4K, start_guest
from wsd.testing.running import running_daemon

T = TypeVar("T")

# The hammer's settings (evict whatever was idle for one interval), durable
# tiers only; fetches wait out an outage of up to two minutes before alerting.
OUTAGE_EVICTOR = AGGRESSIVE.model_copy(
    update={"allow_volatile_store": False, "fetch_deadline_seconds": 120}
)

# A 32 MiB guest of the hammer's writers: eviction never runs dry and faults
# keep hitting the tier.
GUEST_ARGS = ("--size", "32M", *STEEP_4K)

# Tracking interval of the outage tests: outages of a few seconds span tens of
# intervals, enough to see the backoff.
INTERVAL = 0.2


@contextlib.asynccontextmanager
async def outage_daemon(
    tmp_path: Path,
    storage: StorageConfig,
    evictor: EvictorConfig = OUTAGE_EVICTOR,
    *,
    state_dir: Path | None = None,
) -> AsyncIterator[Daemon]:
    """The daemon of the tier-outage tests: evicting into ``storage``, metrics on a free port."""
    settings = Settings(
        socket=tmp_path / "wsd.sock",
        interval=INTERVAL,
        storage=storage,
        evictor=evictor,
        metrics=MetricsSection(address="127.0.0.1:0"),
        state_dir=state_dir,
    )
    async with running_daemon(settings) as d:
        yield d


async def start_outage_guest(d: Daemon, vm_id: str) -> GuestProcess:
    """A 32 MiB guest of the hammer's writers (:data:`GUEST_ARGS`) handed off to ``d``."""
    return await start_guest(d, "--vm-id", vm_id, *GUEST_ARGS)


async def stop_guest(session: Session, guest: GuestProcess) -> dict[str, Any]:
    """Stop evicting, then stop the guest, which re-reads every page; its report.

    Eviction stops first so the guest's final check of every page does not race it.
    """
    session.ctx.config = session.ctx.config.model_copy(update={"enabled": False})
    assert await asyncio.to_thread(guest.stop, 300) == 0, guest.stderr()
    return guest.report()


def assert_nothing_lost(report: Mapping[str, Any], stats: EvictorStats) -> None:
    """The guest read no wrong page and checked every page at exit; each fault was answered
    by one install (no fetch raced another) and none was given up on."""
    assert report["verify_errors"] == 0 and report["unverified"] == 0
    assert report["final_check_pages"] == report["pages"]
    assert stats.copy_races == 0
    assert stats.fetches_stuck == 0 and stats.poisoned_pages == 0


class HangingTier:
    """A page store whose calls hang while :meth:`hang` is in force, like a wedged NFS mount.

    A hanging call blocks a thread of its own (not the store's pool, nor the
    loop's default executor the evictor reads pages with) until its operation
    is released, then runs against the real store.  :attr:`blocked` counts
    the threads blocked now, :attr:`max_blocked` the most at once,
    :attr:`started` the calls that hung, by operation.
    """

    OPERATIONS = frozenset({"put", "sync", "get", "get_many", "discard"})

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self._gates = {op: threading.Event() for op in self.OPERATIONS}
        for gate in self._gates.values():
            gate.set()
        self._lock = threading.Lock()
        self.blocked = 0
        self.max_blocked = 0
        self.started: dict[str, int] = dict.fromkeys(self.OPERATIONS, 0)
        self._threads = ThreadPoolExecutor(64, thread_name_prefix="hung-tier")

    @property
    def kind(self) -> BackendKind:
        return self.store.kind

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def durable(self) -> bool:
        return self.store.durable

    def hang(self, operations: Iterable[str] = OPERATIONS) -> None:
        """From now on, calls of ``operations`` block until released."""
        for op in operations:
            self._gates[op].clear()

    def release(self, operations: Iterable[str] = OPERATIONS) -> None:
        """Let the blocked calls of ``operations`` go on, and new ones run at once."""
        for op in operations:
            self._gates[op].set()

    def _block(self, gate: threading.Event) -> None:
        with self._lock:
            self.blocked += 1
            self.max_blocked = max(self.max_blocked, self.blocked)
        try:
            gate.wait()
        finally:
            with self._lock:
                self.blocked -= 1

    async def _maybe_hang(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        gate = self._gates[operation]
        if not gate.is_set():
            self.started[operation] += 1
            await asyncio.get_running_loop().run_in_executor(self._threads, self._block, gate)
        return await call()

    async def put(
        self, ns: PageNamespace, pages: Mapping[int, bytes], *, generation: Generations
    ) -> None:
        await self._maybe_hang("put", lambda: self.store.put(ns, pages, generation=generation))

    async def get(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage:
        return await self._maybe_hang(
            "get", lambda: self.store.get(ns, offset, generation=generation)
        )

    async def get_many(
        self,
        ns: PageNamespace,
        offsets: Sequence[int],
        *,
        generations: Mapping[int, int] | None = None,
        missing_ok: bool = False,
    ) -> dict[int, StoredPage]:
        return await self._maybe_hang(
            "get_many",
            lambda: self.store.get_many(
                ns, offsets, generations=generations, missing_ok=missing_ok
            ),
        )

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        await self._maybe_hang("discard", lambda: self.store.discard(ns, offsets))

    async def sync(self) -> None:
        await self._maybe_hang("sync", self.store.sync)

    async def stats(self) -> StoreStats:
        return await self.store.stats()

    async def close(self) -> None:
        self.release()
        try:
            await self.store.close()
        finally:
            self._threads.shutdown(wait=False)


async def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    guest: GuestProcess | None = None,
    session: Session | None = None,
) -> None:
    """Poll ``predicate`` on the loop (the daemon runs meanwhile) until true or ``timeout``.

    With ``guest``, its exit ends the wait at once with its stderr: a guest
    that found a wrong page stops faulting, which would otherwise look like a
    timeout.  With ``session``, the error says what its evictor and faults did.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        code = None if guest is None else guest.proc.poll()
        if guest is not None and code is not None:
            raise AssertionError(
                f"the guest exited ({code}) while waiting for {what}: {_state(session)}\n"
                f"{guest.stderr()[-4000:]}"
            )
        if loop.time() > deadline:
            threads = "" if guest is None else f"; guest threads in {_wchans(guest.pid)}"
            raise AssertionError(f"not within {timeout:g} s: {what}: {_state(session)}{threads}")
        await asyncio.sleep(0.05)


def _wchans(pid: int) -> dict[str, int]:
    """Where the threads of ``pid`` sleep in the kernel, by count: ``handle_userfault``
    is a thread blocked on a fault that nobody has resolved yet."""
    where: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            w = (task / "wchan").read_text() or "running"
            where[w] = where.get(w, 0) + 1
    return where


def _state(session: Session | None) -> str:
    """The evictor's stats, faults served by result, fetches in flight, tier calls."""
    if session is None:
        return ""
    results: dict[str, int] = {}
    for (_, result), hist in session.faults.latency.items():
        results[result.value] = results.get(result.value, 0) + sum(hist.counts)
    tier = session.ctx.tier
    calls = "" if tier is None else f", tier timeouts {tier.timeouts}, stuck {tier.stuck}"
    return f"{session.ctx.stats}; faults {results}, fetching {len(session.faults.fetching)}{calls}"


PAUSED = "storage failing: eviction paused"
RESUMED = "storage works again: eviction resumed"


def outage_log(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evictor's pause and resume lines among captured ``logs``, short, for messages."""
    return [
        f"{e['event']}: {e.get('error') or e.get('paused_seconds')}"
        for e in logs
        if e["event"] in (PAUSED, RESUMED)
    ]


def evicted_now(session: Session) -> int:
    """Pages of ``session`` evicted at this moment (not counting those fetched back)."""
    return sum(t.state.evicted_pages for t in session.tracker.regions)


async def until_evicted_now(
    session: Session, guest: GuestProcess, pages: int = 100, timeout: float = 30.0
) -> None:
    """Wait until at least ``pages`` are evicted at this moment, to start an outage on.

    Call it with the guest :meth:`~GuestProcess.suspended`, and start the
    outage before the guest continues: its faults then wait on the outage.
    The hammer's steep guest touches its whole memory within a second or so,
    so while it runs, how many pages stay evicted depends on the machine's
    speed (in CI once, fewer than 100 for 30 s).
    """
    await wait_until(
        lambda: evicted_now(session) >= pages,
        timeout,
        f"{pages} pages evicted at once",
        guest=guest,
        session=session,
    )


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
            holes = np.flatnonzero(~t.resident())
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
