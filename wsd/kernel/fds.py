"""What is behind a file descriptor someone handed us.

A hand-off names its fds by position; before trusting one as a uffd or a
memfd, wsd checks what the kernel says it is.
"""

from __future__ import annotations

import contextlib
import enum
import errno
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
    OTHER = "other"


@dataclass(frozen=True)
class FdInfo:
    fd: int
    kind: FdKind
    target: str  # what /proc/self/fd/N points to
    size: int
    inode: int
    device: int
    blocking: bool  # O_NONBLOCK clear on its open file description


HUGETLBFS_MAGIC = 0x958458F6


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
        blocking = os.get_blocking(fd)
    except OSError as e:
        raise oserror("fstat", e.errno or errno.EBADF, fd=fd) from e
    if target == "anon_inode:[userfaultfd]":
        kind = FdKind.USERFAULTFD
    elif target.startswith("/memfd:"):
        # memfds on hugetlbfs are named "/memfd:NAME (deleted)" too.  Only the
        # filesystem type tells them apart: st_blksize is 2 MiB for both when
        # shmem THP is enabled.
        kind = FdKind.MEMFD_HUGETLB if fs_type(fd) == HUGETLBFS_MAGIC else FdKind.MEMFD
    elif stat.S_ISREG(st.st_mode):
        kind = FdKind.REGULAR
    else:
        kind = FdKind.OTHER
    return FdInfo(
        fd=fd,
        kind=kind,
        target=target,
        size=st.st_size,
        inode=st.st_ino,
        device=st.st_dev,
        blocking=blocking,
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
