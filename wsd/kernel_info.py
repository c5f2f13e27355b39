"""``wsd kernel-info``: what this kernel offers and which mode wsd would pick."""

from __future__ import annotations

from typing import Any

from wsd.kernel import FeatureUnavailable, KernelFeatures
from wsd.kernel.uffd import FEATURE_REQUIREMENT, Feature, Ioctl
from wsd.tracker.mode import ModeDecision, choose_mode

# The features the report lists, in the order an operator cares about them.
REPORTED = (
    Feature.RWP,
    Feature.RWP_ASYNC,
    Feature.WP_ASYNC,
    Feature.WP_HUGETLBFS_SHMEM,
    Feature.MISSING_SHMEM,
    Feature.MISSING_HUGETLBFS,
    Feature.MINOR_SHMEM,
    Feature.MINOR_HUGETLBFS,
    Feature.EVENT_REMOVE,
    Feature.EVENT_UNMAP,
    Feature.EVENT_REMAP,
    Feature.POISON,
)


def decide(k: KernelFeatures) -> tuple[ModeDecision | None, str | None]:
    try:
        return choose_mode(k), None
    except FeatureUnavailable as e:
        return None, str(e)


def as_json(k: KernelFeatures) -> dict[str, Any]:
    decision, error = decide(k)
    return {
        "kernel": k.to_json(),
        "tracking_mode": decision.mode.value if decision else None,
        "tracking_reason": decision.reason if decision else error,
        "limitations": list(decision.limitations) if decision else [],
        "rejected_modes": decision.rejected if decision else {},
    }


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def as_text(k: KernelFeatures) -> str:
    lines = [f"kernel                 {k.release}"]
    if not k.userfaultfd:
        lines.append(f"userfaultfd            no ({k.uffd_error})")
    else:
        unpriv = k.unprivileged_userfaultfd
        dev = "present" if k.dev_userfaultfd else "absent"
        lines.append(
            f"userfaultfd            yes (/dev/userfaultfd {dev},"
            f" vm.unprivileged_userfaultfd={unpriv if unpriv is not None else '?'})"
        )
        for f in REPORTED:
            have = f in k.features
            note = "" if have else f"   needs {FEATURE_REQUIREMENT.get(f, 'a newer kernel')}"
            lines.append(f"  {f.name:<20} {_yes(have)}{note}")
        lines.append(f"  {'UFFDIO_SET_MODE':<20} {_yes(Ioctl.SET_MODE in k.ioctls)}")
    scan = _yes(k.pagemap_scan) if k.pagemap_scan else f"no ({k.pagemap_error})"
    lines.append(f"PAGEMAP_SCAN           {scan}")
    lines.append(f"  {'PAGE_IS_ACCESSED':<20} {_yes(k.pagemap_accessed)}")
    for backing in ("shmem", "hugetlbfs"):
        probes = [p for p in k.register if p.backing == backing]
        if not probes:
            continue
        if not any(p.tried for p in probes):
            lines.append(f"register on {backing:<10} not tried: {probes[0].error}")
            continue
        parts = [f"{p.mode_name} {'ok' if p.ok else p.error}" for p in probes]
        lines.append(f"register on {backing:<10} " + ", ".join(parts))
    lines.append(f"THP enabled            {k.thp_enabled or '?'}")
    lines.append(f"THP shmem_enabled      {k.thp_shmem_enabled or '?'}")
    if k.thp_shmem_enabled in ("always", "within_size", "force"):
        lines.append(
            "  shmem THP is on: RWPROTECT zaps PMD-mapped shmem THPs instead of protecting"
            " them; wsd co-registers MINOR or refuses to evict such pages (RWP-FACTS fact 8)"
        )
    lines.append(f"free 2 MiB huge pages  {k.hugepages_2m_free}")
    decision, error = decide(k)
    if decision is None:
        lines.append(f"tracking mode          none: {error}")
    else:
        lines.append(f"tracking mode          {decision.mode} ({decision.reason})")
        for mode, why in decision.rejected.items():
            lines.append(f"  not {mode}: {why}")
        for lim in decision.limitations:
            lines.append(f"  limitation: {lim}")
    return "\n".join(lines)
