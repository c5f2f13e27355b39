"""Keeping blocking work off the event loop, and ordering operations on the same page."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import structlog

from wsd.kernel import KernelError
from wsd.priority import enter_background, enter_foreground, runs_realtime
from wsd.storage.errors import StoreClosed

T = TypeVar("T")

log = structlog.get_logger("wsd.storage")


_Job = tuple[Callable[..., Any], tuple[object, ...], "concurrent.futures.Future[Any]"]


class _Worker:
    """One thread of a LifoPool, woken by handing it a job."""

    def __init__(self, pool: LifoPool, name: str, job: _Job) -> None:
        self._pool = pool
        self._job: _Job | None = job
        # Asked here, in the thread that starts this one (wsd.priority).
        self._started_by_realtime = runs_realtime()
        self._wake = threading.Event()
        # A daemon: a store that is never closed must not keep the process alive.
        # close() waits for the work in flight, and nothing is durable before sync.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def hand(self, job: _Job | None) -> None:
        """Give an idle worker its next job; None stops it."""
        self._job = job
        self._wake.set()

    def _run(self) -> None:
        try:
            if self._pool.background:
                enter_background(started_by_realtime=self._started_by_realtime)
            else:
                enter_foreground(started_by_realtime=self._started_by_realtime)
        except KernelError as e:
            log.warning("worker thread keeps the priority it started with", error=str(e))
        job = self._job
        while job is not None:
            fn, args, future = job
            del job
            running = future.set_running_or_notify_cancel()
            result: Any = None
            error: BaseException | None = None
            if running:
                try:
                    result = fn(*args)
                except BaseException as err:  # handed to the awaiting side, as an executor does
                    error = err
            del fn, args
            self._wake.clear()
            # Become idle before publishing the result: the caller's next job, often
            # submitted as soon as it sees this one done, then finds this thread idle,
            # caches warm, rather than another one.
            job, parked = self._pool._after(self)
            if running:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            del future, result, error  # they belong to the caller, not to an idle thread
            if parked:
                self._wake.wait()
                job = self._job


class LifoPool:
    """A thread pool that hands work to the worker that became idle last.

    ``ThreadPoolExecutor`` wakes whichever idle thread the queue picks, so a stream of
    batches, one at a time, rotates over every thread the pool ever started (a sync
    starts them all at once). Each thread then allocates the pages it reads from its
    own glibc arena and runs with cold caches: on the development VM a sequence of
    256-page gets took 20 to 30% longer with four threads than with one. The most
    recently idle worker has the warmest caches and arena, so it goes first; the
    others are used only when work overlaps.
    """

    def __init__(self, *, threads: int, name: str, background: bool = False) -> None:
        self._max = threads
        self._name = name
        self.background = background
        """Whether the workers do eviction's work (``enter_background``) rather
        than serve faults' fetches (``enter_foreground``); see wsd.priority."""
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # a stack: the last to become idle is on top
        self._backlog: collections.deque[_Job] = collections.deque()
        self._started = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        job: _Job = (fn, args, future)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            if self._idle:
                self._idle.pop().hand(job)
            elif self._started < self._max:
                self._started += 1
                _Worker(self, f"{self._name}_{self._started - 1}", job)
            else:
                self._backlog.append(job)
        return future

    def _after(self, worker: _Worker) -> tuple[_Job | None, bool]:
        """For a worker done with a job: the backlog's next job, or None and whether it
        was parked as idle (False: the pool is shut down, the worker stops)."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft(), False
            if self._shutdown:
                return None, False
            self._idle.append(worker)
            return None, True

    def shutdown(self) -> None:
        """Stop every worker once the work already submitted is done."""
        with self._lock:
            self._shutdown = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.hand(None)


class Offload:
    """A thread pool owned by one backend; the event loop only awaits its futures.

    It tracks the calls in flight so that ``close`` can wait for them: a backend must
    not close a file descriptor while a worker may still write to it, since the number
    could be reused by another file in the meantime. The thread-side futures are
    tracked, not the awaiting ones, so a cancelled caller cannot make ``close`` believe
    a worker is done while it is still running.
    """

    def __init__(self, *, backend: str, threads: int, background: bool = False) -> None:
        self._backend = backend
        self._pool = LifoPool(threads=threads, name=f"wsd-{backend}", background=background)
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: object, inline: bool = False) -> T:
        """Run ``fn(*args)`` on a worker thread and return its result.

        ``inline=True`` calls it on the event loop thread instead: only for work that
        costs less than a thread round trip, within the bounds each caller documents.
        """
        if self._closed:
            raise StoreClosed("store is closed", backend=self._backend)
        if inline:
            return fn(*args)
        future = self._pool.submit(fn, *args)
        self._inflight.add(future)
        # Runs on the worker thread; set.discard is atomic under the GIL.
        future.add_done_callback(self._inflight.discard)
        return await asyncio.wrap_future(future)

    async def close(self) -> None:
        """Refuse new work, wait for work in flight, stop the threads."""
        self._closed = True
        if self._inflight:
            await asyncio.wait([asyncio.wrap_future(f) for f in list(self._inflight)])
        self._pool.shutdown()


class OffsetGuard:
    """Per-page exclusion on the event loop, without threads or locks per page.

    A writer (put, discard, a demotion move) holds the offsets it changes until it is
    done; other writers of the same offsets wait for it. Readers wait only for holders
    that make the page unreadable midway (``blocks_readers``), so that a get never
    sees a page's index entry and data from two different writes.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[Hashable, int], tuple[asyncio.Future[None], bool]] = {}

    def _busy(
        self, scope: Hashable, offsets: Iterable[int], *, readers: bool
    ) -> list[asyncio.Future[None]]:
        held = self._held
        if not held:
            return []
        busy: list[asyncio.Future[None]] = []
        for offset in offsets:
            entry = held.get((scope, offset))
            if entry is not None and (entry[1] or not readers):
                busy.append(entry[0])
        return busy

    async def wait_readable(self, scope: Hashable, offsets: Iterable[int]) -> None:
        """Return once no reader-blocking writer holds any of ``offsets``."""
        offsets = list(offsets)
        while busy := self._busy(scope, offsets, readers=True):
            await asyncio.wait(busy)

    def held(self, scope: Hashable, offset: int) -> bool:
        """Whether a writer holds the offset right now."""
        return (scope, offset) in self._held

    @contextlib.asynccontextmanager
    async def hold(
        self, scope: Hashable, offsets: Iterable[int], *, blocks_readers: bool = True
    ) -> AsyncIterator[None]:
        """Hold ``offsets`` exclusively for the duration of the block."""
        offsets = list(offsets)
        while busy := self._busy(scope, offsets, readers=False):
            await asyncio.wait(busy)
        with self._holding(scope, offsets, blocks_readers):
            yield

    def try_hold(
        self, scope: Hashable, offsets: Iterable[int], *, blocks_readers: bool = False
    ) -> tuple[list[int], contextlib.AbstractContextManager[None]]:
        """Hold whichever of ``offsets`` are free, without waiting.

        Returns the offsets and a context manager that holds them while entered; enter
        it before the next ``await``, or another writer may take them first.
        """
        free = [o for o in offsets if (scope, o) not in self._held]
        return free, self._holding(scope, free, blocks_readers)

    @contextlib.contextmanager
    def _holding(self, scope: Hashable, offsets: list[int], blocks_readers: bool) -> Iterator[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # map/zip rather than loops: a batch is hundreds of offsets, on the loop thread.
        keys = list(zip(itertools.repeat(scope), offsets))
        self._held.update(zip(keys, itertools.repeat((future, blocks_readers))))
        try:
            yield
        finally:
            collections.deque(map(self._held.__delitem__, keys), maxlen=0)
            future.set_result(None)
