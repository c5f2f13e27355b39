"""What every backend shares around its own storage logic.

``StoreBase`` holds a store's name, counters, closed state and offset guard. It
implements ``put`` on top of ``_store``, and ``get`` and ``get_many`` on top of one
batched ``_fetch``: validation, the closed check and the counting of puts, gets,
pages, misses and failed verifications are the same for every backend, while how
pages are stored and found stays in each backend. The public interface is still
the ``PageStore`` Protocol (``protocol.py``); this class is only how the backends in
this package implement it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import TypeVar

from wsd.storage.concurrency import OffsetGuard
from wsd.storage.errors import IntegrityError, PageNotFound, StoreClosed
from wsd.storage.page import (
    ExpectedGenerations,
    Generations,
    OpCounters,
    PageNamespace,
    StoredPage,
    generation_of,
)

T = TypeVar("T")


class StoreBase(abc.ABC):
    """A backend's shared plumbing. Subclasses set ``kind`` and ``durable`` and
    implement ``_store`` and ``_fetch``; the rest of ``PageStore`` is theirs to write."""

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._closed = False
        self._guard = OffsetGuard()
        self.counters = OpCounters()

    @property
    def name(self) -> str:
        """The name used in errors and stats, such as ``file`` or ``tiered/zstd``."""
        return self._name

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("store is closed", backend=self._name)

    def _check_writable(self) -> None:
        """Raise unless the store accepts writes; a backend may refuse more than closed."""
        self._check_open()

    async def put(
        self, ns: PageNamespace, pages: Mapping[int, bytes], *, generation: Generations
    ) -> None:
        self._check_writable()
        ns.check_pages(pages, backend=self._name)
        if not pages:
            return
        if isinstance(generation, int):  # one for the batch: check it once
            generations = dict.fromkeys(pages, generation_of(generation, next(iter(pages))))
        else:
            # map rather than a loop: a batch is hundreds of pages, on the loop thread.
            generations = dict(zip(pages, map(generation.__getitem__, pages), strict=True))
            if not 0 <= min(generations.values()) <= max(generations.values()) < 1 << 64:
                for offset in pages:
                    generation_of(generation, offset)  # raises, naming the first bad one
        self.counters.puts += 1
        await self._store(ns, pages, generations)
        self.counters.pages_put += len(pages)

    @abc.abstractmethod
    async def _store(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> None:
        """Store a validated, non-empty batch, each page with its generation; all of it
        or, if this raises, nothing that a get could mistake for a stored page."""

    async def get(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage:
        ns.check_offset(offset, backend=self._name)
        generations = None if generation is None else {offset: generation}
        return (await self._get(ns, [offset], generations, missing_ok=False))[offset]

    async def get_many(
        self,
        ns: PageNamespace,
        offsets: Sequence[int],
        *,
        generations: Mapping[int, int] | None = None,
        missing_ok: bool = False,
    ) -> dict[int, StoredPage]:
        wanted = ns.check_offsets(offsets, backend=self._name)
        if not wanted:
            return {}
        return await self._get(ns, wanted, generations, missing_ok=missing_ok)

    async def _get(
        self,
        ns: PageNamespace,
        offsets: list[int],
        generations: Mapping[int, int] | None,
        *,
        missing_ok: bool,
    ) -> dict[int, StoredPage]:
        """``get_many`` once the offsets are valid, distinct and not empty."""
        self._check_open()
        self.counters.gets += 1
        # A get never observes a page half written by a put or discard in flight.
        await self._guard.wait_readable(ns.key, offsets)
        found = await self._verified(self._fetch(ns, offsets, generations, missing_ok))
        self.counters.pages_got += len(found)
        return found

    @abc.abstractmethod
    async def _fetch(
        self, ns: PageNamespace, offsets: list[int], expected: ExpectedGenerations, missing_ok: bool
    ) -> dict[int, StoredPage]:
        """Read and verify the pages at ``offsets``; return them in that order.

        ``expected`` holds the generations to insist on. Once it is known which pages
        are stored, and before spending work on decoding them, call ``_check_missing``.
        """

    def _check_missing(
        self,
        ns: PageNamespace,
        offsets: Sequence[int],
        found: Collection[int],
        missing_ok: bool,
    ) -> None:
        """Count the offsets not in ``found`` (a subset of ``offsets``) as misses and,
        unless ``missing_ok``, raise one PageNotFound that names all of them."""
        if len(found) >= len(offsets):
            return
        missing = [offset for offset in offsets if offset not in found]
        self.counters.misses += len(missing)
        if not missing_ok:
            raise PageNotFound(
                backend=self._name, vm_id=ns.vm_id, region=ns.region, offsets=tuple(missing)
            )

    async def _verified(self, decoding: Awaitable[T]) -> T:
        """Await the decoding of stored pages, counting a failed verification."""
        try:
            return await decoding
        except IntegrityError:
            self.counters.integrity_errors += 1
            raise
