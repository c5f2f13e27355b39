"""pidfd_open(2), pidfd_getfd(2), and telling one process from a later one with its pid."""

from __future__ import annotations

import errno

from ._ffi import ffi, libc
from .errors import FeatureUnavailable, oserror
from .sysno import NR

__all__ = ["pidfd_getfd", "pidfd_open", "process_start_ticks"]


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


def process_start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    Together with the pid it names one process for the life of the system: a
    recycled pid has a later start.  ``ProcessLookupError`` if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise oserror("open(/proc/<pid>/stat)", errno.ESRCH, pid=pid) from None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])
