"""pidfd_open(2) and pidfd_getfd(2)."""

from __future__ import annotations

import errno

from ._ffi import ffi, libc
from .errors import FeatureUnavailable, oserror
from .sysno import NR

__all__ = ["pidfd_getfd", "pidfd_open"]


def pidfd_open(pid: int, flags: int = 0) -> int:
    fd = int(
        libc.syscall(
            ffi.cast("long", NR.pidfd_open), ffi.cast("int", pid), ffi.cast("unsigned int", flags)
        )
    )
    if fd < 0:
        err = ffi.errno
        if err == errno.ENOSYS:
            raise FeatureUnavailable("pidfd_open(2)", "Linux 5.3", err=err)
        raise oserror("pidfd_open", err, pid=pid)
    return fd


def pidfd_getfd(pidfd: int, target_fd: int, *, pid: int | None = None) -> int:
    """Duplicate ``target_fd`` of the process behind ``pidfd`` into ours (needs ptrace access)."""
    fd = int(
        libc.syscall(
            ffi.cast("long", NR.pidfd_getfd),
            ffi.cast("int", pidfd),
            ffi.cast("int", target_fd),
            ffi.cast("unsigned int", 0),
        )
    )
    if fd < 0:
        err = ffi.errno
        if err == errno.ENOSYS:
            raise FeatureUnavailable("pidfd_getfd(2)", "Linux 5.6", err=err)
        raise oserror("pidfd_getfd", err, pid=pid, detail=f"target fd {target_fd}")
    return fd
