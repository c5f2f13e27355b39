"""The one interface every storage backend implements.

The evictor calls ``put`` then ``sync`` and punches the page out of guest memory only
after ``sync`` returns; the fault path calls ``get`` and needs exactly the bytes that
were put, or an exception (never zeros as a fallback).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from wsd.storage.page import (
    BackendKind,
    Generations,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)


@runtime_checkable
class PageStore(Protocol):
    """An async page store. No method blocks the event loop thread.

    Pages are addressed by ``(ns, offset)``; ``offset`` is in bytes and a multiple of
    ``ns.page_size``; every page is exactly ``ns.page_size`` bytes.
    """

    @property
    def kind(self) -> BackendKind:
        """Which backend this is (the registry key)."""
        ...

    @property
    def name(self) -> str:
        """The name used in errors and stats, such as ``file`` or ``tiered/zstd``."""
        ...

    @property
    def durable(self) -> bool:
        """Whether acknowledged pages survive a crash and restart of this process."""
        ...

    async def put(
        self,
        ns: PageNamespace,
        pages: Mapping[int, bytes],
        *,
        generation: Generations,
    ) -> None:
        """Store a batch of pages (offset → bytes), each tagged with its generation.

        Not durable until ``sync`` returns. If ``put`` raises, no page of the batch is
        acknowledged: a later ``get`` of such a page raises, or returns the exact bytes
        of that batch, never anything else.
        """
        ...

    async def get(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage:
        """Fetch one page. ``generation``, when given, must match the stored one.

        Raises PageNotFound, IntegrityError (also for a generation mismatch) or
        TierUnavailable.
        """
        ...

    async def get_many(
        self,
        ns: PageNamespace,
        offsets: Sequence[int],
        *,
        generations: Mapping[int, int] | None = None,
        missing_ok: bool = False,
    ) -> dict[int, StoredPage]:
        """Fetch a batch, in the order asked for. Missing pages raise PageNotFound
        naming all of them, or are left out of the result with ``missing_ok``."""
        ...

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        """Forget pages; ``None`` forgets the whole region. Missing pages are ignored."""
        ...

    async def sync(self) -> None:
        """Durability barrier: every put that returned before this call is durable
        (as far as the backend's documented durability goes) when it returns."""
        ...

    async def stats(self) -> StoreStats:
        """A snapshot of sizes and counters."""
        ...

    async def close(self) -> None:
        """Wait for operations in flight, make them durable, release resources."""
        ...


@runtime_checkable
class DemotionSource(Protocol):
    """A tier that can hand its coldest pages to the tier below it."""

    async def coldest(self, limit: int, *, stored_before: float | None = None) -> list[PageRef]:
        """Up to ``limit`` pages, oldest put first, optionally only those put before
        ``stored_before`` (a timestamp of the store's clock)."""
        ...

    def budget_usage(self) -> tuple[int, int | None]:
        """Bytes charged against the budget, and the budget (None when unlimited)."""
        ...

    async def remove_if_generation(self, ns: PageNamespace, expected: Mapping[int, int]) -> int:
        """Drop each page whose stored generation equals ``expected[offset]``; pages
        that were put again meanwhile are kept. Returns how many were dropped."""
        ...


@runtime_checkable
class InlineGet(Protocol):
    """A store that can sometimes answer a ``get`` at once, on the calling thread.

    The fault path uses it to install a page without an asyncio task or a thread
    hop: a fault on an in-memory tier then costs microseconds, not a round trip.
    """

    def get_inline(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage | None:
        """The page, if it can be had without waiting (held in memory, or in the page
        cache) and no put or discard of it is in flight; otherwise None, and the
        caller uses ``get``.  Raises IntegrityError like ``get``
        for a page it holds but cannot verify (wrong generation included)."""
        ...
