"""Which thread runs at which priority (wsd.priority), on this machine's scheduler."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import cast

import pytest
from structlog.testing import capture_logs

from wsd import priority as priority_module
from wsd.kernel import KernelError, set_thread_fifo
from wsd.priority import FAULT_SERVICE_NICE, FAULT_SERVICE_RT_PRIORITY, raise_fault_service
from wsd.storage.concurrency import LifoPool

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="real-time scheduling needs root")
# Root without CAP_SYS_NICE, whose RLIMIT_RTPRIO is 0: real-time scheduling refused.
WITHOUT_SYS_NICE = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_nice"]


def _policy_and_nice() -> tuple[int, int]:
    tid = threading.get_native_id()
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, tid)


def _in_own_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread of its own: pytest's keeps its priority whatever happens."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@root_only
def test_the_loop_runs_fifo_and_its_threads_come_up_fair_at_their_places() -> None:
    """SCHED_FIFO with SCHED_RESET_ON_FORK: eviction's workers at nice 0, level
    with the guests; fetch threads at the loop's nice value; any other thread the
    loop starts in SCHED_OTHER; and the loop gets back what it had."""
    seen: dict[str, tuple[int, int]] = {}

    def loop() -> None:
        before = _policy_and_nice()
        priority = raise_fault_service()
        assert (priority.realtime, priority.nice) == (FAULT_SERVICE_RT_PRIORITY, FAULT_SERVICE_NICE)
        assert str(priority) == f"SCHED_FIFO {FAULT_SERVICE_RT_PRIORITY}"
        assert os.sched_getscheduler(0) == os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        for name, background in (("background", True), ("foreground", False)):
            pool = LifoPool(threads=1, name="t", background=background)
            try:
                seen[name] = pool.submit(_policy_and_nice).result(timeout=5)
            finally:
                pool.shutdown()
        plain = threading.Thread(target=lambda: seen.setdefault("plain", _policy_and_nice()))
        plain.start()
        plain.join()
        priority.restore()
        seen["restored"] = _policy_and_nice()
        seen["before"] = before

    _in_own_thread(loop)
    assert seen["background"] == (os.SCHED_OTHER, 0)
    assert seen["foreground"] == (os.SCHED_OTHER, FAULT_SERVICE_NICE)
    assert seen["plain"] == (os.SCHED_OTHER, 0)
    assert seen["restored"] == seen["before"]


def test_without_the_privilege_the_loop_falls_back_to_nice_values_and_says_so() -> None:
    """No CAP_SYS_NICE (and RLIMIT_RTPRIO 0): no SCHED_FIFO, no nice -10; the
    warnings name the missing capability, and workers step 10 below the loop."""
    script = """
import json, os, threading
from structlog.testing import capture_logs
from wsd.priority import raise_fault_service
from wsd.storage.concurrency import LifoPool
with capture_logs() as logs:
    priority = raise_fault_service()
pool = LifoPool(threads=1, name="t", background=True)
worker = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
print(json.dumps({"priority": str(priority), "realtime": priority.realtime,
                  "worker": worker.result(timeout=5), "sched": os.sched_getscheduler(0),
                  "events": [e["event"] for e in logs], "errors": [e.get("error") for e in logs]}))
pool.shutdown()
"""
    wrap = WITHOUT_SYS_NICE if os.geteuid() == 0 else []
    out = subprocess.run(
        [*wrap, sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["realtime"] == 0
    assert got["sched"] == os.SCHED_OTHER
    assert got["priority"] == f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"
    assert got["worker"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    assert any("fault service is not real-time" in e and "CAP_SYS_NICE" in e for e in got["events"])
    assert any("sched_setscheduler" in (e or "") and "EPERM" in (e or "") for e in got["errors"])


@root_only
def test_started_real_time_where_the_reset_is_refused_the_loop_leaves_real_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started SCHED_FIFO (a unit's CPUSchedulingPolicy=) where setting the
    policy is refused (RestrictRealtime=yes, faked here: that is seccomp's):
    without SCHED_RESET_ON_FORK its threads would inherit real-time, so the
    loop leaves it, says so, and reports the nice value it runs at."""

    def refused(priority: int) -> None:
        raise KernelError(errno.EPERM, "sched_setscheduler", detail=f"SCHED_FIFO {priority}")

    monkeypatch.setattr(priority_module, "set_thread_fifo", refused)
    seen: dict[str, object] = {}

    def loop() -> None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(3))
        with capture_logs() as logs:
            priority = raise_fault_service()
        seen["priority"] = (str(priority), priority.realtime, priority.was_realtime)
        seen["loop"] = os.sched_getscheduler(0)
        plain = threading.Thread(target=lambda: seen.setdefault("plain", _policy_and_nice()))
        plain.start()
        plain.join()
        seen["events"] = [e["event"] for e in logs]
        priority.restore()

    _in_own_thread(loop)
    assert seen["priority"] == (f"nice {FAULT_SERVICE_NICE}", 0, 3)
    assert seen["loop"] == os.SCHED_OTHER
    assert seen["plain"] == (os.SCHED_OTHER, FAULT_SERVICE_NICE)
    events = cast(list[str], seen["events"])
    assert any("left the real-time policy it was started with" in e for e in events)
    assert any("fault service is not real-time" in e for e in events)


def test_set_thread_fifo_names_a_bad_priority() -> None:
    with pytest.raises(ValueError, match=r"SCHED_FIFO priority 0 is outside 1\.\.99"):
        set_thread_fifo(0)


@root_only
def test_a_refused_fifo_names_the_call_and_the_errno() -> None:
    """Root without CAP_SYS_NICE (and RLIMIT_RTPRIO 0) gets EPERM, named with
    the operation, the thread and the policy asked for."""
    script = (
        "from wsd.kernel import set_thread_fifo\n"
        "try:\n    set_thread_fifo(1)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [*WITHOUT_SYS_NICE, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("KernelPermissionError [Errno 1] sched_setscheduler failed: EPERM")
    assert "SCHED_FIFO 1)" in out.stdout, out.stdout
