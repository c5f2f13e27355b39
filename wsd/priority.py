"""Which of wsd's threads run at which priority, and why.

Fault service runs on the event loop thread.  Eviction's bulk work
(reading pages out of the memfd, digests, compression, sealing, file
writes) runs on worker threads that release the GIL, so the two compete
only in the kernel's scheduler.  At equal nice values a fault that arrives
while a worker holds the loop thread's CPU waits for the worker's slice:
a fault p99 of 5 to 9 ms against 0.35 ms (docs/benchmarks.md).  So
background workers run :data:`BACKGROUND_STEP` nice values below the
thread that starts them, which is the loop thread.

Only the ratio of the two weights decides that preemption, but the
absolute values decide what eviction gets beside the guests: a worker at
nice 10 next to a vCPU thread at nice 0 gets about a tenth of its share.
With guests spinning on every CPU (under TCG, always) puts of 31 to 38
pages of 2 MiB then passed the 10 s tier-call deadline, and eviction paused
as for a hung tier (CI, 2026-11-26).  So the
daemon first raises the loop thread to :data:`FAULT_SERVICE_NICE`, which
puts the workers at nice 0, level with the guests.  That needs
``CAP_SYS_NICE`` (the systemd unit grants it); without it the loop keeps
its nice value and the workers go below it as before.

Threads inherit the nice value of the thread that creates them (``clone``
copies it), so every pool started from the loop thread, and
``asyncio.to_thread``'s, run at the loop's priority unless they step down.
"""

from __future__ import annotations

import structlog

from wsd.kernel import KernelError, set_thread_nice, thread_nice

__all__ = ["BACKGROUND_STEP", "FAULT_SERVICE_NICE", "enter_background", "raise_fault_service"]

log = structlog.get_logger("wsd")

FAULT_SERVICE_NICE = -10
"""The loop thread's nice value when wsd may raise it."""
BACKGROUND_STEP = 10
"""How many nice values background workers sit below the thread that started them:
far enough that a waking loop thread preempts them at once (weights 9.3 to 1),
not so far that they starve (19 would leave 1.5% of a busy thread's share)."""


def raise_fault_service() -> int:
    """Raise the calling (loop) thread to :data:`FAULT_SERVICE_NICE` if allowed.

    Returns the nice value it runs at.  Never lowers its priority: a loop
    already at a lower nice value (``Nice=`` in a unit) keeps it.
    """
    now = thread_nice()
    if now <= FAULT_SERVICE_NICE:
        return now
    try:
        set_thread_nice(FAULT_SERVICE_NICE)
    except KernelError as e:
        log.warning(
            "fault service keeps its priority; eviction workers go below it "
            "and may starve beside busy guests (grant CAP_SYS_NICE)",
            nice=now,
            error=str(e),
        )
        return now
    return FAULT_SERVICE_NICE


def enter_background() -> int:
    """Step the calling worker thread :data:`BACKGROUND_STEP` below the nice value
    it inherited; returns the new one.  Raising a nice value needs no privilege."""
    nice = min(19, thread_nice() + BACKGROUND_STEP)
    set_thread_nice(nice)
    return nice
