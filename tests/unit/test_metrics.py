"""The Prometheus collector: every family, its labels and values, read from a fake daemon.

The daemon and its sessions are namespaces; what they hold is real: ``RegionState``
driven through cycles, ``EvictorStats``, ``VmPolicy``, ``StoreStats``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wsd import __version__
from wsd.daemon import Daemon
from wsd.durations import FAULT_BUCKETS, CycleTimings, LabelledDurations
from wsd.evictor import EvictorConfig
from wsd.evictor.context import EvictorStats
from wsd.evictor.faults import FaultResult
from wsd.evictor.policy import VmPolicy
from wsd.kernel import thread_nice
from wsd.metrics import MetricsState, WsdCollector, make_registry, serve_metrics
from wsd.storage import StoreStats
from wsd.storage.page import OpCounters
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region

NOW = 100.0
CYCLES = 20  # horizons 1, 4 and 16 are valid, 64 is not; idle ages up to 16 are known
PAGES = 64
THP_PAGES = 512
MiB = 1 << 20


@dataclass
class FakeSession:
    vm_id: str
    tracker: SimpleNamespace
    ctx: SimpleNamespace
    last_hot: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    faults: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(latency=LabelledDurations(FAULT_BUCKETS))
    )
    timings: CycleTimings = field(default_factory=CycleTimings)


def region(index: int, npages: int, page_size: int) -> Region:
    base = 0x7F00_0000_0000 + index * (1 << 32)
    return Region(
        guest_phys_addr=index << 32,
        host_virt_addr=base,
        size=npages * page_size,
        fd_index=index,
        page_size=page_size,
    )


def tracked(index: int, npages: int, granularity: Granularity, cycles: int) -> TrackedRegion:
    """A region whose first 8 pages are hot every cycle, all resident, 16 then evicted."""
    state = RegionState(npages, granularity, started_at=0.0)
    hot = np.zeros(npages, dtype=np.bool_)
    hot[:8] = True
    resident = np.ones(npages, dtype=np.bool_)
    for c in range(cycles):
        state.observe(hot, resident, now=float(c + 1))
    if cycles:
        state.note_evicted(np.arange(npages - 16, npages))
    return TrackedRegion(region(index, npages, granularity.page_size), -1, state)


def session(vm_id: str, *, cycles: int, granularities: list[Granularity]) -> FakeSession:
    # A THP region is a whole number of 2 MiB granules.
    sizes = [PAGES if g.granule_bytes == g.page_size else THP_PAGES for g in granularities]
    regions = [
        tracked(i, n, g, cycles) for i, (n, g) in enumerate(zip(sizes, granularities, strict=True))
    ]
    tracker = SimpleNamespace(
        mode=TrackingMode.RWP,
        regions=regions,
        cycles=cycles,
        sync_faults=7,
        minor_faults=3,
        late_rwp_faults=1,
    )
    stats = EvictorStats(
        windows=cycles,
        evicted_pages=16 * len(regions),
        evicted_bytes=sum(16 * t.region.page_size for t in regions),
        batches=4,
        failed_batches=1,
        skipped_touched=2,
        fetched_pages=5,
        fetched_bytes=5 * 4096,
        prefetched_pages=2,
        zero_fills=11,
        fetch_errors=3,
        fetches_stuck=1,
        poisoned_pages=1,
        copy_races=1,
    )
    vm = VmPolicy(EvictorConfig(), started_at=0.0)
    vm.threshold = 12
    vm.note_refaults(NOW - 30, 4)
    vm.early_refaults = 2
    last_hot = [np.packbits(t.state.ages == 0) for t in regions] if cycles else []
    tier = SimpleNamespace(timeouts=5, stuck=2)
    s = FakeSession(vm_id, tracker, SimpleNamespace(stats=stats, vm=vm, tier=tier), last_hot)
    if cycles:
        # Two zero fills of 20 µs, three fetches from the store (one retried), a stall.
        latency = s.faults.latency
        for seconds in (20e-6, 20e-6):
            latency.observe(("", FaultResult.ZERO), seconds)
        for seconds in (300e-6, 0.002):
            latency.observe(("tiered", FaultResult.OK), seconds)
        latency.observe(("tiered", FaultResult.RETRIED), 0.5)
        for _ in range(cycles):
            s.timings.scan.observe(0.001)
            s.timings.window.observe(0.003)
            s.timings.cycle.observe(0.04)
        s.timings.stall.observe("rwp", 50e-6)
        s.timings.stall.observe("minor", 8e-6)
    return s


def store_stats() -> StoreStats:
    zstd = StoreStats("tiered/zstd", 10, 3000, 10 * 4096, 1 << 30, OpCounters(puts=2, gets=5))
    file = StoreStats("tiered/file", 6, 6 * 4096, 6 * 4096, None, OpCounters(failures=1))
    return StoreStats(
        "tiered", 16, 3000 + 6 * 4096, 16 * 4096, None, OpCounters(puts=3), (zstd, file)
    )


def fake_daemon(*, store: bool = True) -> Daemon:
    sessions = {
        "a": session("a", cycles=CYCLES, granularities=[Granularity.PAGE_4K, Granularity.HUGE_2M]),
        "b": session("b", cycles=0, granularities=[Granularity.THP_2M_UNTRAPPABLE]),
    }
    return cast(
        Daemon,
        SimpleNamespace(
            sessions=sessions,
            decision=SimpleNamespace(mode=TrackingMode.RWP),
            store=object() if store else None,
            clock=lambda: NOW,
        ),
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    state = MetricsState(store_stats=store_stats(), store_stats_at=NOW - 2.5)
    return make_registry(fake_daemon(), state)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


def test_the_exposition_parses_with_one_family_per_name(registry: CollectorRegistry) -> None:
    text = generate_latest(registry).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    for name in (
        "wsd_info",
        "wsd_sessions",
        "wsd_vm_info",
        "wsd_region_info",
        "wsd_working_set_bytes",
        "wsd_evicted_bytes",  # the counter: wsd_evicted_bytes_total
        "wsd_evicted_memory_bytes",
        "wsd_store_pages",
        "process_cpu_seconds",
        "python_info",
    ):
        assert name in names


def test_every_metric_is_documented(registry: CollectorRegistry) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    suffix = {"counter": "_total", "info": "_info"}
    names = {f.name + suffix.get(f.type, "") for f in registry.collect()}
    undocumented = {n for n in names if n.startswith("wsd") and f"`{n}" not in doc}
    assert not undocumented


def exported_names(reg: CollectorRegistry) -> set[str]:
    """Every name a query can use: families (as documented) and their samples."""
    suffix = {"counter": "_total", "info": "_info"}
    names = set()
    for family in reg.collect():
        names.add(family.name + suffix.get(family.type, ""))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_documented_metric_is_exported(registry: CollectorRegistry) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    documented = {n for row in rows for n in re.findall(r"`(wsd_[a-z0-9_]+)", row)}
    assert len(documented) > 50
    assert not documented - exported_names(registry)


def test_daemon_level(registry: CollectorRegistry) -> None:
    assert value(registry, "wsd_info", version=__version__, mode="rwp") == 1
    assert value(registry, "wsd_sessions") == 2
    assert value(registry, "process_cpu_seconds_total") >= 0
    assert registry.get_sample_value("process_open_fds") is not None


def test_vm_and_region_info(registry: CollectorRegistry) -> None:
    assert value(registry, "wsd_vm_info", vm_id="a", mode="rwp") == 1
    assert value(registry, "wsd_vm_info", vm_id="b", mode="rwp") == 1
    info = {"granularity": "4k", "page_size": "4096"}
    assert value(registry, "wsd_region_info", vm_id="a", region="0", **info) == 1
    info = {"granularity": "hugetlb-2m", "page_size": str(2 * MiB)}
    assert value(registry, "wsd_region_info", vm_id="a", region="1", **info) == 1
    info = {"granularity": "thp-2m-untrappable", "page_size": "4096"}
    assert value(registry, "wsd_region_info", vm_id="b", region="0", **info) == 1


@pytest.mark.parametrize(("index", "page_size"), [("0", 4096), ("1", 2 * MiB)])
def test_memory_gauges_per_region(registry: CollectorRegistry, index: str, page_size: int) -> None:
    r = {"vm_id": "a", "region": index}
    assert value(registry, "wsd_guest_memory_bytes", **r) == PAGES * page_size
    assert value(registry, "wsd_resident_memory_bytes", **r) == (PAGES - 16) * page_size
    assert value(registry, "wsd_evicted_memory_bytes", **r) == 16 * page_size
    assert value(registry, "wsd_hot_memory_bytes", **r) == 8 * page_size


def test_a_vm_before_its_first_cycle(registry: CollectorRegistry) -> None:
    r = {"vm_id": "b", "region": "0"}
    assert value(registry, "wsd_guest_memory_bytes", **r) == 2 * MiB
    assert value(registry, "wsd_evicted_memory_bytes", **r) == 0
    # No scan yet: no hot set, and no working set or idle age is known.
    assert registry.get_sample_value("wsd_hot_memory_bytes", r) is None
    assert (
        registry.get_sample_value("wsd_working_set_bytes", {**r, "horizon_intervals": "1"}) is None
    )
    assert value(registry, "wsd_resident_idle_memory_bytes", **r, idle_intervals_ge="0") == 0
    assert registry.get_sample_value("wsd_refaults_per_minute", {"vm_id": "b"}) is not None
    assert value(registry, "wsd_tracker_cycles_total", vm_id="b") == 0


def test_working_set_per_valid_horizon(registry: CollectorRegistry) -> None:
    r = {"vm_id": "a", "region": "0"}
    for h in ("1", "4", "16"):
        assert value(registry, "wsd_working_set_bytes", **r, horizon_intervals=h) == 8 * 4096
        assert value(registry, "wsd_working_set_window_seconds", **r, horizon_intervals=h) == int(h)
    # 64 intervals were not observed yet: an estimate would be an under-count.
    assert (
        registry.get_sample_value("wsd_working_set_bytes", {**r, "horizon_intervals": "64"}) is None
    )
    r1 = {"vm_id": "a", "region": "1", "horizon_intervals": "16"}
    assert value(registry, "wsd_working_set_bytes", **r1) == 8 * 2 * MiB


def test_idle_age_histogram_is_cumulative_and_known_ages_only(registry: CollectorRegistry) -> None:
    r = {"vm_id": "a", "region": "0"}

    def idle(ge: int) -> float | None:
        return registry.get_sample_value(
            "wsd_resident_idle_memory_bytes", {**r, "idle_intervals_ge": str(ge)}
        )

    # 48 resident pages: 8 hot (age 0) and 40 idle since the start (age 20).
    assert idle(0) == 48 * 4096
    for ge in (1, 2, 4, 8, 16):
        assert idle(ge) == 40 * 4096
    for ge in (32, 64, 128, 255):
        assert idle(ge) is None  # only 20 intervals observed


def test_evictor_counters(registry: CollectorRegistry) -> None:
    expected = {
        "wsd_evicted_pages_total": 32,
        "wsd_evicted_bytes_total": 16 * 4096 + 16 * 2 * MiB,
        "wsd_fetched_pages_total": 5,
        "wsd_fetched_bytes_total": 5 * 4096,
        "wsd_prefetched_pages_total": 2,
        "wsd_zero_fills_total": 11,
        "wsd_fetch_errors_total": 3,
        "wsd_stuck_fetches_total": 1,
        "wsd_poisoned_pages_total": 1,
        "wsd_evict_skipped_touched_pages_total": 2,
        "wsd_evict_batches_total": 4,
        "wsd_evict_failed_batches_total": 1,
        "wsd_evict_windows_total": CYCLES,
        "wsd_fetch_copy_races_total": 1,
        "wsd_evict_held_back_pages_total": 0,
        "wsd_evict_punch_remnants_total": 0,
        "wsd_evict_punch_remnants_restored_total": 0,
    }
    for name, want in expected.items():
        assert value(registry, name, vm_id="a") == want, name


def test_tracker_counters_and_guard(registry: CollectorRegistry) -> None:
    assert value(registry, "wsd_tracker_cycles_total", vm_id="a") == CYCLES
    assert value(registry, "wsd_tracker_rwp_faults_total", vm_id="a") == 7
    assert value(registry, "wsd_tracker_late_rwp_faults_total", vm_id="a") == 1
    assert value(registry, "wsd_tracker_minor_faults_total", vm_id="a") == 3
    assert value(registry, "wsd_refaults_total", vm_id="a") == 4
    assert value(registry, "wsd_early_refaults_total", vm_id="a") == 2
    # 4 refaults in the last 60 s.
    assert value(registry, "wsd_refaults_per_minute", vm_id="a") == pytest.approx(4.0)
    assert value(registry, "wsd_idle_threshold_intervals", vm_id="a") == 12


def test_the_refault_rate_is_absent_while_too_young() -> None:
    daemon = fake_daemon()
    sessions = cast("dict[str, FakeSession]", daemon.sessions)
    sessions["a"].ctx.vm = VmPolicy(EvictorConfig(), started_at=NOW - 1)
    reg = make_registry(daemon, MetricsState())
    assert reg.get_sample_value("wsd_refaults_per_minute", {"vm_id": "a"}) is None
    assert value(reg, "wsd_idle_threshold_intervals", vm_id="a") == 8


def test_store_and_its_tiers(registry: CollectorRegistry) -> None:
    top = {"backend": "tiered", "tier": ""}
    zstd = {"backend": "tiered/zstd", "tier": "0"}
    file = {"backend": "tiered/file", "tier": "1"}
    assert value(registry, "wsd_store_pages", **top) == 16
    assert value(registry, "wsd_store_logical_bytes", **top) == 16 * 4096
    assert value(registry, "wsd_store_stored_bytes", **zstd) == 3000
    assert value(registry, "wsd_store_budget_bytes", **zstd) == 1 << 30
    assert registry.get_sample_value("wsd_store_budget_bytes", file) is None
    assert value(registry, "wsd_store_pages", **file) == 6
    assert value(registry, "wsd_store_puts_total", **top) == 3
    assert value(registry, "wsd_store_gets_total", **zstd) == 5
    assert value(registry, "wsd_store_failures_total", **file) == 1
    assert value(registry, "wsd_store_integrity_errors_total", **file) == 0
    assert value(registry, "wsd_store_stats_age_seconds") == 2.5


def test_no_store_metrics_without_a_store_or_a_snapshot() -> None:
    for daemon, state in (
        (fake_daemon(store=False), MetricsState(store_stats(), NOW)),
        (fake_daemon(), MetricsState()),
    ):
        reg = make_registry(daemon, state)
        assert reg.get_sample_value("wsd_store_pages", {"backend": "tiered", "tier": ""}) is None
        assert reg.get_sample_value("wsd_store_stats_age_seconds") is None
        assert value(reg, "wsd_sessions") == 2


@pytest.mark.asyncio
async def test_refresh_takes_a_snapshot() -> None:
    class Store:
        async def stats(self) -> StoreStats:
            return store_stats()

    state = MetricsState()
    await state.refresh(Store(), 42.0)  # type: ignore[arg-type]
    assert state.store_stats == store_stats()
    assert state.store_stats_at == 42.0


@pytest.mark.asyncio
async def test_a_scrape_from_another_thread_reads_on_the_loop() -> None:
    seen: list[threading.Thread] = []
    daemon = fake_daemon()
    clock = daemon.clock

    def spy() -> float:
        seen.append(threading.current_thread())
        return clock()

    daemon.clock = spy
    collector = WsdCollector(daemon, MetricsState())  # made on the loop: bound to it
    families = await asyncio.to_thread(lambda: list(collector.collect()))
    assert any(f.name == "wsd_sessions" for f in families)
    assert seen == [threading.current_thread()]


@pytest.mark.asyncio
async def test_a_scrape_counts_idle_ages_off_the_loop(
    idle_counting_threads: list[threading.Thread], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = fake_daemon()
    state = daemon.sessions["a"].tracker.regions[0].state
    state.note_access([0, 1, 2])  # a new version: the counts are no longer cached
    collector = WsdCollector(daemon, MetricsState())  # made on the loop: bound to it
    families = await asyncio.to_thread(lambda: list(collector.collect()))
    assert idle_counting_threads and threading.main_thread() not in idle_counting_threads
    wss = {
        sample.labels["horizon_intervals"]: sample.value
        for family in families
        if family.name == "wsd_working_set_bytes"
        for sample in family.samples
        if (sample.labels["vm_id"], sample.labels["region"]) == ("a", "0")
    }
    monkeypatch.undo()
    want = {str(h): e.bytes for h, e in state.working_set().items() if e.bytes is not None}
    assert wss == want and want


@pytest.mark.asyncio
async def test_a_scrape_fails_when_the_loop_does_not_answer() -> None:
    collector = WsdCollector(fake_daemon(), MetricsState(), loop_timeout=0.05)
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            list(collector.collect())
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=scrape)
    worker.start()
    worker.join()  # blocks the loop: the read can never run
    assert len(errors) == 1 and isinstance(errors[0], TimeoutError)
    await asyncio.sleep(0)  # the late read runs and finds the scrape gone


@pytest.mark.asyncio
async def test_serve_scrape_and_stop() -> None:
    registry = make_registry(fake_daemon(), MetricsState(store_stats(), NOW))
    threads = set(threading.enumerate())
    server = await serve_metrics(registry, "127.0.0.1", 0)
    host, port = server.address
    assert host == "127.0.0.1" and port > 0

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    text = await asyncio.to_thread(scrape)
    assert 'wsd_working_set_bytes{horizon_intervals="16",region="0",vm_id="a"}' in text
    # Its thread steps below the priority it inherits (the loop's, in the daemon).
    (served,) = [t for t in threading.enumerate() if t.name == "wsd-metrics"]
    assert served.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, served.native_id) > min(18, thread_nice())
    assert "process_resident_memory_bytes" in text
    await server.close()
    await server.close()  # idempotent
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=1).close()

    def ours() -> set[threading.Thread]:
        # The loop's executor (asyncio_N, used by to_thread) is the test's, not ours.
        return {t for t in threading.enumerate() if not t.name.startswith("asyncio_")} - threads

    # A request's thread ends just after its response is sent; give it a moment.
    for _ in range(100):
        if not ours():
            break
        await asyncio.sleep(0.01)
    assert not ours()


@pytest.mark.asyncio
async def test_serving_on_a_busy_port_names_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
            await serve_metrics(CollectorRegistry(), "127.0.0.1", port)


def bucket(reg: CollectorRegistry, name: str, le: str, **labels: str) -> float:
    return value(reg, f"{name}_bucket", **labels, le=le)


def test_fault_latency_by_backend_and_result(registry: CollectorRegistry) -> None:
    name = "wsd_fault_latency_seconds"
    zero = {"vm_id": "a", "backend": "", "result": "zero"}
    assert value(registry, f"{name}_count", **zero) == 2
    assert value(registry, f"{name}_sum", **zero) == pytest.approx(40e-6)
    assert bucket(registry, name, "1e-05", **zero) == 0
    assert bucket(registry, name, "2.5e-05", **zero) == 2
    ok = {"vm_id": "a", "backend": "tiered", "result": "ok"}
    # Cumulative: 300 µs in the 500 µs bucket, 2 ms in the 2.5 ms one.
    assert bucket(registry, name, "0.0005", **ok) == 1
    assert bucket(registry, name, "0.0025", **ok) == 2
    assert bucket(registry, name, "+Inf", **ok) == 2
    retried = {"vm_id": "a", "backend": "tiered", "result": "retried"}
    assert bucket(registry, name, "0.25", **retried) == 0
    assert bucket(registry, name, "0.5", **retried) == 1  # `le` is inclusive
    # Only outcomes that happened have a series.
    assert registry.get_sample_value(f"{name}_count", {**ok, "result": "poisoned"}) is None


def test_scan_window_and_cycle_durations(registry: CollectorRegistry) -> None:
    a = {"vm_id": "a"}
    for name, seconds, le_below, le_at in (
        ("wsd_scan_duration_seconds", 0.001, "0.0005", "0.001"),
        ("wsd_sync_window_duration_seconds", 0.003, "0.0025", "0.005"),
        ("wsd_cycle_duration_seconds", 0.04, "0.025", "0.05"),
    ):
        assert value(registry, f"{name}_count", **a) == CYCLES, name
        assert value(registry, f"{name}_sum", **a) == pytest.approx(CYCLES * seconds), name
        assert bucket(registry, name, le_below, **a) == 0, name
        assert bucket(registry, name, le_at, **a) == CYCLES, name
    # Before its first cycle a VM has empty histograms.
    assert value(registry, "wsd_cycle_duration_seconds_count", vm_id="b") == 0


def test_no_sync_window_in_wp_async_mode() -> None:
    daemon = fake_daemon()
    sessions = cast("dict[str, FakeSession]", daemon.sessions)
    sessions["a"].tracker.mode = TrackingMode.WP_ASYNC
    reg = make_registry(daemon, MetricsState())
    assert reg.get_sample_value("wsd_sync_window_duration_seconds_count", {"vm_id": "a"}) is None
    assert value(reg, "wsd_scan_duration_seconds_count", vm_id="a") == CYCLES


def test_vcpu_stall_by_fault_kind(registry: CollectorRegistry) -> None:
    name = "wsd_vcpu_stall_seconds"
    assert value(registry, f"{name}_count", vm_id="a", fault="rwp") == 1
    assert bucket(registry, name, "5e-05", vm_id="a", fault="rwp") == 1
    assert bucket(registry, name, "2.5e-05", vm_id="a", fault="rwp") == 0
    assert value(registry, f"{name}_sum", vm_id="a", fault="minor") == pytest.approx(8e-6)


def test_tier_calls_past_their_deadline(registry: CollectorRegistry) -> None:
    assert value(registry, "wsd_tier_call_timeouts_total", vm_id="a") == 5
    assert value(registry, "wsd_tier_calls_stuck", vm_id="a") == 2
