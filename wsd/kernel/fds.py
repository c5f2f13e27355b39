"""What is behind a file descriptor someone handed us.

A hand-off names its fds by position; before trusting one as a uffd or a
memfd, wsd checks what the kernel says it is.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ._ffi import ffi, libc
from .errors import oserror

__all__ = ["FdInfo", "FdKind", "OwnedFd", "close_fds", "describe_fd"]


class FdKind(enum.StrEnum):
    USERFAULTFD = "userfaultfd"
    MEMFD = "memfd"
    MEMFD_HUGETLB = "memfd-hugetlb"
    REGULAR = "regular file"
    PIPE = "pipe"
    OTHER = "other"


@dataclass(frozen=True)
class FdInfo:
    fd: int
    kind: FdKind
    target: str  # what /proc/self/fd/N points to
    size: int
    inode: int
    device: int
    flags: int  # F_GETFL: the open file description's access mode and status flags
    seals: int  # F_GET_SEALS of a memfd (F_SEAL_*), else 0

    @property
    def blocking(self) -> bool:
        return not self.flags & os.O_NONBLOCK

    @property
    def read_write(self) -> bool:
        return self.flags & os.O_ACCMODE == os.O_RDWR

    @property
    def write_sealed(self) -> bool:
        """Sealed against writes: ``fallocate(PUNCH_HOLE)`` fails with EPERM."""
        return bool(self.seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))


HUGETLBFS_MAGIC = 0x958458F6
F_SEAL_FUTURE_WRITE = 0x0010  # <linux/fcntl.h>, Linux 5.1; not in Python's fcntl


def fs_type(fd: int) -> int:
    """``fstatfs(fd).f_type``: the magic number of the filesystem ``fd`` lives on."""
    # f_type is the first member of struct statfs on every 64-bit Linux ABI;
    # the buffer is larger than the whole struct (120 bytes on x86_64).
    buf = ffi.new("int64_t[32]")
    if libc.fstatfs(fd, buf) < 0:
        raise oserror("fstatfs", ffi.errno, fd=fd)
    return int(buf[0]) & 0xFFFFFFFF


def describe_fd(fd: int, *, proc: Path = Path("/proc")) -> FdInfo:
    try:
        st = os.fstat(fd)
        target = os.readlink(proc / "self" / "fd" / str(fd))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise oserror("fstat", e.errno or errno.EBADF, fd=fd) from e
    seals = 0
    if target == "anon_inode:[userfaultfd]":
        kind = FdKind.USERFAULTFD
    elif target.startswith("/memfd:"):
        # memfds on hugetlbfs are named "/memfd:NAME (deleted)" too.  Only the
        # filesystem type tells them apart: st_blksize is 2 MiB for both when
        # shmem THP is enabled.
        kind = FdKind.MEMFD_HUGETLB if fs_type(fd) == HUGETLBFS_MAGIC else FdKind.MEMFD
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise oserror("fcntl(F_GET_SEALS)", e.errno or errno.EINVAL, fd=fd) from e
    elif stat.S_ISREG(st.st_mode):
        kind = FdKind.REGULAR
    elif stat.S_ISFIFO(st.st_mode):
        kind = FdKind.PIPE
    else:
        kind = FdKind.OTHER
    return FdInfo(
        fd=fd,
        kind=kind,
        target=target,
        size=st.st_size,
        inode=st.st_ino,
        device=st.st_dev,
        flags=flags,
        seals=seals,
    )


def close_fds(fds: list[int]) -> None:
    """Close every fd, ignoring ones already closed: for cleanup paths."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class OwnedFd:
    """Base for objects that own one fd: ``close()`` once, ``with`` closes it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def fileno(self) -> int:
        return self.fd
