"""Prometheus metrics: a custom Collector that reads the daemon's state at scrape time.

Nothing on the fault path or in the cycle touches a prometheus-client
metric: the daemon already counts what matters (``EvictorStats``,
``VmTracker``, ``RegionState``, ``VmPolicy``), records durations into plain
fixed-bucket histograms (:mod:`wsd.durations`: fault latency in
``FaultService.latency``, scan, window, cycle and stall times in
``Session.timings``), and :class:`WsdCollector` turns those numbers into
metric families when Prometheus scrapes.  ``docs/metrics.md`` lists every
metric.

Threads: the HTTP server answers scrapes on its own thread, while the daemon's
state belongs to its event loop and is not safe to read from another thread
(``RegionState`` caches its histogram counts by version, ``VmPolicy`` trims its
refault log as it reads it).  So a collector made on the daemon's loop hands
the reading to that loop with ``call_soon_threadsafe`` and waits for it.  Only
the text formatting, and the counting of idle ages from the copies the reading
took (``RegionState.usage``), happen on the HTTP thread: counting every page
of a large guest (3.9 to 5.3 ms for 8 GiB) would hold up the loop's fault
service, copying its ages and flags costs a third of that.

The storage backend's ``stats()`` is a coroutine and a collector cannot await,
so the daemon refreshes a :class:`MetricsState` snapshot now and then
(:meth:`MetricsState.refresh`) and the collector reports that snapshot and its age.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from wsd import __version__
from wsd.durations import DurationHistogram
from wsd.kernel import KernelError
from wsd.priority import enter_background, runs_realtime
from wsd.snapshot import hot_count
from wsd.storage import PageStore, StoreStats
from wsd.tracker.mode import TrackingMode
from wsd.tracker.state import RegionUsage

if TYPE_CHECKING:
    from wsd.daemon import Daemon, Session

__all__ = ["MetricsServer", "MetricsState", "WsdCollector", "make_registry", "serve_metrics"]

# How long a scrape waits for the event loop to read the daemon's state.  A
# loop that does not answer within this is stuck: the scrape fails (HTTP 500)
# rather than report numbers read under the loop's feet.
LOOP_TIMEOUT: Final = 5.0
# How often the HTTP server's thread checks whether it should stop: the most
# closing it waits.
SHUTDOWN_POLL: Final = 0.05

_VM: Final = ("vm_id",)
_REGION: Final = ("vm_id", "region")
_STORE: Final = ("backend", "tier")

# EvictorStats field -> (metric name, help), all per VM and monotonic.
_EVICTOR_COUNTERS: Final = (
    ("evicted_pages", "wsd_evicted_pages", "Pages evicted to storage and punched out."),
    ("evicted_bytes", "wsd_evicted_bytes", "Bytes evicted to storage and punched out."),
    ("fetched_pages", "wsd_fetched_pages", "Evicted pages fetched back (demand and prefetch)."),
    ("fetched_bytes", "wsd_fetched_bytes", "Evicted bytes fetched back (demand and prefetch)."),
    ("prefetched_pages", "wsd_prefetched_pages", "Pages fetched back ahead of a fault."),
    ("zero_fills", "wsd_zero_fills", "First touches of never-evicted pages, served with zeros."),
    ("fetch_errors", "wsd_fetch_errors", "Failed fetch attempts (each retry counts)."),
    ("fetches_stuck", "wsd_stuck_fetches", "Fetches still failing past the fetch deadline."),
    ("poisoned_pages", "wsd_poisoned_pages", "Pages given to the guest as memory errors."),
    (
        "skipped_touched",
        "wsd_evict_skipped_touched_pages",
        "Eviction candidates not evicted: touched during their sync window.",
    ),
    ("batches", "wsd_evict_batches", "Chunks of stored pages punched out in a sync window."),
    (
        "failed_batches",
        "wsd_evict_failed_batches",
        "Eviction batches that could not be stored (put or sync failed); none evicted.",
    ),
    ("windows", "wsd_evict_windows", "Sync windows in which the evictor ran."),
    ("copy_races", "wsd_fetch_copy_races", "Fetches whose page someone else populated first."),
    (
        "unseen_writes",
        "wsd_evict_unseen_writes",
        "Eviction candidates written since their read although the scan saw no access "
        "(khugepaged or reclaim unmapped them), caught before the punch: not evicted.",
    ),
    (
        "held_back_pages",
        "wsd_evict_held_back_pages",
        "Punched pages whose held bytes could not be read back: faults on them wait until a "
        "later cycle reads the pipes, or a restart puts them back from the fd store or the VMM.",
    ),
    (
        "punch_remnants",
        "wsd_evict_punch_remnants",
        "Punched pages left zeroed in the page cache (a shmem THP that did not split), "
        "restored from storage on access or right after their window.",
    ),
    (
        "remnants_restored",
        "wsd_evict_punch_remnants_restored",
        "Punch remnants restored right after their window, before any access.",
    ),
)

# OpCounters field -> (metric name, help), per store and tier.
_STORE_COUNTERS: Final = (
    ("puts", "wsd_store_puts", "Put calls."),
    ("pages_put", "wsd_store_put_pages", "Pages put."),
    ("gets", "wsd_store_gets", "Get calls."),
    ("pages_got", "wsd_store_got_pages", "Pages got."),
    ("misses", "wsd_store_misses", "Pages asked for and not found."),
    ("discards", "wsd_store_discards", "Discard calls."),
    ("syncs", "wsd_store_syncs", "Sync (durability barrier) calls."),
    ("integrity_errors", "wsd_store_integrity_errors", "Pages that failed verification."),
    ("failures", "wsd_store_failures", "Operations that failed."),
)


@dataclass
class MetricsState:
    """What the collector reports besides the daemon's live state.

    ``store_stats`` is a snapshot of ``await store.stats()`` taken at
    ``store_stats_at`` (on the daemon's clock); the daemon refreshes it with
    :meth:`refresh`, e.g. once per interval.  Replacing both is one assignment
    each, so a scrape on another thread sees an old or a new snapshot.
    """

    store_stats: StoreStats | None = None
    store_stats_at: float | None = None

    async def refresh(self, store: PageStore, now: float) -> None:
        """Take a new snapshot of ``store``; its exceptions propagate, the old one stays."""
        stats = await store.stats()
        self.store_stats, self.store_stats_at = stats, now


class WsdCollector(Collector):
    """Reads a :class:`~wsd.daemon.Daemon` and a :class:`MetricsState` at each scrape.

    Made while an event loop runs (the daemon's), it reads the state on that
    loop whenever ``collect`` is called from another thread; ``loop`` names the
    loop explicitly.  Without a loop it reads in the calling thread.
    """

    def __init__(
        self,
        daemon: Daemon,
        state: MetricsState,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        loop_timeout: float = LOOP_TIMEOUT,
    ) -> None:
        self.daemon = daemon
        self.state = state
        self.loop = loop if loop is not None else _running_loop()
        self.loop_timeout = loop_timeout

    def collect(self) -> Iterator[Metric]:
        estimates, families = self._read()
        estimates()  # here, off the daemon's loop
        yield from families

    def _read(self) -> tuple[Callable[[], None], list[Metric]]:
        """``_families()``, read on the daemon's loop when there is one."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running() or _running_loop() is loop:
            return self._families()
        done: concurrent.futures.Future[tuple[Callable[[], None], list[Metric]]]
        done = concurrent.futures.Future()

        def read() -> None:
            if not done.set_running_or_notify_cancel():
                return  # the scrape timed out and went away
            try:
                done.set_result(self._families())
            except BaseException as e:
                done.set_exception(e)

        try:
            loop.call_soon_threadsafe(read)
        except RuntimeError:  # closed since we looked: nobody changes the state any more
            return self._families()
        try:
            return done.result(timeout=self.loop_timeout)
        except TimeoutError:
            done.cancel()
            raise TimeoutError(
                f"the event loop did not read the daemon's state within {self.loop_timeout} s"
            ) from None

    # -- reading (on the daemon's loop) ----------------------------------------------

    def _families(self) -> tuple[Callable[[], None], list[Metric]]:
        """Every family, and what completes the working-set and idle-age ones
        (see ``_vm_families``)."""
        daemon = self.daemon
        now = daemon.clock()
        sessions = list(daemon.sessions.values())
        out: list[Metric] = [
            InfoMetricFamily(
                "wsd",
                "The wsd daemon: version and tracking mode.",
                value={"version": __version__, "mode": str(daemon.decision.mode)},
            ),
            GaugeMetricFamily("wsd_sessions", "Tracked VMs (sessions).", value=len(sessions)),
        ]
        estimates, families = _vm_families(sessions, now)
        out += families
        if daemon.store is not None and self.state.store_stats is not None:
            out += _store_families(self.state.store_stats)
            if self.state.store_stats_at is not None:
                out.append(
                    GaugeMetricFamily(
                        "wsd_store_stats_age_seconds",
                        "Seconds since the store metrics were read from the store.",
                        value=max(0.0, now - self.state.store_stats_at),
                    )
                )
        return estimates, out


def _vm_families(sessions: list[Session], now: float) -> tuple[Callable[[], None], list[Metric]]:
    """The VM families, and what fills in their working-set and idle-age metrics
    from the regions' usage (``RegionState.usage``), to be called in any thread."""
    vm_info = InfoMetricFamily("wsd_vm", "A tracked VM and its tracking mode.", labels=_VM)
    region_info = InfoMetricFamily(
        "wsd_region",
        "A guest memory region: its tracking granularity and page size.",
        labels=_REGION,
    )
    guest = GaugeMetricFamily(
        "wsd_guest_memory_bytes", "Guest memory of the region.", labels=_REGION
    )
    resident = GaugeMetricFamily(
        "wsd_resident_memory_bytes",
        "Region memory in the memfd (as of the last cycle, then eviction and fetch-back).",
        labels=_REGION,
    )
    evicted = GaugeMetricFamily(
        "wsd_evicted_memory_bytes", "Region memory whose bytes are in storage.", labels=_REGION
    )
    hot = GaugeMetricFamily(
        "wsd_hot_memory_bytes",
        "Region memory accessed in the last interval scanned.",
        labels=_REGION,
    )
    wss = GaugeMetricFamily(
        "wsd_working_set_bytes",
        "Region memory accessed within the last horizon_intervals intervals "
        "(resident or evicted since); absent until that many intervals were observed.",
        labels=(*_REGION, "horizon_intervals"),
    )
    wss_window = GaugeMetricFamily(
        "wsd_working_set_window_seconds",
        "Wall time the last horizon_intervals intervals spanned.",
        labels=(*_REGION, "horizon_intervals"),
    )
    idle = GaugeMetricFamily(
        "wsd_resident_idle_memory_bytes",
        "Resident region memory idle for at least idle_intervals_ge intervals (a cumulative "
        "idle-age histogram; 0 is all resident memory); absent until that many were observed.",
        labels=(*_REGION, "idle_intervals_ge"),
    )
    counters = {
        field: CounterMetricFamily(name, doc, labels=_VM) for field, name, doc in _EVICTOR_COUNTERS
    }
    cycles = CounterMetricFamily("wsd_tracker_cycles", "Tracking cycles completed.", labels=_VM)
    rwp = CounterMetricFamily(
        "wsd_tracker_rwp_faults",
        "RWP faults resolved (accesses trapped in the sync window, late ones included).",
        labels=_VM,
    )
    late_rwp = CounterMetricFamily(
        "wsd_tracker_late_rwp_faults",
        "RWP faults read after their sync window had closed.",
        labels=_VM,
    )
    minor = CounterMetricFamily(
        "wsd_tracker_minor_faults",
        "MINOR faults resolved (accesses to zapped shmem THP mappings).",
        labels=_VM,
    )
    refaults = CounterMetricFamily(
        "wsd_refaults", "Demand fetches of evicted pages (promotions).", labels=_VM
    )
    early = CounterMetricFamily(
        "wsd_early_refaults",
        "Refaults within refault_window_cycles of the page's eviction (penalised).",
        labels=_VM,
    )
    refault_rate = GaugeMetricFamily(
        "wsd_refaults_per_minute",
        "Refaults per minute over the last minute, as the promotion-rate guard sees them.",
        labels=_VM,
    )
    storage_failing = GaugeMetricFamily(
        "wsd_evict_storage_failing",
        "1 while eviction is paused because the store failed a batch (retried with backoff).",
        labels=_VM,
    )
    storage_failing_seconds = GaugeMetricFamily(
        "wsd_evict_storage_failing_seconds",
        "Seconds eviction has been paused by a failing store; 0 while it works.",
        labels=_VM,
    )
    tier_timeouts = CounterMetricFamily(
        "wsd_tier_call_timeouts",
        "Calls to the storage tier that passed evictor.tier_call_deadline_seconds.",
        labels=_VM,
    )
    tier_stuck = GaugeMetricFamily(
        "wsd_tier_calls_stuck",
        "Calls to the storage tier past their deadline and still running (a hanging tier).",
        labels=_VM,
    )
    threshold = GaugeMetricFamily(
        "wsd_idle_threshold_intervals",
        "Idle intervals a page needs before eviction (adapted by the promotion-rate guard).",
        labels=_VM,
    )
    fault_latency = HistogramMetricFamily(
        "wsd_fault_latency_seconds",
        "MISSING faults (and MINOR faults on punch remnants) from wsd reading them to the "
        "vCPU woken, by store and result (zero, ok, retried, race, poisoned, gone, error).",
        labels=(*_VM, "backend", "result"),
    )
    scan = HistogramMetricFamily(
        "wsd_scan_duration_seconds",
        "Scanning the hot set at a cycle's start: SET_MODE, PAGEMAP_SCAN of every region, ages.",
        labels=_VM,
    )
    window = HistogramMetricFamily(
        "wsd_sync_window_duration_seconds",
        "Sync windows (rwp mode): scan, eviction commit and re-arm, with the uffd in sync mode.",
        labels=_VM,
    )
    cycle = HistogramMetricFamily(
        "wsd_cycle_duration_seconds",
        "A tracking cycle's work: the sync window plus preparing the next eviction.",
        labels=_VM,
    )
    stall = HistogramMetricFamily(
        "wsd_vcpu_stall_seconds",
        "Tracking faults (rwp in the sync window, minor) from wsd reading them to the vCPU "
        "released.",
        labels=(*_VM, "fault"),
    )

    usages: list[tuple[list[str], RegionUsage]] = []
    for session in sessions:
        vm_id = session.vm_id
        tracker, ctx = session.tracker, session.ctx
        vm_info.add_metric([vm_id], {"mode": str(tracker.mode)})
        for i, t in enumerate(tracker.regions):
            labels = [vm_id, str(i)]
            page_size = t.region.page_size
            state = t.state
            region_info.add_metric(
                labels, {"granularity": str(state.granularity), "page_size": str(page_size)}
            )
            guest.add_metric(labels, t.region.size)
            resident.add_metric(labels, state.resident_pages * page_size)
            evicted.add_metric(labels, state.evicted_pages * page_size)
            if i < len(session.last_hot):
                hot.add_metric(labels, hot_count(session.last_hot[i]) * page_size)
            usages.append((labels, state.usage()))
        for field, family in counters.items():
            family.add_metric([vm_id], getattr(ctx.stats, field))
        cycles.add_metric([vm_id], tracker.cycles)
        rwp.add_metric([vm_id], tracker.sync_faults)
        late_rwp.add_metric([vm_id], tracker.late_rwp_faults)
        minor.add_metric([vm_id], tracker.minor_faults)
        refaults.add_metric([vm_id], ctx.vm.refaults)
        early.add_metric([vm_id], ctx.vm.early_refaults)
        rate = ctx.vm.refaults_per_minute(now)
        if rate is not None:
            refault_rate.add_metric([vm_id], rate)
        threshold.add_metric([vm_id], ctx.vm.threshold)
        since = ctx.stats.storage_failing_since
        storage_failing.add_metric([vm_id], 0 if since is None else 1)
        storage_failing_seconds.add_metric([vm_id], 0.0 if since is None else max(0.0, now - since))
        if ctx.tier is not None:
            tier_timeouts.add_metric([vm_id], ctx.tier.timeouts)
            tier_stuck.add_metric([vm_id], ctx.tier.stuck)
        for (backend, result), hist in session.faults.latency.items():
            _add_histogram(fault_latency, [vm_id, backend, str(result)], hist)
        timings = session.timings
        _add_histogram(scan, [vm_id], timings.scan)
        if tracker.mode is TrackingMode.RWP:
            _add_histogram(window, [vm_id], timings.window)
        _add_histogram(cycle, [vm_id], timings.cycle)
        for fault, hist in timings.stall.items():
            _add_histogram(stall, [vm_id, fault], hist)

    def estimates() -> None:
        for labels, usage in usages:
            for h, estimate in usage.working_set().items():
                if estimate.bytes is not None:
                    wss.add_metric([*labels, str(h)], estimate.bytes)
                if estimate.window_seconds is not None:
                    wss_window.add_metric([*labels, str(h)], estimate.window_seconds)
            for ge, nbytes in usage.age_histogram().cumulative():
                if nbytes is not None:
                    idle.add_metric([*labels, str(ge)], nbytes)

    return estimates, [
        vm_info,
        region_info,
        guest,
        resident,
        evicted,
        hot,
        wss,
        wss_window,
        idle,
        *counters.values(),
        cycles,
        rwp,
        late_rwp,
        minor,
        refaults,
        early,
        refault_rate,
        threshold,
        storage_failing,
        storage_failing_seconds,
        tier_timeouts,
        tier_stuck,
        fault_latency,
        scan,
        window,
        cycle,
        stall,
    ]


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: DurationHistogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


def _store_families(stats: StoreStats) -> list[Metric]:
    """The store as a whole (no ``tier`` label) and each tier of a stack (``tier="0"``...)."""
    gauges = {
        "pages": GaugeMetricFamily("wsd_store_pages", "Pages stored.", labels=_STORE),
        "stored_bytes": GaugeMetricFamily(
            "wsd_store_stored_bytes",
            "Bytes stored, as stored (compressed or encrypted).",
            labels=_STORE,
        ),
        "logical_bytes": GaugeMetricFamily(
            "wsd_store_logical_bytes", "Pages stored times their page size.", labels=_STORE
        ),
        "budget_bytes": GaugeMetricFamily(
            "wsd_store_budget_bytes", "The store's byte budget or size limit.", labels=_STORE
        ),
    }
    counters = {
        field: CounterMetricFamily(name, doc, labels=_STORE) for field, name, doc in _STORE_COUNTERS
    }

    def add(s: StoreStats, tier: str) -> None:
        labels = [s.backend, tier]
        for field, family in gauges.items():
            value = getattr(s, field)
            if value is not None:
                family.add_metric(labels, value)
        for field, counter in counters.items():
            counter.add_metric(labels, getattr(s.counters, field))
        for i, sub in enumerate(s.tiers):
            add(sub, f"{tier}.{i}" if tier else str(i))

    add(stats, "")
    return [*gauges.values(), *counters.values()]


def make_registry(
    daemon: Daemon, state: MetricsState, *, loop: asyncio.AbstractEventLoop | None = None
) -> CollectorRegistry:
    """A registry of its own (never the global one): wsd's collector plus process and platform."""
    registry = CollectorRegistry()
    registry.register(WsdCollector(daemon, state, loop=loop))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsServer:
    """The HTTP server :func:`serve_metrics` started; :meth:`close` stops it and its thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    async def close(self) -> None:
        """Stop serving, close the socket and join the thread; idempotent.

        ``shutdown`` waits for the serving thread's next poll, so it runs in a
        worker thread, not on the event loop.
        """
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Server4(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape on stderr is noise."""


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` over HTTP at ``host:port`` (any path) from a thread until closed.

    prometheus_client's ``start_http_server`` would do, but its thread polls
    for shutdown every half second, so closing it would hold up the daemon's
    stop by that much; this is the same server with a shorter poll.

    Raises OSError naming the address when it cannot listen there (in use,
    unknown host).
    """

    def start() -> MetricsServer:
        # The first address getaddrinfo gives, as http.server does for its CLI.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server4
        server = make_server(
            str(sockaddr[0]), port, make_wsgi_app(registry), server_class, _QuietHandler
        )

        started_by_realtime = runs_realtime()

        def serve() -> None:
            # A scrape must not preempt fault service (wsd.priority).
            with contextlib.suppress(KernelError):
                enter_background(started_by_realtime=started_by_realtime)
            server.serve_forever(poll_interval=SHUTDOWN_POLL)

        thread = threading.Thread(target=serve, name="wsd-metrics", daemon=True)
        thread.start()
        return MetricsServer(server, thread)

    try:
        return await asyncio.to_thread(start)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(e.errno, f"cannot serve metrics on {where}: {e.strerror or e}") from e


def _running_loop() -> asyncio.AbstractEventLoop | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.get_running_loop()
    return None
