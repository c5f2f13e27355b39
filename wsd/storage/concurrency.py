"""Keeping blocking work off the event loop, and ordering operations on the same page."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from wsd.storage.errors import StoreClosed

T = TypeVar("T")


class Offload:
    """A thread pool owned by one backend; the event loop only awaits its futures.

    It tracks the calls in flight so that ``close`` can wait for them: a backend must
    not close a file descriptor while a worker may still write to it, since the number
    could be reused by another file in the meantime. The thread-side futures are
    tracked, not the awaiting ones, so a cancelled caller cannot make ``close`` believe
    a worker is done while it is still running.
    """

    def __init__(self, *, backend: str, threads: int) -> None:
        self._backend = backend
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"wsd-{backend}")
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
        self._pool.shutdown(wait=False)


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
