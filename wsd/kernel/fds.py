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


def describe_fd(fd: int, *, proc: Path = Path("/proc")) -> FdInfo:
    try:
        st = os.fstat(fd)
        target = os.readlink(proc / "self" / "fd" / str(fd))
    except OSError as e:
        raise oserror("fstat", e.errno or errno.EBADF, fd=fd) from e
    if target == "anon_inode:[userfaultfd]":
        kind = FdKind.USERFAULTFD
    elif target.startswith("/memfd:"):
        # memfds on hugetlbfs are named "/memfd:NAME (deleted)" too; the
        # block size (huge page size) tells them apart.
        kind = FdKind.MEMFD_HUGETLB if st.st_blksize > 4096 * 16 else FdKind.MEMFD
    elif stat.S_ISREG(st.st_mode):
        kind = FdKind.REGULAR
    else:
        kind = FdKind.OTHER
    return FdInfo(
        fd=fd, kind=kind, target=target, size=st.st_size, inode=st.st_ino, device=st.st_dev
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
