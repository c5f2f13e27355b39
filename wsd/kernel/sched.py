"""Scheduling of wsd's own threads.

Fault service runs on the event loop thread; compression, checksums and file
writes for eviction run on worker threads.  The workers release the GIL while
they work, so the two compete for a CPU only in the kernel's scheduler, and
CFS hands a CPU back and forth in slices of milliseconds: a fault that arrives
while a worker holds the loop thread's CPU waited up to a slice (measured: a
p99 of 4 to 7 ms against 0.1 ms at p50, wsd pinned to one CPU).  A worker
with a higher nice value is preempted as soon as the loop thread wakes.
"""

from __future__ import annotations

import errno
import os
import threading

from .errors import oserror

__all__ = ["set_thread_nice"]


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
