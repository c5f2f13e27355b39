"""The LIFO worker pool under Offload: which thread runs what, errors, shutdown."""

from __future__ import annotations

import os
import threading
import time

import pytest

from wsd.kernel import set_thread_nice
from wsd.priority import BACKGROUND_STEP
from wsd.storage.concurrency import LifoPool, Offload
from wsd.storage.errors import StoreClosed


def test_work_one_job_at_a_time_stays_on_one_thread() -> None:
    pool = LifoPool(threads=4, name="wsd-test")
    # Start every worker, then hand out jobs one at a time.
    for future in [pool.submit(time.sleep, 0.02) for _ in range(4)]:
        future.result()
    threads = {pool.submit(threading.get_ident).result() for _ in range(50)}
    assert len(threads) == 1
    pool.shutdown()


def test_overlapping_work_spreads_over_the_threads_and_queues_the_rest() -> None:
    pool = LifoPool(threads=3, name="wsd-test")
    gate = threading.Event()

    def job(n: int) -> tuple[int, int]:
        gate.wait()
        return n, threading.get_ident()

    futures = [pool.submit(job, n) for n in range(10)]
    gate.set()
    results = [future.result(timeout=10) for future in futures]
    assert [n for n, _ in results] == list(range(10))
    assert len({ident for _, ident in results}) == 3
    pool.shutdown()


def test_errors_reach_the_caller_and_the_worker_survives() -> None:
    pool = LifoPool(threads=1, name="wsd-test")

    def boom() -> None:
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        pool.submit(boom).result()
    assert pool.submit(int, "7").result() == 7
    pool.shutdown()


def test_a_cancelled_job_never_runs() -> None:
    pool = LifoPool(threads=1, name="wsd-test")
    gate = threading.Event()
    ran: list[int] = []
    first = pool.submit(gate.wait)
    queued = pool.submit(ran.append, 1)
    assert queued.cancel()
    gate.set()
    first.result(timeout=10)
    assert pool.submit(ran.append, 2).result(timeout=10) is None
    assert ran == [2]
    pool.shutdown()


def test_shutdown_finishes_submitted_work_then_stops_every_thread() -> None:
    pool = LifoPool(threads=2, name="wsd-test-stop")
    futures = [pool.submit(time.sleep, 0.01) for _ in range(5)]
    pool.shutdown()
    for future in futures:
        future.result(timeout=10)
    with pytest.raises(RuntimeError):
        pool.submit(int)
    deadline = time.monotonic() + 10
    while any(t.name.startswith("wsd-test-stop") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.asyncio
async def test_offload_waits_for_work_in_flight_and_then_refuses_more() -> None:
    offload = Offload(backend="test", threads=2)
    assert await offload.run(sum, [1, 2]) == 3
    await offload.close()
    with pytest.raises(StoreClosed):
        await offload.run(int)


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_background_workers_run_below_the_loop_priority_and_leave_it_alone() -> None:
    """Eviction's workers raise their own nice value only: the caller's stays."""
    before = _own_nice()
    pool = LifoPool(threads=1, name="t", background=True)
    try:
        assert pool.submit(_own_nice).result(timeout=5) == min(19, before + BACKGROUND_STEP)
    finally:
        pool.shutdown()
    assert _own_nice() == before
    plain = LifoPool(threads=1, name="t")
    try:
        assert plain.submit(_own_nice).result(timeout=5) == before
    finally:
        plain.shutdown()


def test_set_thread_nice_names_a_bad_value() -> None:
    with pytest.raises(ValueError, match=r"nice value 20 is outside -20\.\.19"):
        set_thread_nice(20)
