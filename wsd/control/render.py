"""``wsd status`` for people: the JSON status (:mod:`.status`) as aligned tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_bytes", "format_duration", "format_status", "table"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_NONE = "-"


def format_bytes(n: int | None) -> str:
    """``None`` as ``-``, bytes with a binary unit: ``0 B``, ``4.0 KiB``, ``1.5 GiB``."""
    if n is None:
        return _NONE
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 0) -> list[str]:
    """Rows under headers, columns from index ``right`` on right-aligned (numbers)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    out = []
    for row in (headers, *rows):
        cells = [
            cell.rjust(w) if i >= right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def format_status(status: dict[str, Any]) -> str:
    d = status["daemon"]
    lines = [
        f"wsd {d['version']}, pid {d['pid']}, up {format_duration(d['uptime_seconds'])}, "
        f"mode {d['mode']}, kernel {d['kernel']}",
        f"config {d['config'] or '(none: defaults)'}, interval {d['interval_seconds']:g} s, "
        f"storage {d['storage'] or '(none: tracking only)'}",
        "",
    ]
    vms = status["vms"]
    if not vms:
        lines.append("no VMs tracked")
    else:
        lines += _vm_table(vms)
    store = status.get("store")
    if store is not None:
        lines += ["", *_store_table(store)]
    return "\n".join(lines)


def _vm_table(vms: list[dict[str, Any]]) -> list[str]:
    horizons = [w["horizon_intervals"] for w in vms[0]["working_set"]]
    headers = [
        "VM",
        "MODE",
        "EVICTION",
        "GRANULARITY",
        "GUEST",
        "RESIDENT",
        "EVICTED",
        "HOT",
        *(f"WSS@{h}" for h in horizons),
        "REFAULTS/MIN",
    ]
    rows = []
    notes = []
    for vm in vms:
        wss = {w["horizon_intervals"]: w["bytes"] for w in vm["working_set"]}
        rate = vm["refaults_per_minute"]
        rows.append(
            [
                vm["vm_id"],
                vm["mode"],
                vm["eviction"],
                ",".join(sorted({r["granularity"] for r in vm["regions"]})),
                format_bytes(vm["guest_bytes"]),
                format_bytes(vm["resident_bytes"]),
                format_bytes(vm["evicted_bytes"]),
                format_bytes(vm["hot_bytes"]),
                *(format_bytes(wss.get(h)) for h in horizons),
                _NONE if rate is None else f"{rate:.1f}",
            ]
        )
        if vm["eviction_off_because"]:
            what = {"draining": "draining", "failing": "eviction failing"}.get(
                vm["eviction"], "eviction off"
            )
            notes.append(f"{vm['vm_id']}: {what}: {vm['eviction_off_because']}")
    legend = (
        "WSS@N: memory accessed in the last N intervals "
        "(- until N intervals were seen); HOT: in the last one"
    )
    return [*table(headers, rows, right=4), "", legend, *notes]


def _store_table(store: dict[str, Any]) -> list[str]:
    rows = []

    def add(s: dict[str, Any], tier: str) -> None:
        counters = s["counters"]
        rows.append(
            [
                s["backend"],
                tier or "all",
                _NONE if s["pages"] is None else str(s["pages"]),
                format_bytes(s["stored_bytes"]),
                format_bytes(s["logical_bytes"]),
                format_bytes(s["budget_bytes"]),
                str(counters["failures"]),
            ]
        )
        for i, sub in enumerate(s["tiers"]):
            add(sub, f"{tier}.{i}" if tier else str(i))

    add(store, "")
    headers = ["STORE", "TIER", "PAGES", "STORED", "LOGICAL", "BUDGET", "FAILURES"]
    age = store.get("age_seconds")
    footer = [] if age is None else [f"(store figures read {age:.1f} s ago)"]
    return [*table(headers, rows, right=2), *footer]
