"""A stack of tiers, fastest first, such as zstd memory → file → redis.

Invariants, which together mean a get never returns an older copy of a page:

* A get never sees an older copy. A put into a memory tier first removes the page
  from the tiers below, so a stale copy cannot surface when the memory tier loses the
  page in a crash; below a durable tier an older copy stays shadowed until demotion
  overwrites it. A put that overflows to a lower tier removes the page from the tiers
  it skipped.
* Demotion copies a page down, syncs the lower tiers, and only then removes it from
  the upper tier, and only if the upper tier still holds the same generation: a page
  put again meanwhile stays where it is.
* Gets look in the fastest tier first and fall through only on PageNotFound. An
  IntegrityError or TierUnavailable stops the lookup: falling through could return
  an older copy.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar

import structlog

from wsd.storage.config import TieredStoreConfig
from wsd.storage.errors import BudgetExceeded, IntegrityError, StorageError
from wsd.storage.page import (
    BackendKind,
    ExpectedGenerations,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)
from wsd.storage.protocol import DemotionSource, PageStore
from wsd.storage.store_base import StoreBase

log = structlog.get_logger(__name__)


class TieredStore(StoreBase):
    """Tiers fastest first; every tier but the last must be a DemotionSource."""

    kind: ClassVar[BackendKind] = BackendKind.TIERED

    def __init__(
        self,
        tiers: Sequence[PageStore],
        config: TieredStoreConfig,
        *,
        clock: Callable[[], float] = time.time,
        name: str = "tiered",
    ) -> None:
        if len(tiers) < 2:
            raise ValueError("a tiered store needs at least two tiers")
        super().__init__(name=name)
        self._sources: list[DemotionSource] = []
        for tier in tiers[:-1]:
            if not isinstance(tier, DemotionSource):
                raise TypeError(f"tier {tier.name} cannot demote pages to a lower tier")
            self._sources.append(tier)
        self._tiers = list(tiers)
        self._config = config
        self._clock = clock

    @property
    def durable(self) -> bool:
        """Only if every tier is: a crash loses the pages held in a memory tier."""
        return all(tier.durable for tier in self._tiers)

    @property
    def tiers(self) -> tuple[PageStore, ...]:
        """The tiers, fastest first."""
        return tuple(self._tiers)

    # -- put --------------------------------------------------------------------------

    async def _store(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> None:
        async with self._guard.hold(ns.key, pages.keys()):
            try:
                await self._store_from(0, ns, pages, generations)
            except StorageError:
                self.counters.failures += 1
                raise

    async def _store_from(
        self,
        start: int,
        ns: PageNamespace,
        pages: Mapping[int, bytes],
        gens: Mapping[int, int],
    ) -> int:
        """Write pages into tier ``start`` or, when it is full, the first one below with
        room. Returns the tier index used. Tiers above ``start`` are not touched."""
        offsets = list(pages)
        if not self._tiers[start].durable:
            # A memory tier loses its pages in a crash, and an older copy below would
            # then be served in their place: remove it first. Below a durable tier an
            # older copy is harmless (the durable copy shadows it until demotion
            # overwrites it, or a discard removes both), so puts there need not reach
            # (or wait for) the lower tiers.
            for lower in self._tiers[start + 1 :]:
                await lower.discard(ns, offsets)
        last = len(self._tiers) - 1
        for index in range(start, last + 1):
            tier = self._tiers[index]
            try:
                await tier.put(ns, pages, generation=gens)
                return index
            except BudgetExceeded as err:
                if index == last:
                    raise
                fits, _ = await self._make_room(index, err.needed_bytes)
                if fits:
                    try:
                        await tier.put(ns, pages, generation=gens)
                        return index
                    except BudgetExceeded:
                        pass
                # An older copy left here would shadow the new one written below.
                await tier.discard(ns, offsets)
        raise AssertionError("unreachable: the last tier either stores or raises")

    # -- demotion ---------------------------------------------------------------------

    async def _make_room(self, index: int, needed: int) -> tuple[bool, int]:
        """Demote the coldest pages of tier ``index`` until ``needed`` more bytes fit
        under the low watermark. Returns whether they fit under the budget, and how
        many pages were moved."""
        source = self._sources[index]
        moved = 0
        while True:
            used, budget = source.budget_usage()
            if budget is None or used + needed <= self._config.low_watermark * budget:
                return True, moved
            count = await self._demote(index, self._config.demote_batch_pages, None)
            if not count:
                return used + needed <= budget, moved
            moved += count

    async def _demote(self, index: int, limit: int, stored_before: float | None) -> int:
        """Move up to ``limit`` of the coldest pages of tier ``index`` one tier down."""
        refs = await self._sources[index].coldest(limit, stored_before=stored_before)
        groups: dict[PageNamespace, list[PageRef]] = defaultdict(list)
        for ref in refs:
            groups[ref.ns].append(ref)
        moved = 0
        batch = self._config.demote_batch_pages
        for ns, refs_of_ns in groups.items():
            for start in range(0, len(refs_of_ns), batch):
                moved += await self._demote_group(index, ns, refs_of_ns[start : start + batch])
        return moved

    async def _demote_group(self, index: int, ns: PageNamespace, group: list[PageRef]) -> int:
        # Never wait here: the put that asked for room may hold some of these pages.
        free, holding = self._guard.try_hold(ns.key, [ref.offset for ref in group])
        with holding:
            if not free:
                return 0
            chosen = set(free)
            expected = {r.offset: r.generation for r in group if r.offset in chosen}
            return await self._move(index, ns, expected)

    async def _move(self, index: int, ns: PageNamespace, expected: Mapping[int, int]) -> int:
        upper = self._tiers[index]
        try:
            found = await upper.get_many(ns, list(expected), missing_ok=True)
        except IntegrityError:
            found = await self._readable(upper, ns, list(expected))
        current = {o: p for o, p in found.items() if p.generation == expected[o]}
        if not current:
            return 0
        await self._store_from(
            index + 1,
            ns,
            {o: p.data for o, p in current.items()},
            {o: p.generation for o, p in current.items()},
        )
        # Durable below before it is dropped above: a crash in between leaves two
        # copies of the same generation, never none.
        for lower in self._tiers[index + 1 :]:
            await lower.sync()
        return await self._sources[index].remove_if_generation(
            ns, {o: p.generation for o, p in current.items()}
        )

    async def _readable(
        self, tier: PageStore, ns: PageNamespace, offsets: list[int]
    ) -> dict[int, StoredPage]:
        """The pages that pass verification. A corrupt page stays where it is, where
        every get keeps failing loudly; it must not block the others from moving."""
        found: dict[int, StoredPage] = {}
        for offset in offsets:
            try:
                found.update(await tier.get_many(ns, [offset], missing_ok=True))
            except IntegrityError as err:
                self.counters.integrity_errors += 1
                log.error("page cannot be demoted", error=str(err))
        return found

    async def demote_once(self) -> int:
        """One demotion round: relieve tiers above their high watermark, then move
        pages older than ``demote_after_seconds``. Returns the pages moved."""
        moved = 0
        cutoff = None
        if self._config.demote_after_seconds is not None:
            cutoff = self._clock() - self._config.demote_after_seconds
        batch = self._config.demote_batch_pages
        for index, source in enumerate(self._sources):
            used, budget = source.budget_usage()
            if budget is not None and used > self._config.high_watermark * budget:
                moved += (await self._make_room(index, 0))[1]
            while cutoff is not None:
                count = await self._demote(index, batch, cutoff)
                moved += count
                if count < batch:
                    break
        return moved

    async def run_demotion(self, stop: asyncio.Event) -> None:
        """Run ``demote_once`` every ``demote_interval_seconds`` until ``stop`` is set.

        A failed round is logged and retried at the next interval: demotion only
        moves copies, so a failure leaves every page where it was.
        """
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self._config.demote_interval_seconds)
                return
            except TimeoutError:
                pass
            try:
                await self.demote_once()
            except StorageError as err:
                self.counters.failures += 1
                log.warning("demotion round failed", error=str(err), retryable=err.retryable)

    async def _drain(self) -> None:
        for index, tier in enumerate(self._tiers[:-1]):
            if tier.durable:
                continue
            # Everything at once: a page that cannot move (corrupt) must not hide the rest.
            await self._demote(index, 1 << 62, None)

    # -- get, discard, sync -----------------------------------------------------------

    async def _fetch(
        self, ns: PageNamespace, offsets: list[int], expected: ExpectedGenerations, missing_ok: bool
    ) -> dict[int, StoredPage]:
        # Each tier is asked only for what the faster ones did not have; a tier that
        # raises (IntegrityError, TierUnavailable) ends the lookup.
        found: dict[int, StoredPage] = {}
        remaining = offsets
        for tier in self._tiers:
            if not remaining:
                break
            found.update(await tier.get_many(ns, remaining, generations=expected, missing_ok=True))
            remaining = [o for o in remaining if o not in found]
        self._check_missing(ns, offsets, found, missing_ok)
        return {o: found[o] for o in offsets if o in found}

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        self.counters.discards += 1
        # Slowest first: if a tier fails midway, the copies above it still shadow the
        # ones below, rather than a get falling through to a copy that should be gone.
        if offsets is None:
            for tier in reversed(self._tiers):
                await tier.discard(ns, None)
            return
        wanted = ns.check_offsets(offsets, backend=self._name)
        async with self._guard.hold(ns.key, wanted):
            for tier in reversed(self._tiers):
                await tier.discard(ns, wanted)

    async def sync(self) -> None:
        self.counters.syncs += 1
        for tier in self._tiers:
            await tier.sync()

    async def stats(self) -> StoreStats:
        tiers = tuple([await tier.stats() for tier in self._tiers])

        def total(values: Iterable[int | None]) -> int | None:
            known = list(values)
            return None if None in known else sum(v or 0 for v in known)

        return StoreStats(
            backend=self._name,
            pages=total(t.pages for t in tiers),
            stored_bytes=total(t.stored_bytes for t in tiers),
            logical_bytes=total(t.logical_bytes for t in tiers),
            budget_bytes=None,
            counters=StoreStats.snapshot(self.counters),
            tiers=tiers,
        )

    async def close(self) -> None:
        """Move every page out of the memory tiers, then close every tier.

        Draining makes a graceful restart lose nothing; if it fails (a lower tier is
        down) the tiers are closed anyway and the error is raised, since the pages
        still in memory are lost with the process either way.
        """
        errors: list[BaseException] = []
        if not self._closed:
            self._closed = True
            try:
                await self._drain()
            except StorageError as err:
                errors.append(err)
        for tier in self._tiers:
            try:
                await tier.close()
            except StorageError as err:
                errors.append(err)
        if errors:
            raise errors[0]
