"""Per-thread scheduling priority, and the most one syscall of a worker copies
(which bounds how long it keeps a woken real-time thread off its CPU); which
thread gets which priority is wsd.priority's policy."""

from __future__ import annotations

import errno
import os
import threading
from typing import Final

from .errors import oserror

__all__ = [
    "COPY_SLICE_BYTES",
    "set_thread_fifo",
    "set_thread_nice",
    "set_thread_normal",
    "thread_nice",
    "thread_rt_priority",
]

COPY_SLICE_BYTES: Final = 256 << 10
"""The most one syscall of eviction's workers copies at a time.

On a kernel without full preemption (``preempt=none`` or ``voluntary``; not
``lazy``, which Debian's 7.3 kernel runs and which defers only the fair
class's preemption), a real-time thread woken on a CPU where another thread
is in a syscall waits until that call returns or reaches a
``cond_resched()``.  ``pipe_read`` has none, and ext4's buffered write
copies a whole large folio between two of them.  Reading a 1 MiB pipe, or a
``pwritev`` of a 4 MiB batch into the file tier, on the fault-service loop's
CPU, kept the loop from the fault that woke it for 170 to 490 µs (``perf``
sched_switch stacks, Linux 6.18 with ``preempt=none``, docs/benchmarks.md).
In 256 KiB slices a 4 MiB batch takes 0.55-0.66 ms to write on ext4, against
0.47-0.55 ms in one call; 128 KiB slices took 0.70-0.85 ms."""


def set_thread_nice(nice: int) -> None:
    """Set the calling thread's nice value (-20 to 19); other threads keep theirs.

    Linux keeps the nice value per thread, and ``setpriority(PRIO_PROCESS,
    tid)`` sets one thread's (setpriority(2), NOTES).  Raising it needs no
    privilege; lowering it below the current value does.
    """
    if not -20 <= nice <= 19:
        raise ValueError(f"nice value {nice} is outside -20..19")
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        raise oserror("setpriority", e.errno or errno.EPERM, pid=tid, detail=f"nice {nice}") from e


def thread_nice() -> int:
    """The calling thread's nice value.

    A thread starts with the nice value of the thread that created it
    (``clone`` copies it), not the process's first thread's.
    """
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def set_thread_fifo(priority: int) -> None:
    """Put the calling thread in ``SCHED_FIFO`` at ``priority`` (1 to 99), with
    ``SCHED_RESET_ON_FORK``: threads it creates start in ``SCHED_OTHER``, at
    nice 0 if its nice value is negative (sched(7), "Resetting scheduling
    policy for child processes").

    Needs ``CAP_SYS_NICE`` or a high enough ``RLIMIT_RTPRIO``; systemd's
    ``RestrictRealtime=yes`` refuses it with ``EPERM`` (seccomp), and so does
    a cgroup without real-time runtime on a kernel built with
    ``CONFIG_RT_GROUP_SCHED``.
    """
    if not 1 <= priority <= 99:
        raise ValueError(f"SCHED_FIFO priority {priority} is outside 1..99")
    try:
        # pid 0: the calling thread, not the whole process.
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as e:
        raise oserror(
            "sched_setscheduler",
            e.errno or errno.EPERM,
            pid=threading.get_native_id(),
            detail=f"SCHED_FIFO {priority}",
        ) from e


def set_thread_normal() -> None:
    """Put the calling thread back in ``SCHED_OTHER``; its nice value is kept.
    Leaving a real-time policy needs no privilege."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        raise oserror(
            "sched_setscheduler",
            e.errno or errno.EPERM,
            pid=threading.get_native_id(),
            detail="SCHED_OTHER",
        ) from e


def thread_rt_priority() -> int:
    """The calling thread's real-time priority (``SCHED_FIFO``, ``SCHED_RR``);
    0 under a fair policy."""
    policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if policy not in (os.SCHED_FIFO, os.SCHED_RR):
        return 0
    return os.sched_getparam(0).sched_priority
