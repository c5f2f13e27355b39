"""Which of wsd's threads run at which priority, and why.

Fault service runs on the event loop thread.  Eviction's bulk work
(reading pages out of the memfd, digests, compression, sealing, file
writes) runs on worker threads that release the GIL, so the two compete
only in the kernel's scheduler, and a fault must not wait there.

**The loop thread runs ``SCHED_FIFO``** (:data:`FAULT_SERVICE_RT_PRIORITY`)
where allowed.  A real-time thread that wakes takes its CPU from any
``SCHED_OTHER`` thread at once (at the next preemption point, on a kernel
without full preemption).  Nice values alone did not give that: with the
loop at nice -10 and a worker at 0 on its CPU, 1% of faults waited 1 to 2.6
ms in the run queue (``perf sched timehist``, 2026-11-29,
docs/benchmarks.md).  EEVDF lets a woken thread preempt only if it is
eligible, and a loop that serves faults and commits chunks back to back
has run more than its share, so it waited for the worker's slice or the
next tick.  ``SCHED_RESET_ON_FORK`` goes with it: the threads the loop
starts come up in ``SCHED_OTHER``, at nice 0 where the loop's nice value
was negative, so no worker ever inherits the real-time policy, under which
it could hold the loop's CPU without end.

Without real-time scheduling (no ``CAP_SYS_NICE``, systemd's
``RestrictRealtime=yes``, a cgroup without real-time runtime) the loop
falls back to nice values, and says so: it goes to
:data:`FAULT_SERVICE_NICE`, and background workers run
:data:`BACKGROUND_STEP` below it, so that a waking loop usually preempts
them (weights 9.3 to 1).

**Where the workers sit** decides what eviction gets beside the guests: a
worker at nice 10 next to a vCPU thread at nice 0 gets about a tenth of
its share.  With guests spinning on every CPU (under TCG, always) puts of
31 to 38 pages of 2 MiB then passed the 10 s tier-call deadline, and
eviction paused as for a hung tier (CI, 2026-11-26).  So background
workers run at nice 0, level with the guests, whenever the loop has
either privilege: at 0 from the reset under a real-time loop, 10 below -10
otherwise.  Without any, the loop keeps its nice value and the workers go
10 below it.  The tiers' read threads serve faults' fetches, so they run
at the loop's nice value (:func:`enter_foreground`).  Other threads the
loop starts (``asyncio.to_thread``'s) run at nice 0 under a real-time loop
and inherit the loop's nice value otherwise (``clone`` copies it).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from wsd.kernel import (
    KernelError,
    set_thread_fifo,
    set_thread_nice,
    set_thread_normal,
    thread_nice,
    thread_rt_priority,
)

__all__ = [
    "BACKGROUND_STEP",
    "FAULT_SERVICE_NICE",
    "FAULT_SERVICE_RT_PRIORITY",
    "LoopPriority",
    "enter_background",
    "enter_foreground",
    "raise_fault_service",
    "runs_realtime",
]

log = structlog.get_logger("wsd")

FAULT_SERVICE_RT_PRIORITY = 1
"""The loop thread's ``SCHED_FIFO`` priority: the lowest, above every fair thread
and below the kernel's own real-time threads (migration, watchdogs)."""
FAULT_SERVICE_NICE = -10
"""The loop thread's nice value when wsd may raise it."""
BACKGROUND_STEP = 10
"""How many nice values background workers sit below a loop without real-time
scheduling: far enough that a waking loop usually preempts them (weights 9.3 to 1),
not so far that they starve (19 would leave 1.5% of a busy thread's share)."""


@dataclass(frozen=True)
class LoopPriority:
    """What :func:`raise_fault_service` gave the loop thread, and what it had."""

    nice: int
    realtime: int
    """Its ``SCHED_FIFO`` priority; 0: none, it runs at ``nice``."""
    was_nice: int
    was_realtime: int

    def __str__(self) -> str:
        return f"SCHED_FIFO {self.realtime}" if self.realtime else f"nice {self.nice}"

    def restore(self) -> None:
        """Give the calling (loop) thread back what it had, for a process that
        goes on after the daemon (tests run daemons in turn)."""
        try:
            if self.realtime and not self.was_realtime:
                set_thread_normal()
            if self.nice != self.was_nice:
                set_thread_nice(self.was_nice)
        except KernelError as e:
            log.warning("the loop thread keeps the fault service's priority", error=str(e))


def raise_fault_service() -> LoopPriority:
    """Raise the calling (loop) thread for fault service: nice
    :data:`FAULT_SERVICE_NICE`, then ``SCHED_FIFO`` if allowed.

    Call it before any pool starts a thread.  Never lowers a priority the
    thread already has (``Nice=`` or ``CPUSchedulingPriority=`` in a unit).
    """
    was_nice, was_realtime = thread_nice(), thread_rt_priority()
    nice, nice_error = was_nice, None
    if nice > FAULT_SERVICE_NICE:
        try:
            set_thread_nice(FAULT_SERVICE_NICE)
            nice = FAULT_SERVICE_NICE
        except KernelError as e:
            nice_error = e
    realtime = max(was_realtime, FAULT_SERVICE_RT_PRIORITY)
    try:
        # Again if it already runs real-time: its threads must not inherit that.
        set_thread_fifo(realtime)
    except KernelError as e:
        realtime = 0
        if was_realtime:
            # Started real-time (CPUSchedulingPolicy=) where it may not set the
            # policy itself (RestrictRealtime=yes): without the reset every
            # thread it starts, asyncio's included, would be real-time too and
            # could hold its CPU without end.  Leaving needs no privilege.
            set_thread_normal()
            log.warning(
                "fault service left the real-time policy it was started with: it may "
                "not set SCHED_RESET_ON_FORK, and its threads would inherit real-time",
                was_realtime=was_realtime,
                error=str(e),
            )
        log.warning(
            "fault service is not real-time: a busy worker on its CPU can delay a fault "
            "by a scheduler slice, milliseconds (grant CAP_SYS_NICE; under systemd, "
            "RestrictRealtime=no)",
            error=str(e),
        )
        if nice_error is not None:
            log.warning(
                "fault service keeps its nice value; eviction workers go below it and "
                "may starve beside busy guests (grant CAP_SYS_NICE)",
                nice=nice,
                error=str(nice_error),
            )
    return LoopPriority(nice, realtime, was_nice, was_realtime)


def runs_realtime() -> bool:
    """Whether the calling thread runs real-time.  Threads it starts then come
    up reset (``SCHED_RESET_ON_FORK``): call it where they are started."""
    return thread_rt_priority() > 0


def enter_background(*, started_by_realtime: bool) -> int:
    """Put the calling worker thread where eviction's work belongs; returns its
    nice value.  Started by a real-time thread, it stays where the reset put
    it; otherwise it steps :data:`BACKGROUND_STEP` below the nice value it
    inherited.  Raising a nice value needs no privilege."""
    if started_by_realtime:
        return thread_nice()
    nice = min(19, thread_nice() + BACKGROUND_STEP)
    set_thread_nice(nice)
    return nice


def enter_foreground(*, started_by_realtime: bool) -> int:
    """For a thread that serves faults' fetches: the loop's nice value, which
    the reset took from it if a real-time thread started it (the loop, which
    then holds the privilege to give it back); otherwise it inherited that
    value.  Returns its nice value."""
    if started_by_realtime and thread_nice() > FAULT_SERVICE_NICE:
        set_thread_nice(FAULT_SERVICE_NICE)
    return thread_nice()
