"""Probe what the running kernel offers wsd.  Probes, never version checks.

Everything here is observation: the feature mask from the documented
``UFFDIO_API`` probe, a real ``PAGEMAP_SCAN`` on our own pagemap, and real
``UFFDIO_REGISTER`` attempts on throwaway shmem (and, when huge pages are
reserved, hugetlbfs) mappings.  Which tracking mode to use with that is
policy and lives in :mod:`wsd.tracker.mode`.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._ffi import ffi
from .errors import KernelError
from .memfd import memfd_create
from .pagemap import PageCategory, Pagemap
from .uffd import ApiResult, Feature, Ioctl, RegisterMode, Userfaultfd, probe_api

__all__ = ["KernelFeatures", "RegisterProbe", "probe_kernel"]

HUGE_2M = 2 << 20

# Register-mode combinations worth knowing about before taking a hand-off.
SHMEM_PROBES: tuple[RegisterMode, ...] = (
    RegisterMode.MISSING,
    RegisterMode.MINOR,
    RegisterMode.WP,
    RegisterMode.WP | RegisterMode.MISSING,
    RegisterMode.RWP,
    RegisterMode.RWP | RegisterMode.MISSING | RegisterMode.MINOR,
)
HUGETLB_PROBES: tuple[RegisterMode, ...] = (
    RegisterMode.MISSING,
    RegisterMode.MINOR,
    RegisterMode.RWP | RegisterMode.MISSING,
)


@dataclass(frozen=True)
class RegisterProbe:
    backing: str  # "shmem" or "hugetlbfs"
    mode: RegisterMode
    ok: bool
    error: str | None = None  # errno name when not ok, or why it was not tried
    tried: bool = True

    @property
    def mode_name(self) -> str:
        return "|".join(m.name or "" for m in RegisterMode if m in self.mode)


@dataclass(frozen=True)
class KernelFeatures:
    release: str
    uffd_error: str | None = None
    features: Feature = Feature(0)
    ioctls: Ioctl = Ioctl(0)
    dev_userfaultfd: bool = False
    unprivileged_userfaultfd: int | None = None
    pagemap_scan: bool = False
    pagemap_accessed: bool = False
    pagemap_error: str | None = None
    thp_enabled: str | None = None
    thp_shmem_enabled: str | None = None
    hugepages_2m_free: int = 0
    register: tuple[RegisterProbe, ...] = field(default_factory=tuple)

    @property
    def userfaultfd(self) -> bool:
        return self.uffd_error is None

    def has(self, features: Feature) -> bool:
        return features & self.features == features

    def can_register(self, backing: str, mode: RegisterMode) -> bool | None:
        """True/False when probed, None when that combination was not tried."""
        for p in self.register:
            if p.backing == backing and p.mode == mode:
                return p.ok if p.tried else None
        return None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = sorted(f.name or "" for f in Feature if f in self.features)
        out["ioctls"] = sorted(i.name or "" for i in Ioctl if i in self.ioctls)
        out["register"] = [
            {
                "backing": p.backing,
                "mode": p.mode_name,
                "ok": p.ok,
                "tried": p.tried,
                "error": p.error,
            }
            for p in self.register
        ]
        return out


def _bracketed(path: Path) -> str | None:
    """The selected value of a sysfs choice file such as ``always [madvise] never``."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip() or None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _probe_pagemap() -> tuple[bool, bool, str | None]:
    """(PAGEMAP_SCAN works, PAGE_IS_ACCESSED is known, error) from a scan of our own page."""
    buf = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        buf[0] = 1
        with ffi.from_buffer(buf) as p, Pagemap.open("self") as pm:
            addr = int(ffi.cast("uintptr_t", p))
            try:
                pm.scan(addr, mmap.PAGESIZE, category_mask=PageCategory.PRESENT)
            except KernelError as e:
                return False, False, _errname(e)
            try:
                # Unknown category bits are EINVAL, so this tells 7.3+ apart.
                pm.scan(addr, mmap.PAGESIZE, anyof=PageCategory.ACCESSED)
            except KernelError:
                return True, False, None
            return True, True, None
    finally:
        buf.close()


def _probe_register(
    api: ApiResult, backing: str, modes: tuple[RegisterMode, ...], hugetlb: bool
) -> list[RegisterProbe]:
    size = HUGE_2M if hugetlb else 2 * mmap.PAGESIZE
    fd = memfd_create(
        f"wsd-probe-{backing}", size=size, hugetlb_page_size=HUGE_2M if hugetlb else None
    )
    try:
        area = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except OSError as e:
        os.close(fd)
        return [RegisterProbe(backing, m, False, f"mmap: {_errname(e)}") for m in modes]
    out = []
    try:
        with ffi.from_buffer(area) as p:
            addr = int(ffi.cast("uintptr_t", p))
            # SIGBUS would change fault delivery, not registration; leave it out.
            wanted = api.features & ~Feature.SIGBUS
            for mode in modes:
                with Userfaultfd.create() as uffd:
                    uffd.api(wanted)
                    try:
                        uffd.register(addr, size, mode)
                    except KernelError as e:
                        out.append(RegisterProbe(backing, mode, False, _errname(e)))
                    else:
                        out.append(RegisterProbe(backing, mode, True))
    finally:
        area.close()
        os.close(fd)
    return out


def probe_kernel(
    *, proc: Path = Path("/proc"), sys: Path = Path("/sys"), dev: Path = Path("/dev")
) -> KernelFeatures:
    """Observe the running kernel.  Never raises for a missing feature: it reports it."""
    thp = sys / "kernel/mm/transparent_hugepage"
    common: dict[str, Any] = {
        "release": os.uname().release,
        "dev_userfaultfd": (dev / "userfaultfd").exists(),
        "unprivileged_userfaultfd": _read_int(proc / "sys/vm/unprivileged_userfaultfd"),
        "thp_enabled": _bracketed(thp / "enabled"),
        "thp_shmem_enabled": _bracketed(thp / "shmem_enabled"),
        "hugepages_2m_free": _read_int(sys / "kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        or 0,
    }
    scan_ok, accessed, scan_err = _probe_pagemap()
    common.update(pagemap_scan=scan_ok, pagemap_accessed=accessed, pagemap_error=scan_err)
    try:
        api = probe_api()
    except KernelError as e:
        return KernelFeatures(uffd_error=f"{e.op}: {_errname(e)}", **common)
    probes = _probe_register(api, "shmem", SHMEM_PROBES, hugetlb=False)
    if common["hugepages_2m_free"] > 0:
        probes += _probe_register(api, "hugetlbfs", HUGETLB_PROBES, hugetlb=True)
    else:
        probes += [
            RegisterProbe("hugetlbfs", m, False, "no free 2 MiB huge pages", tried=False)
            for m in HUGETLB_PROBES
        ]
    return KernelFeatures(
        features=api.features, ioctls=api.ioctls, register=tuple(probes), **common
    )
