"""What ``/proc`` says about other processes' memory: pinned pages, io_uring buffers,
mappings of a file, and which mappings a userfaultfd has registered.

Read-only and policy-free.  Every function takes the proc root, so tests point
it at a fixture tree.  Processes come and go while ``/proc`` is walked: one
that vanishes (or that we may not inspect) mid-walk is skipped, never an error.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import oserror

__all__ = [
    "FileId",
    "Mapping",
    "SmapsInfo",
    "UringBuffers",
    "effective_uid",
    "file_id",
    "io_uring_buffers",
    "mappers_of",
    "parse_maps",
    "parse_smaps",
    "pinned_bytes",
    "read_maps",
    "read_smaps",
    "uffd_flags",
]

PROC = Path("/proc")


@dataclass(frozen=True, order=True, slots=True)
class FileId:
    """A file as ``/proc/<pid>/maps`` names it: device and inode."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"{os.major(self.dev):02x}:{os.minor(self.dev):02x} inode {self.ino}"


def file_id(fd: int) -> FileId:
    """The device and inode of an open file (a memfd: its shmem or hugetlbfs inode)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise oserror("fstat", e.errno or 0, fd=fd) from e
    return FileId(st.st_dev, st.st_ino)


def pinned_bytes(pid: int, *, proc: Path = PROC) -> int:
    """``VmPin`` of ``pid``: its memory pinned long-term (``mm->pinned_vm``), in bytes.

    Who accounts there: RDMA memory registrations, io_uring registered
    buffers, iommufd (in its mm accounting mode).  VFIO type1 accounts its
    DMA pins in ``VmLck`` (``locked_vm``) instead, which mlock also raises, so
    a VFIO VMM is best told apart by the hand-off's ``dma_pinned`` flag.
    Raises ``ProcessLookupError`` if ``pid`` is gone.
    """
    path, text = _status(pid, proc)
    for line in text.splitlines():
        if line.startswith("VmPin:"):
            value, _, unit = line[len("VmPin:") :].strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"{path}: VmPin in unknown unit {unit!r}")
            return int(value) * 1024
    return 0  # a kernel thread, or a zombie: no mm


@dataclass(frozen=True, slots=True)
class UringBuffers:
    """The buffers a process's io_uring instances registered (``IORING_REGISTER_BUFFERS``).

    The kernel pins such a buffer's pages once, at registration, and later
    reads and writes them without faulting: a punched page of one is written
    where the guest never looks again.
    """

    spans: tuple[tuple[int, int], ...] = ()
    """``(start, end)`` of every registered buffer whose address is known."""
    unlisted: str | None = None
    """Why some registered buffers' addresses are unknown; None if none is."""

    def covered(self, start: int, size: int) -> int:
        """How many bytes of ``[start, start + size)`` lie in a known buffer."""
        end = start + size
        covered, reached = 0, start
        for span_start, span_end in sorted(self.spans):
            lo, hi = max(span_start, reached), min(span_end, end)
            if lo < hi:
                covered += hi - lo
                reached = hi
        return covered


_URING_INODE = "anon_inode:[io_uring]"


def io_uring_buffers(pid: int, *, proc: Path = PROC) -> UringBuffers:
    """The registered buffers of every io_uring instance ``pid`` has an fd of.

    They are found in each ring's ``fdinfo``: a ``UserBufs:`` count, then one
    ``<index>: 0x<address>/<length>`` line per buffer (``<none>`` for an empty
    slot).  The kernel lists them only if it takes the ring's lock without
    waiting, so a busy ring can show the count alone; ``unlisted`` then says
    so.  A ring that was registered with ``IORING_REGISTER_RING_FDS`` and whose
    fd was closed has no fd to find.  Reading another process's fds needs
    ptrace read access (``CAP_SYS_PTRACE`` for another user's); without it
    ``unlisted`` names the error.  Raises ``ProcessLookupError`` if ``pid`` is gone.
    """
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError as e:
        raise ProcessLookupError(e.errno, f"no process {pid} ({fd_dir} is missing)") from e
    except OSError as e:
        return UringBuffers((), f"{fd_dir}: {e.strerror}")
    spans: list[tuple[int, int]] = []
    unlisted: list[str] = []
    for name in names:
        info = proc / str(pid) / "fdinfo" / name
        try:
            if os.readlink(fd_dir / name) != _URING_INODE:
                continue
            text = info.read_text()
        except FileNotFoundError:
            continue  # closed meanwhile
        except OSError as e:
            unlisted.append(f"{info}: {e.strerror}")
            continue
        try:
            listed, problem = _ring_buffers(text)
        except ValueError as e:
            listed, problem = [], f"unreadable: {e}"
        spans += listed
        if problem is not None:
            unlisted.append(f"{info}: {problem}")
    return UringBuffers(tuple(spans), "; ".join(unlisted) or None)


def _ring_buffers(fdinfo: str) -> tuple[list[tuple[int, int]], str | None]:
    """``(start, end)`` of each buffer an io_uring ``fdinfo`` lists, and why some
    of its registered buffers are unknown (None: none is).  ``ValueError`` for a
    line it cannot read."""
    lines = iter(fdinfo.splitlines())
    for line in lines:
        if line.startswith("UserBufs:"):
            count = int(line.partition(":")[2])
            break
    else:
        return [], "no UserBufs line"
    spans: list[tuple[int, int]] = []
    slots = 0
    for line in lines:
        index, colon, value = line.strip().partition(": ")
        if not (colon and index.isdigit()):
            break
        slots += 1
        if value != "<none>":
            address, _, length = value.partition("/")
            start = int(address, 16)
            spans.append((start, start + int(length)))
    if slots < count:
        return spans, f"{count - slots} of {count} registered buffers not listed (ring busy)"
    return spans, None


def effective_uid(pid: int, *, proc: Path = PROC) -> int:
    """The effective uid ``pid`` runs as (``Uid:`` in its status), the one SO_PEERCRED reports.

    Raises ``ProcessLookupError`` if ``pid`` is gone.
    """
    path, text = _status(pid, proc)
    for line in text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # real, effective, saved, filesystem
    raise ValueError(f"{path} has no Uid line")


def _status(pid: int, proc: Path) -> tuple[Path, str]:
    path = proc / str(pid) / "status"
    try:
        return path, path.read_text()
    except FileNotFoundError as e:
        raise ProcessLookupError(e.errno, f"no process {pid} ({path} is missing)") from e


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/<pid>/maps``."""

    start: int
    end: int
    perms: str  # "rw-s": read, write, execute, s(hared) or p(rivate)
    offset: int  # in the file, where ``start`` maps
    file: FileId
    path: str  # "" for anonymous memory; "[vdso]", "/memfd:NAME (deleted)", ...

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    def covers(self, start: int, size: int) -> bool:
        return self.start <= start and start + size <= self.end


def parse_maps(data: bytes) -> list[Mapping]:
    """Every mapping in the text of a ``/proc/<pid>/maps`` file, in address order."""
    out = []
    for line in data.decode(errors="surrogateescape").splitlines():
        # start-end perms offset dev inode [path]; the path may hold spaces.
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            raise ValueError(f"not a line of /proc/<pid>/maps: {line[:80]!r}")
        start, _, end = parts[0].partition("-")
        out.append(
            Mapping(
                start=int(start, 16),
                end=int(end, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                file=FileId(_parse_dev(parts[3]), int(parts[4])),
                path=parts[5].strip() if len(parts) > 5 else "",
            )
        )
    return out


def read_maps(pid: int, *, proc: Path = PROC) -> list[Mapping]:
    """``/proc/<pid>/maps`` parsed; ``ProcessLookupError`` if ``pid`` is gone.

    Reading another process's maps needs ptrace read access to it (root,
    its own user, or ``CAP_SYS_PTRACE``).
    """
    return parse_maps(_read_proc_file(pid, "maps", proc))


def _read_proc_file(pid: int, name: str, proc: Path) -> bytes:
    path = proc / str(pid) / name
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise ProcessLookupError(e.errno, f"no process {pid} ({path} is missing)") from e
    except OSError as e:
        raise oserror(f"read(/proc/<pid>/{name})", e.errno or 0, pid=pid) from e


# smaps VmFlags of a VMA registered with a userfaultfd: um (MISSING), uw
# (WP), ui (MINOR); RWP registrations on 7.3 show another u* flag.  No other
# flag starts with "u".
UFFD_FLAG_PREFIX = "u"


@dataclass(frozen=True, slots=True)
class SmapsInfo:
    """What ``smaps`` adds to a maps line (page size and VMA flags), with the
    mapping's end, so that one read of ``smaps`` describes whole mappings."""

    page_size: int
    vmflags: frozenset[str]
    end: int

    @property
    def uffd_flags(self) -> set[str]:
        """Its userfaultfd ``VmFlags``: empty when no uffd has it registered."""
        return {flag for flag in self.vmflags if flag.startswith(UFFD_FLAG_PREFIX)}


def parse_smaps(data: bytes) -> dict[int, SmapsInfo]:
    """``KernelPageSize``, ``VmFlags`` and end of every mapping in an ``smaps`` file,
    by start."""
    out: dict[int, SmapsInfo] = {}
    start: int | None = None
    end = 0
    page_size = 4096
    for line in data.decode(errors="surrogateescape").splitlines():
        key, sep, value = line.partition(":")
        if sep and " " not in key:  # "KernelPageSize:    4 kB", "VmFlags: rd wr sh"
            if key == "KernelPageSize":
                number, _, unit = value.strip().partition(" ")
                if unit != "kB":
                    raise ValueError(f"smaps: KernelPageSize in unknown unit {unit!r}")
                page_size = int(number) * 1024
            elif key == "VmFlags" and start is not None:
                out[start] = SmapsInfo(page_size, frozenset(value.split()), end)
            continue
        # A mapping's header line: the same format as a maps line.
        (m,) = parse_maps(line.encode(errors="surrogateescape"))
        start, end, page_size = m.start, m.end, 4096
    return out


def uffd_flags(smaps: dict[int, SmapsInfo], start: int, end: int) -> set[str]:
    """The userfaultfd ``VmFlags`` of the mappings in ``smaps`` (:func:`parse_smaps`)
    that overlap ``[start, end)``: empty when no uffd has any of it registered."""
    return {
        flag
        for at, info in smaps.items()
        if at < end and start < info.end
        for flag in info.uffd_flags
    }


def read_smaps(pid: int, *, proc: Path = PROC) -> dict[int, SmapsInfo]:
    """``/proc/<pid>/smaps`` parsed (:func:`parse_smaps`); ``ProcessLookupError`` if
    ``pid`` is gone.

    Costs the kernel a walk of every resident page's table entry: about 6 ms
    per GiB of resident guest memory here.  Same access rule as :func:`read_maps`.
    """
    return parse_smaps(_read_proc_file(pid, "smaps", proc))


def _parse_dev(field: str) -> int:
    major, _, minor = field.partition(":")
    return os.makedev(int(major, 16), int(minor, 16))


def _pids(proc: Path) -> Iterable[int]:
    try:
        names = os.listdir(proc)
    except OSError as e:
        raise oserror("listdir", e.errno or 0, detail=str(proc)) from e
    for name in names:
        if name.isdigit():
            yield int(name)


def mappers_of(
    files: Collection[FileId], *, exclude: Collection[int] = (), proc: Path = PROC
) -> dict[FileId, set[int]]:
    """Which processes (other than ``exclude``) map each of ``files``.

    Walks ``/proc/*/maps``: slow (one file per process, tens of milliseconds
    on a busy host), so call it from a thread.  Threads share their process's
    maps, so each process is read once.  A process we may not read (another
    user's, without ``CAP_SYS_PTRACE``) is skipped: it is reported nowhere.
    """
    wanted = set(files)
    out: dict[FileId, set[int]] = {f: set() for f in wanted}
    if not wanted:
        return out
    inodes = {f.ino for f in wanted}
    for pid in _pids(proc):
        if pid in exclude:
            continue
        try:
            with open(proc / str(pid) / "maps", "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        for line in data.splitlines():
            # start-end perms offset dev inode [path]
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or int(parts[4]) not in inodes:
                continue
            fid = FileId(_parse_dev(parts[3].decode()), int(parts[4]))
            if fid in out:
                out[fid].add(pid)
    return out
