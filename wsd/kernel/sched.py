"""Per-thread scheduling priority; which thread gets which is wsd.priority's policy."""

from __future__ import annotations

import errno
import os
import threading

from .errors import oserror

__all__ = ["set_thread_nice", "thread_nice"]


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
