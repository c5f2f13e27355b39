"""The live part of ``wsd demo``: the daemon, the guest and the view (:mod:`wsd.demo`)."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import uvloop

from wsd import logs
from wsd.config import MetricsSection
from wsd.daemon import Daemon, Session, Settings
from wsd.demo import DemoOptions
from wsd.evictor import EvictorConfig
from wsd.evictor.drain import drain
from wsd.guest.process import GuestError, GuestProcess
from wsd.storage import FileStoreConfig
from wsd.testing.running import running_daemon

VM_ID = "demo"
MIB = 1 << 20

# Quicker than the defaults, so that half a minute shows the whole story:
# pages idle for 3 intervals go, a refault doubles a page's threshold.
DEMO_EVICTOR = EvictorConfig(
    min_idle_cycles=3,
    max_idle_cycles=32,
    refault_window_cycles=8,
    refault_penalty_cycles=4,
    rate_mb_per_second=None,
    promotion_target_percent_per_minute=None,
    prefetch_pages=0,  # the demo's hot sets are scattered pages: neighbours are cold
)

# Metrics shown in the summary, read back from the live endpoint.
SHOWN_METRICS = (
    "wsd_guest_memory_bytes",
    "wsd_resident_memory_bytes",
    "wsd_evicted_memory_bytes",
    "wsd_working_set_bytes",
    "wsd_evicted_pages_total",
    "wsd_fetched_pages_total",
    "wsd_fault_latency_seconds_count",
)


def run(opts: DemoOptions) -> int:
    # The live view is on stdout; wsd's own log goes to stderr, warnings only.
    logs.configure(logs.LogFormat.AUTO, logs.LogLevel.WARNING)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(opts))


def _mib(n: float) -> str:
    return f"{n / MIB:7.1f} MiB"


@dataclass
class _View:
    guest: int
    resident: int
    evicted: int
    wss: int | None
    fetched: int
    raced: int


def _view(s: Session) -> _View:
    regions = s.tracker.regions
    wss = 0
    for t in regions:
        smallest = min(t.state.working_set().values(), key=lambda e: e.horizon)
        if smallest.pages is None:
            wss = -1
            break
        wss += smallest.pages * t.region.page_size
    return _View(
        guest=sum(t.region.size for t in regions),
        resident=sum(t.state.resident_pages * t.region.page_size for t in regions),
        evicted=sum(t.state.evicted_pages * t.region.page_size for t in regions),
        wss=None if wss < 0 else wss,
        fetched=s.ctx.stats.fetched_pages,
        raced=s.ctx.stats.raced_writes,
    )


async def _demo(opts: DemoOptions) -> int:
    with tempfile.TemporaryDirectory(prefix="wsd-demo-") as tmp_dir:
        tmp = Path(tmp_dir)
        settings = Settings(
            socket=tmp / "wsd.sock",
            control_socket=tmp / "control.sock",
            interval=opts.interval,
            storage=FileStoreConfig(root=tmp / "pages"),
            evictor=DEMO_EVICTOR,
            state_dir=tmp / "state",
            metrics=MetricsSection(address="127.0.0.1:0"),
        )
        async with running_daemon(settings) as d:
            return await _with_daemon(d, opts, tmp)


async def _with_daemon(d: Daemon, opts: DemoOptions, tmp: Path) -> int:
    decision = d.decision
    print(f"wsd demo: kernel {d.kernel.release}, tracking mode {decision.mode} ({decision.reason})")
    for limitation in decision.limitations:
        print(f"  limitation: {limitation}")
    assert d.metrics_server is not None
    host, port = d.metrics_server.address
    metrics_url = f"http://{host}:{port}/metrics"
    print(f"  metrics: {metrics_url}   control: wsd status --socket {tmp / 'control.sock'}")
    print(
        f"  guest: {opts.size}, hot set {opts.hot} moving every {opts.phase_seconds:g} s, "
        f"{opts.threads} threads, 30% writes; file tier in {tmp / 'pages'}"
    )
    argv = [
        "--socket",
        str(d.settings.socket),
        "--vm-id",
        VM_ID,
        "--size",
        opts.size,
        "--hot",
        opts.hot,
        "--pattern",
        "phases",
        "--phase-seconds",
        str(opts.phase_seconds),
        "--threads",
        str(opts.threads),
        "--write-ratio",
        "0.3",
        "--thp",
        "never",
    ]
    start = functools.partial(GuestProcess.start, argv, ready_timeout=300)
    guest = await asyncio.to_thread(start)
    try:
        return await _watch(d, guest, opts, metrics_url)
    finally:
        guest.close()


async def _watch(d: Daemon, guest: GuestProcess, opts: DemoOptions, metrics_url: str) -> int:
    s = d.sessions[VM_ID]
    print()
    print("     t        wss     resident      evicted   refaults/s  raced  guest")
    began = time.monotonic()
    last_fetched, last_t = 0, began
    peak_evicted = 0
    while (now := time.monotonic()) - began < opts.seconds:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        v = _view(s)
        peak_evicted = max(peak_evicted, v.evicted)
        rate = (v.fetched - last_fetched) / (now - last_t)
        last_fetched, last_t = v.fetched, now
        alive = "running" if guest.proc.poll() is None else "EXITED"
        wss = _mib(v.wss) if v.wss is not None else "        ..."
        print(
            f"{now - began:5.0f}s {wss} {_mib(v.resident)} {_mib(v.evicted)} "
            f"{rate:11.0f} {v.raced:6d}  {alive}"
        )
        if guest.proc.poll() is not None:
            break
    metrics = await asyncio.to_thread(_scrape, metrics_url)
    stats = s.ctx.stats
    # Stop evicting and bring every page back in bulk, as stopping wsd would,
    # so the guest's final check of every page does not fault on each one
    # (slow under TCG).  The check then proves the drained bytes are right.
    s.ctx.config = s.ctx.config.model_copy(update={"enabled": False})
    evicted_at_end = _view(s).evicted
    fetched_on_fault = stats.fetched_pages
    await drain(s.ctx, s.faults)
    try:
        code = await asyncio.to_thread(guest.stop, 300)
        report = guest.report()
    except (subprocess.TimeoutExpired, GuestError, OSError, ValueError) as e:
        print(f"\nFAILED: the guest did not stop cleanly: {e}\n{guest.stderr()}")
        return 1
    v = _view(s)
    print()
    print(f"summary ({d.decision.mode} mode, {time.monotonic() - began:.0f} s):")
    print(f"  guest memory        {_mib(v.guest)}")
    print(f"  peak evicted        {_mib(peak_evicted)}")
    print(f"  evicted pages       {stats.evicted_pages} ({_mib(stats.evicted_bytes).strip()})")
    fetched = f"{fetched_on_fault} pages on fault"
    print(f"  fetched back        {fetched}")
    print(f"  drained at the end  {_mib(evicted_at_end).strip()}, before the guest's final check")
    if stats.raced_writes:
        print(f"  raced writes kept   {stats.raced_writes} (written while being evicted, put back)")
    print(f"  guest operations    {report['ops']} ({report['writes']} writes)")
    ok = code == 0 and report["verify_errors"] == 0 and report["unverified"] == 0
    print(
        f"  data verified       {'OK' if ok else 'FAILED'}: {report['final_check_pages']} pages "
        f"re-read at exit, {report['verify_errors']} errors"
    )
    print(f"  metrics were at     {metrics_url}")
    for line in metrics:
        print(f"    {line}")
    if not ok:
        print(guest.stderr())
    return 0 if ok else 1


def _scrape(url: str) -> list[str]:
    """The summary's metrics, as Prometheus served them during the run."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return [
        line
        for line in text.splitlines()
        if line.startswith(SHOWN_METRICS) and f'vm_id="{VM_ID}"' in line
    ]
