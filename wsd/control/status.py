"""``wsd status`` as JSON: the daemon, its store and every tracked VM.

The VM numbers come from :func:`wsd.snapshot.vm_snapshot` and the store's
from the snapshot the daemon refreshes for the metrics (``MetricsState``), so
status and metrics report the same values.  docs/control.md lists the fields.

:func:`take_status` reads the daemon on its event loop and returns what
builds the reply, to be called in another thread: the working sets count
every page of every region (milliseconds for a large guest), which would hold
up the loop's fault service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsd import __version__
from wsd.snapshot import RegionSnapshot, VmSnapshot, WorkingSet, vm_snapshot
from wsd.storage import StoreStats

if TYPE_CHECKING:
    from wsd.daemon import Daemon, Session

__all__ = ["eviction_state", "take_status"]


def take_status(daemon: Daemon, *, pid: int) -> Callable[[], dict[str, Any]]:
    """Read ``daemon`` (on its event loop); the returned function builds the reply."""
    now = daemon.clock()
    settings = daemon.settings
    state = daemon.metrics_state
    store = None
    if daemon.store is not None and state.store_stats is not None:
        store = _store(state.store_stats)
        if state.store_stats_at is not None:
            store["age_seconds"] = max(0.0, now - state.store_stats_at)
    vms = [
        (vm_snapshot(session, now), *eviction_state(session))
        # A VM whose session ended shows until its pages are back.
        for _, session in sorted({**daemon.draining, **daemon.sessions}.items())
    ]
    head = {
        "daemon": {
            "version": __version__,
            "pid": pid,
            "mode": str(daemon.decision.mode),
            "mode_reason": daemon.decision.reason,
            "limitations": list(daemon.decision.limitations),
            "fault_service": None if daemon.fault_service is None else str(daemon.fault_service),
            "kernel": daemon.kernel.release,
            "uptime_seconds": max(0.0, now - daemon.started_at),
            "config": _path(settings.config_path),
            "interval_seconds": settings.interval,
            "socket": str(settings.socket),
            "control_socket": _path(settings.control_socket),
            "storage": None if daemon.store is None else daemon.store.name,
        },
        "store": store,
    }
    return lambda: head | {"vms": [_vm(*vm) for vm in vms]}


def eviction_state(session: Session) -> tuple[str, str | None]:
    """``("active" | "paused" | "failing" | "off" | "draining", why)`` for one VM."""
    ctx = session.ctx
    if session.closed:
        return "draining", "the session ended: its evicted pages are being brought back"
    if ctx.store is None:
        return "off", "no storage configured"
    if not ctx.config.enabled:
        return "off", "evictor.enabled = false"
    reasons = session.evictor.reasons
    if all(reasons):
        return "off", "; ".join(sorted({r for r in reasons if r}))
    if session.paused:
        return "paused", None
    since = ctx.stats.storage_failing_since
    if since is not None:
        return "failing", (
            f"the store failed a batch; retried with backoff for "
            f"{max(0.0, ctx.clock() - since):.0f} s so far"
        )
    return "active", None


def _vm(vm: VmSnapshot, eviction: str, off_because: str | None) -> dict[str, Any]:
    return {
        "vm_id": vm.vm_id,
        "mode": vm.mode,
        "paused": vm.paused,
        "eviction": eviction,
        "eviction_off_because": off_because,
        "guest_bytes": vm.total("guest_bytes"),
        "resident_bytes": vm.total("resident_bytes"),
        "evicted_bytes": vm.total("evicted_bytes"),
        "hot_bytes": vm.total("hot_bytes"),
        "working_set": [_working_set(w) for w in vm.working_set()],
        "refaults_total": vm.refaults,
        "refaults_per_minute": vm.refaults_per_minute,
        "idle_threshold_intervals": vm.idle_threshold,
        "cycles": vm.cycles,
        "evicted_bytes_total": vm.evicted_bytes_total,
        "fetched_bytes_total": vm.fetched_bytes_total,
        "regions": [_region(r) for r in vm.regions],
    }


def _region(r: RegionSnapshot) -> dict[str, Any]:
    return {
        "index": r.index,
        "granularity": r.granularity,
        "page_size": r.page_size,
        "guest_bytes": r.guest_bytes,
        "resident_bytes": r.resident_bytes,
        "evicted_bytes": r.evicted_bytes,
        "hot_bytes": r.hot_bytes,
        "working_set": [_working_set(w) for w in r.working_set()],
        "not_evicted_because": r.not_evicted_because,
    }


def _working_set(w: WorkingSet) -> dict[str, Any]:
    return {"horizon_intervals": w.horizon, "bytes": w.bytes, "window_seconds": w.window_seconds}


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _store(s: StoreStats) -> dict[str, Any]:
    return {
        "backend": s.backend,
        "pages": s.pages,
        "stored_bytes": s.stored_bytes,
        "logical_bytes": s.logical_bytes,
        "budget_bytes": s.budget_bytes,
        "counters": {name: getattr(s.counters, name) for name in s.counters.__dataclass_fields__},
        "tiers": [_store(t) for t in s.tiers],
    }
