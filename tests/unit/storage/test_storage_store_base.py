"""What StoreBase gives every backend: put validation and counting, get and get_many."""

from __future__ import annotations

import pytest

from wsd.storage import PageNamespace, StoreClosed, ZstdStoreConfig
from wsd.storage.store_base import StoreBase
from wsd.storage.zstd_store import ZstdStore

NS = PageNamespace("vm1", 0)
P = 4096


def _store() -> ZstdStore:
    return ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20))


def test_backends_share_the_base() -> None:
    assert isinstance(_store(), StoreBase)


@pytest.mark.asyncio
@pytest.mark.parametrize("generation", [-1, 1 << 64])
async def test_a_generation_must_fit_in_64_bits(generation: int) -> None:
    store = _store()
    with pytest.raises(ValueError, match=f"of offset {P:#x} must fit in 64 bits"):
        await store.put(NS, {P: bytes(P), 2 * P: bytes(P)}, generation=generation)
    with pytest.raises(ValueError, match=f"of offset {2 * P:#x} must fit in 64 bits"):
        await store.put(NS, {P: bytes(P), 2 * P: bytes(P)}, generation={P: 1, 2 * P: generation})
    with pytest.raises(KeyError):  # a caller's bug, not bad data
        await store.put(NS, {P: bytes(P), 2 * P: bytes(P)}, generation={P: 1})
    assert not await store.get_many(NS, [P, 2 * P], missing_ok=True), "nothing stored"
    await store.close()


@pytest.mark.asyncio
async def test_counting_and_empty_requests() -> None:
    store = _store()
    await store.put(NS, {}, generation=1)
    assert await store.get_many(NS, []) == {}
    await store.put(NS, {0: bytes(P), P: b"\x01" * P}, generation={0: 3, P: 4})
    assert (await store.get(NS, P)).generation == 4
    assert list(await store.get_many(NS, [P, 2 * P, 0], missing_ok=True)) == [P, 0]
    counters = (await store.stats()).counters
    assert (counters.puts, counters.pages_put) == (1, 2), "an empty put is not counted"
    assert (counters.gets, counters.pages_got, counters.misses) == (2, 3, 1)
    await store.close()
    with pytest.raises(StoreClosed):
        await store.put(NS, {0: bytes(P)}, generation=1)
