"""A page store whose reads fail on demand: a tier outage as the fault service sees it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wsd.storage import PageNamespace, PageStore, StoredPage, TierUnavailable


class FlakyStore:
    """Wraps a store; ``get`` and ``get_many`` fail while ``failures`` > 0 (None: for ever).

    Each failed call takes one off ``failures``; set it to 0 to end the outage.
    An inline get declines during the outage, which sends a fault down the
    async path, where ``get`` fails.
    """

    def __init__(self, inner: PageStore, failures: int | None = None) -> None:
        self.inner = inner
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def failing(self) -> bool:
        return self.failures is None or self.failures > 0

    def _fail(self) -> None:
        if self.failing:
            if self.failures is not None:
                self.failures -= 1
            raise TierUnavailable("injected outage", backend="flaky")

    async def get(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage:
        self._fail()
        return await self.inner.get(ns, offset, generation=generation)

    async def get_many(
        self, ns: PageNamespace, offsets: Sequence[int], **kw: Any
    ) -> dict[int, StoredPage]:
        self._fail()
        return await self.inner.get_many(ns, offsets, **kw)

    def get_inline(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage | None:
        if self.failing:
            return None
        return self.inner.get_inline(ns, offset, generation=generation)  # type: ignore[attr-defined,no-any-return]

    async def put(self, ns: PageNamespace, pages: Mapping[int, bytes], **kw: Any) -> None:
        await self.inner.put(ns, pages, **kw)
