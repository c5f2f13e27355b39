"""Choosing the tracking mode from what the kernel offers.

``rwp`` (Linux 7.3+): read-write protection in async mode, hot set from a
non-inverted ``PAGE_IS_ACCESSED`` scan, a sync window via ``UFFDIO_SET_MODE``
to make eviction race-free, fetch-back through MISSING faults.

``wp-async`` (Linux 6.7+): the degraded mode.  Write protection in async mode
and ``PAGE_IS_WRITTEN`` see *writes only*: a page the guest only reads looks
idle and may be evicted, then comes back through a MISSING fault.  It stays
correct (no page is lost) but costs refaults; the policy learns hotness from
them.  With no sync window, eviction verifies each punch instead
(:func:`wsd.evictor.transaction.punch_held`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wsd.kernel import FeatureUnavailable, KernelFeatures, RegisterMode
from wsd.kernel.uffd import Feature, Ioctl, feature_requirement
from wsd.tracker import TrackingMode

__all__ = ["ModeDecision", "TrackingMode", "choose_mode"]


# uffd features each mode cannot work without.  MISSING_SHMEM is for the
# fetch-back of evicted memfd pages in both.
NEEDED: dict[TrackingMode, Feature] = {
    TrackingMode.RWP: Feature.RWP | Feature.RWP_ASYNC | Feature.MISSING_SHMEM,
    TrackingMode.WP_ASYNC: Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM | Feature.MISSING_SHMEM,
}
REGISTER: dict[TrackingMode, RegisterMode] = {
    TrackingMode.RWP: RegisterMode.RWP | RegisterMode.MISSING,
    TrackingMode.WP_ASYNC: RegisterMode.WP | RegisterMode.MISSING,
}
LIMITATIONS: dict[TrackingMode, tuple[str, ...]] = {
    TrackingMode.RWP: (),
    TrackingMode.WP_ASYNC: (
        "sees writes only: read-only hot pages look idle, get evicted and come back by "
        "refault; the refault penalty keeps them resident after that",
        "no sync window: each punch is verified instead, and a page written while it "
        "was being evicted is put back (docs/evictor.md)",
    ),
}


@dataclass(frozen=True)
class ModeDecision:
    mode: TrackingMode
    register_mode: RegisterMode
    reason: str
    limitations: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)


def _missing(k: KernelFeatures, mode: TrackingMode) -> str | None:
    """Why ``mode`` cannot run on ``k``, or None if it can."""
    if not k.userfaultfd:
        return f"userfaultfd unavailable ({k.uffd_error})"
    absent = NEEDED[mode] & ~k.features
    if absent:
        names = ", ".join(f.name or "" for f in Feature if f in absent)
        return f"missing uffd features {names} (needs {feature_requirement(absent)})"
    if not k.pagemap_scan:
        return "PAGEMAP_SCAN unavailable (needs Linux 6.7)"
    if mode is TrackingMode.RWP:
        if not k.pagemap_accessed:
            return "PAGEMAP_SCAN lacks PAGE_IS_ACCESSED (needs Linux 7.3)"
        if Ioctl.SET_MODE not in k.ioctls:
            return "UFFDIO_SET_MODE unavailable (needs Linux 7.3)"
    if k.can_register("shmem", REGISTER[mode]) is False:
        return f"registering {REGISTER[mode]!r} on shmem fails on this kernel"
    return None


def choose_mode(k: KernelFeatures, prefer: TrackingMode | None = None) -> ModeDecision:
    """Pick ``rwp`` when the kernel has it, else ``wp-async``; raise if neither works.

    ``prefer`` forces a mode (e.g. to test the fallback on a 7.3 kernel); it
    still has to be supported.
    """
    order = [prefer] if prefer else [TrackingMode.RWP, TrackingMode.WP_ASYNC]
    rejected: dict[str, str] = {}
    for mode in order:
        why_not = _missing(k, mode)
        if why_not is None:
            reason = (
                "requested"
                if prefer
                else (
                    "kernel supports userfaultfd RWP"
                    if mode is TrackingMode.RWP
                    else "kernel lacks RWP; falling back to write tracking"
                )
            )
            return ModeDecision(mode, REGISTER[mode], reason, LIMITATIONS[mode], rejected)
        rejected[mode.value] = why_not
    detail = "; ".join(f"{m}: {why}" for m, why in rejected.items())
    raise FeatureUnavailable("a working-set tracking mode", f"Linux 6.7 or newer ({detail})")
