"""Find a running VMM's guest RAM in ``/proc``: its memfd mappings and the fds behind them.

QEMU started with ``-object memory-backend-memfd,id=mem,size=…,share=on``
maps each backend's memfd once, ``MAP_SHARED`` and read-write; ``maps`` names
it ``/memfd:memory-backend-memfd (deleted)`` (QEMU names the memfd after the
backend type, not its id) and QEMU keeps the memfd open in its fd table.
Everything here reads ``/proc`` only; the root is a parameter so tests use
fixture trees.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from wsd.kernel import FileId
from wsd.kernel.procfs import PROC, Mapping, SmapsInfo, uffd_flags

__all__ = [
    "GuestRam",
    "NotAttachable",
    "RamRegion",
    "find_guest_ram",
    "memfd_fds",
    "memfd_name",
]

MEMFD_PREFIX = "/memfd:"
DELETED = " (deleted)"


class NotAttachable(Exception):
    """This process's guest RAM cannot be adopted; the message says why and what to change."""


def memfd_name(path: str) -> str | None:
    """``NAME`` of a ``/memfd:NAME (deleted)`` maps path; None if it is no memfd."""
    if not path.startswith(MEMFD_PREFIX):
        return None
    return path[len(MEMFD_PREFIX) :].removesuffix(DELETED)


@dataclass(frozen=True)
class RamRegion:
    """One mapping of guest RAM in the VMM."""

    mapping: Mapping
    page_size: int
    name: str

    @property
    def file(self) -> FileId:
        return self.mapping.file


@dataclass(frozen=True)
class GuestRam:
    pid: int
    regions: list[RamRegion]

    @property
    def files(self) -> list[FileId]:
        """The memfds, each once, in the order their first region appears."""
        return list(dict.fromkeys(r.file for r in self.regions))

    @property
    def size(self) -> int:
        return sum(r.mapping.size for r in self.regions)


def find_guest_ram(
    pid: int,
    mappings: list[Mapping],
    smaps: dict[int, SmapsInfo],
    *,
    name: str | None = None,
) -> GuestRam:
    """The shared, writable memfd mappings (named ``name``, if given) of ``pid``.

    Raises NotAttachable when there are none (saying what was found instead),
    or when one is already registered with a userfaultfd (QEMU's postcopy
    migration, or another wsd attach).
    """
    memfds = [m for m in mappings if memfd_name(m.path) is not None]
    wanted = [m for m in memfds if name is None or memfd_name(m.path) == name]
    ram = [m for m in wanted if m.shared and m.perms[:2] == "rw"]
    if not ram:
        raise NotAttachable(_why_no_ram(pid, memfds, wanted, name))
    regions = []
    for m in ram:
        info = smaps.get(m.start)
        if info is None:
            raise NotAttachable(f"pid {pid}: no smaps entry for the mapping at {m.start:#x}")
        registered = sorted(uffd_flags(smaps, m.start, m.end))
        if registered:
            raise NotAttachable(
                f"pid {pid}: its guest RAM at [{m.start:#x}, {m.end:#x}) is already registered "
                f"with a userfaultfd (VmFlags {' '.join(registered)}): a postcopy migration in "
                "progress, or another wsd session; wsd cannot share it"
            )
        regions.append(RamRegion(m, info.page_size, memfd_name(m.path) or ""))
    by_file: dict[FileId, list[RamRegion]] = {}
    for r in regions:
        by_file.setdefault(r.file, []).append(r)
    for fid, rs in by_file.items():
        spans = sorted((r.mapping.offset, r.mapping.offset + r.mapping.size) for r in rs)
        for (_, end_a), (start_b, _) in itertools.pairwise(spans):
            if start_b < end_a:
                raise NotAttachable(
                    f"pid {pid} maps the same part of memfd {rs[0].name!r} ({fid}) twice "
                    f"(offset {start_b:#x}): wsd needs each page of guest RAM mapped once"
                )
    return GuestRam(pid, regions)


def _why_no_ram(pid: int, memfds: list[Mapping], wanted: list[Mapping], name: str | None) -> str:
    fix = (
        "start QEMU with memfd-backed RAM: -object memory-backend-memfd,id=mem,size=SIZE,"
        "share=on -machine memory-backend=mem"
    )
    if not memfds:
        return f"pid {pid} maps no memfd: its guest RAM is not memfd-backed; {fix}"
    names = sorted({memfd_name(m.path) or "" for m in memfds})
    if not wanted:
        return f"pid {pid} maps no memfd named {name!r} (it maps memfds named {names})"
    if any(not m.shared for m in wanted):
        return (
            f"pid {pid} maps its memfd {names} private (copy-on-write): wsd reads and punches "
            "guest RAM through the memfd, so it must be mapped shared (share=on)"
        )
    return f"pid {pid} maps its memfds {names} read-only; guest RAM is mapped read-write"


def memfd_fds(pid: int, files: list[FileId], *, proc: Path = PROC) -> dict[FileId, int]:
    """Which fd of ``pid`` holds each memfd in ``files`` (the lowest one); some may have none."""
    out: dict[FileId, int] = {}
    fd_dir = proc / str(pid) / "fd"
    try:
        names = sorted(os.listdir(fd_dir), key=int)
    except FileNotFoundError as e:
        raise ProcessLookupError(e.errno, f"no process {pid} ({fd_dir} is missing)") from e
    wanted = set(files)
    for entry in names:
        try:
            st = os.stat(fd_dir / entry)
        except OSError:
            continue  # closed meanwhile
        fid = FileId(st.st_dev, st.st_ino)
        if fid in wanted and fid not in out:
            out[fid] = int(entry)
    return out
