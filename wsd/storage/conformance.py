"""The contract every PageStore keeps, as runnable checks.

The unit tests run these against the file, zstd, tiered and (in-memory) Redis stores;
the integration tests run the same checks against a real redis-server. A new backend
added to the registry passes them before it is used. Each check raises
AssertionError (or the unexpected StorageError) on a violation.

``Contract.open_store`` must open a new store instance on the same underlying storage
every time it is called (same directory, same server and key prefix), so the restart
check can close one instance and find the pages through the next.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from wsd.storage.errors import (
    IntegrityError,
    InvalidPage,
    PageNotFound,
    StorageError,
)
from wsd.storage.page import HUGE_PAGE_2M, SMALL_PAGE, PageNamespace
from wsd.storage.protocol import PageStore

OpenStore = Callable[[], Awaitable[PageStore]]
E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True)
class Contract:
    """How to open the backend under test, and what it promises."""

    open_store: OpenStore
    durable: bool
    """Pages acknowledged by sync survive close and reopen."""


def sample_page(rng: random.Random, size: int, flavour: int) -> bytes:
    """A page of one of four kinds: zeros, one repeated byte, text-like, random."""
    if flavour == 0:
        return bytes(size)
    if flavour == 1:
        return bytes((rng.randrange(1, 256),)) * size
    if flavour == 2:
        words = [b"guest", b"page", b"kernel", b"memory", b"0000", b"\n", b"lorem", b"ipsum"]
        text = b" ".join(rng.choice(words) for _ in range(size // 3))
        return text[:size].ljust(size, b" ")
    return rng.randbytes(size)


def sample_pages(
    rng: random.Random, count: int, *, size: int = SMALL_PAGE, first: int = 0
) -> dict[int, bytes]:
    """``count`` consecutive pages from ``first``, cycling through the four kinds."""
    return {first + n * size: sample_page(rng, size, n % 4) for n in range(count)}


@contextlib.asynccontextmanager
async def _opened(contract: Contract) -> AsyncIterator[PageStore]:
    """A new store instance, closed when the block ends however it ends."""
    store = await contract.open_store()
    try:
        yield store
    finally:
        await store.close()


async def _expect(error: type[E], call: Awaitable[object], failure: str) -> E:
    """Await ``call``, which must raise ``error``; return it, or fail with ``failure``."""
    try:
        await call
    except error as err:
        return err
    raise AssertionError(failure)


async def _assert_pages(
    store: PageStore, ns: PageNamespace, pages: Mapping[int, bytes], generation: int
) -> None:
    for offset, data in pages.items():
        page = await store.get(ns, offset)
        assert page.data == data, f"{store.name}: page {offset:#x} differs"
        assert page.generation == generation, f"{store.name}: generation of {offset:#x}"
    batch = await store.get_many(ns, list(pages))
    assert {o: p.data for o, p in batch.items()} == dict(pages), f"{store.name}: get_many"


async def _round_trip(
    contract: Contract, ns: PageNamespace, pages: Mapping[int, bytes], generation: int
) -> None:
    async with _opened(contract) as store:
        await store.put(ns, pages, generation=generation)
        await store.sync()
        await _assert_pages(store, ns, pages, generation)


async def check_round_trip(contract: Contract) -> None:
    """Random, zero, fill and text pages come back byte for byte with their generation."""
    pages = sample_pages(random.Random(1), 16)
    await _round_trip(contract, PageNamespace("vm-round-trip", 3), pages, 7)


async def check_batches(contract: Contract) -> None:
    """Batches with gaps, overwrites with a new generation, per-page generations."""
    async with _opened(contract) as store:
        rng = random.Random(2)
        ns = PageNamespace("vm-batches", 0)
        first = sample_pages(rng, 8)
        second = {o + 64 * SMALL_PAGE: d for o, d in sample_pages(rng, 8).items()}
        await store.put(ns, first, generation=1)
        await store.put(ns, second, generation=1)
        rewritten = {o: rng.randbytes(SMALL_PAGE) for o in list(first)[::2]}
        await store.put(ns, rewritten, generation=2)
        gens = {o: 10 + n for n, o in enumerate(second)}
        await store.put(ns, second, generation=gens)
        await store.sync()
        for offset in first:
            page = await store.get(ns, offset)
            expected = rewritten.get(offset, first[offset])
            assert page.data == expected, f"{store.name}: overwrite of {offset:#x}"
            assert page.generation == (2 if offset in rewritten else 1)
        batch = await store.get_many(ns, list(second)[::-1])
        assert list(batch) == list(second)[::-1], f"{store.name}: get_many keeps order"
        for offset, page in batch.items():
            assert (page.data, page.generation) == (second[offset], gens[offset])
        await store.put(ns, {}, generation=3)


async def check_missing(contract: Contract) -> None:
    """Missing pages raise PageNotFound naming them, or are left out with missing_ok."""
    async with _opened(contract) as store:
        ns = PageNamespace("vm-missing", 0)
        err = await _expect(
            PageNotFound, store.get(ns, 0), f"{store.name}: get of an unknown region returned"
        )
        assert err.offsets == (0,) and err.vm_id == "vm-missing"
        await store.put(ns, {SMALL_PAGE: bytes(SMALL_PAGE)}, generation=1)
        missing = await _expect(
            PageNotFound,
            store.get_many(ns, [0, SMALL_PAGE, 2 * SMALL_PAGE]),
            f"{store.name}: get_many with missing pages returned",
        )
        assert missing.offsets == (0, 2 * SMALL_PAGE), f"{store.name}: {missing.offsets}"
        found = await store.get_many(ns, [0, SMALL_PAGE], missing_ok=True)
        assert list(found) == [SMALL_PAGE]


async def check_discard(contract: Contract) -> None:
    """Discarded pages are gone, others stay; a whole region can be dropped."""
    async with _opened(contract) as store:
        ns = PageNamespace("vm-discard", 0)
        other = PageNamespace("vm-discard", 1)
        pages = sample_pages(random.Random(3), 8)
        await store.put(ns, pages, generation=1)
        await store.put(other, pages, generation=1)
        gone = list(pages)[1:4]
        await store.discard(ns, [*gone, 1000 * SMALL_PAGE])
        await store.sync()
        for offset in pages:
            try:
                page = await store.get(ns, offset)
            except PageNotFound:
                assert offset in gone, f"{store.name}: {offset:#x} lost"
            else:
                assert offset not in gone, f"{store.name}: {offset:#x} survived discard"
                assert page.data == pages[offset]
        await store.put(ns, {gone[0]: pages[gone[0]]}, generation=2)
        assert (await store.get(ns, gone[0])).generation == 2, "put after discard"
        await store.discard(ns)
        await store.sync()
        assert not await store.get_many(ns, list(pages), missing_ok=True), "region dropped"
        await _assert_pages(store, other, pages, 1)


async def check_restart(contract: Contract) -> None:
    """Everything acknowledged (put, then sync returned) is there after a reopen."""
    if not contract.durable:
        return
    rng = random.Random(4)
    ns = PageNamespace("vm-restart", 5)
    huge = PageNamespace("vm-restart", 6, HUGE_PAGE_2M)
    pages = sample_pages(rng, 12)
    huge_pages = sample_pages(rng, 2, size=HUGE_PAGE_2M)
    async with _opened(contract) as store:
        await store.put(ns, pages, generation=1)
        await store.put(huge, huge_pages, generation=4)
        await store.discard(ns, [0])
        await store.sync()
    async with _opened(contract) as store:
        await _assert_pages(store, ns, {o: d for o, d in pages.items() if o}, 1)
        await _assert_pages(store, huge, huge_pages, 4)
        assert not await store.get_many(ns, [0], missing_ok=True), "discard survived reopen"


async def check_isolation(contract: Contract) -> None:
    """Two VMs (and two regions) with the same offsets never see each other's pages."""
    async with _opened(contract) as store:
        rng = random.Random(5)
        a, b, a1 = PageNamespace("vm-a", 0), PageNamespace("vm-b", 0), PageNamespace("vm-a", 1)
        pages = {ns: sample_pages(rng, 4) for ns in (a, b, a1)}
        for ns, batch in pages.items():
            await store.put(ns, batch, generation=1)
        await store.discard(b, [0])
        for ns, batch in pages.items():
            for offset, data in batch.items():
                if ns == b and offset == 0:
                    continue
                assert (await store.get(ns, offset)).data == data, f"{store.name}: {ns}"
        assert (await store.get(a, 0)).data == pages[a][0], "discard leaked across VMs"


async def check_generation(contract: Contract) -> None:
    """A get naming the expected generation fails loudly on any other generation."""
    async with _opened(contract) as store:
        ns = PageNamespace("vm-generation", 0)
        data = random.Random(6).randbytes(SMALL_PAGE)
        await store.put(ns, {0: data}, generation=5)
        assert (await store.get(ns, 0, generation=5)).data == data
        err = await _expect(
            IntegrityError,
            store.get(ns, 0, generation=6),
            f"{store.name}: stale generation served",
        )
        assert err.expected == 6 and err.actual == 5, f"{store.name}: {err}"
        await _expect(
            IntegrityError,
            store.get_many(ns, [0], generations={0: 4}),
            f"{store.name}: stale generation served by get_many",
        )


async def check_invalid(contract: Contract) -> None:
    """Misaligned offsets and wrong page lengths are refused, and store nothing."""
    async with _opened(contract) as store:
        ns = PageNamespace("vm-invalid", 0)
        bad: list[dict[int, bytes]] = [
            {0: bytes(SMALL_PAGE), 100: bytes(SMALL_PAGE)},
            {0: bytes(SMALL_PAGE), SMALL_PAGE: bytes(10)},
            {-SMALL_PAGE: bytes(SMALL_PAGE)},
        ]
        for batch in bad:
            put = store.put(ns, batch, generation=1)
            await _expect(InvalidPage, put, f"{store.name}: accepted {list(batch)}")
        assert not await store.get_many(ns, [0, SMALL_PAGE], missing_ok=True)
        await _expect(
            InvalidPage, store.get(ns, 5), f"{store.name}: get of a misaligned offset returned"
        )


async def check_huge_pages(contract: Contract) -> None:
    """2 MiB pages round trip, including zero and fill pages."""
    pages = sample_pages(random.Random(7), 4, size=HUGE_PAGE_2M)
    await _round_trip(contract, PageNamespace("vm-huge", 0, HUGE_PAGE_2M), pages, 3)


async def check_large_batches(contract: Contract) -> None:
    """A batch of hundreds of pages, with a gap and per-page generations, comes back
    byte for byte in whatever order it is asked for."""
    async with _opened(contract) as store:
        rng = random.Random(9)
        ns = PageNamespace("vm-large", 0)
        pages = {**sample_pages(rng, 200), **sample_pages(rng, 50, first=300 * SMALL_PAGE)}
        gens = {offset: 1 + n % 5 for n, offset in enumerate(pages)}
        await store.put(ns, pages, generation=gens)
        await store.sync()
        wanted = [*pages, 250 * SMALL_PAGE]
        rng.shuffle(wanted)
        found = await store.get_many(ns, wanted, generations=gens, missing_ok=True)
        assert list(found) == [o for o in wanted if o in pages], f"{store.name}: order"
        assert {o: (p.data, p.generation) for o, p in found.items()} == {
            o: (pages[o], gens[o]) for o in pages
        }, f"{store.name}: large batch"


async def check_stats_and_close(contract: Contract) -> None:
    """Stats count the work done; a closed store refuses work with a StorageError."""
    store = await contract.open_store()
    ns = PageNamespace("vm-stats", 0)
    pages = sample_pages(random.Random(8), 4)
    try:
        await store.put(ns, pages, generation=1)
        await store.get(ns, 0)
        stats = await store.stats()
        assert stats.counters.puts >= 1 and stats.counters.gets >= 1, stats
        assert stats.pages is None or stats.pages >= len(pages), stats
    finally:
        await store.close()
    await store.close()  # idempotent
    await _expect(StorageError, store.get(ns, 0), f"{store.name}: get after close returned")


CHECKS: Final[Mapping[str, Callable[[Contract], Awaitable[None]]]] = {
    "round_trip": check_round_trip,
    "batches": check_batches,
    "missing": check_missing,
    "discard": check_discard,
    "restart": check_restart,
    "isolation": check_isolation,
    "generation": check_generation,
    "invalid": check_invalid,
    "huge_pages": check_huge_pages,
    "large_batches": check_large_batches,
    "stats_and_close": check_stats_and_close,
}
