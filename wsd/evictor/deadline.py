"""A deadline on every call the evictor makes to its storage tier.

A tier can hang instead of failing: a Redis that accepts connections and
answers nothing until its socket timeout, a wedged NFS mount under the file
tier whose ``pread`` or ``fsync`` blocks a worker thread for ever.  Without a
deadline an eviction attempt waits as long as its ``put`` or ``sync`` blocks,
and a fault's fetch never even reaches ``fetch_deadline_seconds``.  Past
``tier_call_deadline_seconds`` a call counts as failed (:class:`TierTimeout`),
so eviction pauses through its backoff and a fetch retries, as for a tier that
answers with an error.

The call itself is not cancelled, only no longer waited for: a thread blocked
in ``fsync`` cannot be stopped, and cancelling a store's coroutine would
release its per-page write guard while that thread still writes.  Such a
*stuck* call keeps running until the tier lets it go, so:

- **Writes** (``put``, ``sync``, ``discard``) are refused at once while an
  earlier write is stuck.  A put that timed out may still land; if a later put
  of the same page at the same generation could start first, the stale one
  would overwrite it after the page was punched.  Refusing keeps every write
  after every stuck one.
- **Reads** (``get``, ``get_many``) asked again with the same arguments (a
  fetch retrying) wait for the call already running instead of starting
  another, and no new read starts while :data:`MAX_STUCK_CALLS` calls are
  stuck.  So a hung tier holds at most that many worker threads or
  connections per VM, however long faults keep retrying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from wsd.storage import PageNamespace, PageStore, StoredPage, TierTimeout
from wsd.storage.page import Generations

T = TypeVar("T")

# Calls of one VM past their deadline and still running (blocked worker
# threads, Redis connections waiting for their socket timeout) beyond which no
# new read is started: a fault then fails at once and retries later.
MAX_STUCK_CALLS = 8


class TierCalls:
    """The evictor's calls to ``store`` for one VM, each bounded by ``deadline()`` seconds.

    ``deadline`` is read at each call, so a reloaded configuration applies to
    the next call.
    """

    def __init__(self, store: PageStore, deadline: Callable[[], float], vm_id: str) -> None:
        self.store = store
        self._deadline = deadline
        self._vm_id = vm_id
        self._reads: dict[Hashable, asyncio.Task[Any]] = {}
        self._stuck_reads: set[asyncio.Task[Any]] = set()
        self._stuck_writes: set[asyncio.Task[Any]] = set()
        self.timeouts = 0
        """Calls that passed their deadline (each counted once)."""

    @property
    def stuck(self) -> int:
        """Calls past their deadline that are still running."""
        return len(self._stuck_reads) + len(self._stuck_writes)

    async def put(
        self, ns: PageNamespace, pages: Mapping[int, bytes], *, generation: Generations
    ) -> None:
        what = f"put of {len(pages)} pages"
        await self._write(what, self.store.put(ns, pages, generation=generation))

    async def sync(self) -> None:
        await self._write("sync", self.store.sync())

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        await self._write("discard", self.store.discard(ns, offsets))

    async def get(self, ns: PageNamespace, offset: int, *, generation: int) -> StoredPage:
        key = ("get", ns, offset, generation)
        return await self._read(
            key, "get", lambda: self.store.get(ns, offset, generation=generation)
        )

    async def get_many(
        self,
        ns: PageNamespace,
        offsets: Sequence[int],
        *,
        generations: Mapping[int, int] | None = None,
        missing_ok: bool = False,
    ) -> dict[int, StoredPage]:
        gens = None if generations is None else tuple(sorted(generations.items()))
        key = ("get_many", ns, tuple(offsets), gens, missing_ok)
        return await self._read(
            key,
            f"get of {len(offsets)} pages",
            lambda: self.store.get_many(
                ns, offsets, generations=generations, missing_ok=missing_ok
            ),
        )

    async def _write(self, what: str, call: Coroutine[Any, Any, T]) -> T:
        if self._stuck_writes:
            call.close()
            raise self._error(
                f"{what} not started: an earlier write to the tier is still running "
                "past its deadline"
            )
        task = self._start(call)
        return await self._wait(task, what, self._stuck_writes)

    async def _read(
        self, key: Hashable, what: str, make: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        task = self._reads.get(key)
        if task is None:
            if self.stuck >= MAX_STUCK_CALLS:
                raise self._error(
                    f"{what} not started: {self.stuck} calls to the tier are still "
                    "running past their deadline"
                )
            task = self._start(make())
            self._reads[key] = task
            task.add_done_callback(lambda t: self._forget_read(key, t))
        return await self._wait(task, what, self._stuck_reads)

    def _forget_read(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._reads.get(key) is task:
            del self._reads[key]

    def _start(self, call: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(call)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._stuck_reads.discard(task)
        self._stuck_writes.discard(task)
        if not task.cancelled():
            # A stuck call's error has nobody left to take it; without this
            # asyncio would log "Task exception was never retrieved".
            task.exception()

    async def _wait(self, task: asyncio.Task[T], what: str, stuck: set[asyncio.Task[Any]]) -> T:
        deadline = self._deadline()
        # asyncio.wait leaves the task running at the timeout, and when the
        # caller is cancelled (a session ending): see the module docstring.
        await asyncio.wait((task,), timeout=deadline)
        if not task.done():
            if task not in stuck:
                stuck.add(task)
                self.timeouts += 1
            raise self._error(f"no answer to a {what} within {deadline:g} s")
        return task.result()

    def _error(self, message: str) -> TierTimeout:
        return TierTimeout(message, backend=self.store.name, vm_id=self._vm_id)
