"""What a ``wsd guest`` run does: one frozen config, parsed from the command line."""

from __future__ import annotations

import enum
import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HUGETLB_PAGE_SIZE",
    "GuestConfig",
    "HotSpec",
    "Pattern",
    "Thp",
    "parse_hot",
    "parse_size",
]

HUGETLB_PAGE_SIZE = 2 << 20
DEFAULT_SOCKET = Path("/run/wsd/wsd.sock")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:I?B)?", re.IGNORECASE)


class Pattern(enum.StrEnum):
    UNIFORM = "uniform"
    ZIPF = "zipf"
    PHASES = "phases"


class Thp(enum.StrEnum):
    """What the guest asks of transparent huge pages on its mapping (``madvise``)."""

    DEFAULT = "default"  # no madvise: whatever shmem_enabled says
    NEVER = "never"  # MADV_NOHUGEPAGE (RWP-FACTS fact 8: no PMD-mapped shmem THP)
    ALWAYS = "always"  # MADV_HUGEPAGE, as QEMU does for guest RAM


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64K``, ``256M``, ``1G``, ``1.5GiB``…"""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 256M or 1G)")
    value = float(m["num"]) * _UNITS[m["unit"].upper()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


@dataclass(frozen=True)
class HotSpec:
    """The hot-set size: a fraction of the guest, or a number of bytes."""

    fraction: float | None = None
    nbytes: int | None = None

    def pages(self, npages: int, page_size: int) -> int:
        if self.nbytes is not None:
            n = -(-self.nbytes // page_size)
        else:
            assert self.fraction is not None
            n = max(1, round(self.fraction * npages))
        if not 1 <= n <= npages:
            raise ValueError(f"--hot {self} is {n} pages, more than the guest's {npages}")
        return n

    def __str__(self) -> str:
        return f"{self.nbytes} bytes" if self.nbytes is not None else f"{self.fraction:g}"


def parse_hot(text: str) -> HotSpec:
    """``0.1`` or ``10%`` (fraction), or a size with a unit such as ``25M`` or ``4096B``.

    A bare number is a fraction when it is at most 1, else a byte count.
    """
    t = text.strip()
    if t.endswith("%"):
        return _fraction(float(t[:-1]) / 100, text)
    if re.fullmatch(r"\d+(\.\d+)?", t) and float(t) <= 1:
        return _fraction(float(t), text)
    return HotSpec(nbytes=parse_size(t))


def _fraction(f: float, text: str) -> HotSpec:
    if not (0 < f <= 1 and math.isfinite(f)):
        raise ValueError(f"hot fraction {text!r} is not in (0, 1]")
    return HotSpec(fraction=f)


@dataclass(frozen=True)
class GuestConfig:
    vm_id: str
    size: int
    hugetlb: bool = False
    threads: int = 1
    hot: HotSpec = HotSpec(fraction=0.1)
    pattern: Pattern = Pattern.UNIFORM
    zipf_s: float = 0.99
    phase_seconds: float | None = 5.0
    phase_passes: int | None = None
    write_ratio: float = 0.3
    duration: float = 0.0
    socket: Path = DEFAULT_SOCKET
    handoff: bool = True
    user_mode_only: bool = False
    dma_pinned: bool = False
    """Mark the region DMA-pinned in the hand-off (a VFIO VMM): wsd never evicts it."""
    reattach: bool = False
    """When wsd closes the hand-off connection, reattach to the next wsd on the socket."""
    thp: Thp = Thp.DEFAULT
    seed: int | None = None
    report: Path | None = None
    truth: Path | None = None
    progress: Path | None = None
    """JSON lines, one per second: time, operations and writes so far."""
    ready_fd: int | None = None

    @property
    def page_size(self) -> int:
        return HUGETLB_PAGE_SIZE if self.hugetlb else mmap.PAGESIZE

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def check(self) -> None:
        """Raise ValueError naming the option that makes no sense."""
        if self.size <= 0 or self.size % self.page_size:
            raise ValueError(f"--size {self.size} is not a positive multiple of {self.page_size}")
        if self.threads < 1:
            raise ValueError("--threads must be at least 1")
        if not 0 <= self.write_ratio <= 1:
            raise ValueError(f"--write-ratio {self.write_ratio} is not in [0, 1]")
        if self.zipf_s <= 0:
            raise ValueError(f"--zipf-s {self.zipf_s} must be positive")
        if self.duration < 0:
            raise ValueError("--duration must be >= 0")
        if self.phase_passes is not None and self.phase_passes < 1:
            raise ValueError("--phase-passes must be at least 1")
        if self.phase_seconds is not None and self.phase_seconds <= 0:
            raise ValueError("--phase-seconds must be positive")
        self.hot.pages(self.npages, self.page_size)
