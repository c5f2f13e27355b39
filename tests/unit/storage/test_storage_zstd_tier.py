"""The in-memory zstd tier: budget, fill markers, raw incompressible pages, integrity."""

from __future__ import annotations

import gc
import os
import random

import pytest
import zstandard
from zstd_layout import record_at, replace_record

from wsd.storage import BudgetExceeded, IntegrityError, PageNamespace, ZstdStoreConfig
from wsd.storage.conformance import sample_pages
from wsd.storage.record import PayloadKind
from wsd.storage.zstd_store import RECORD_OVERHEAD, ZstdStore

NS = PageNamespace("vm1", 0)
P = 4096


def _store(budget: int = 1 << 26) -> ZstdStore:
    return ZstdStore(ZstdStoreConfig(budget_bytes=budget))


@pytest.mark.asyncio
async def test_zero_and_fill_pages_are_markers() -> None:
    store = _store()
    await store.put(NS, {0: bytes(P), P: b"\xaa" * P}, generation=1)
    stats = await store.stats()
    assert (stats.pages, stats.stored_bytes, stats.logical_bytes) == (2, 2, 2 * P)
    assert store.budget_usage()[0] == 2 + 2 * RECORD_OVERHEAD
    assert (await store.get(NS, P)).data == b"\xaa" * P
    await store.close()


@pytest.mark.asyncio
async def test_incompressible_pages_stay_raw() -> None:
    store = _store()
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    assert (await store.stats()).stored_bytes == P
    record = record_at(store, NS, 0)
    assert record.kind == PayloadKind.DATA
    await store.close()


@pytest.mark.asyncio
async def test_ratio_matches_zstd_level_1_per_page() -> None:
    rng = random.Random(11)
    pages = sample_pages(rng, 256)
    store = _store()
    await store.put(NS, pages, generation=1)
    stored = (await store.stats()).stored_bytes
    assert stored is not None
    level1 = zstandard.ZstdCompressor(level=1)
    baseline = sum(len(level1.compress(p)) for p in pages.values())
    assert stored <= baseline, (stored, baseline)
    compressible = [p for n, p in enumerate(pages.values()) if n % 4 == 2]
    text_payload = sum(len(level1.compress(p)) for p in compressible)
    records = [record_at(store, NS, offset) for offset in pages]
    ours = sum(len(r.payload) for r in records if r.kind == PayloadKind.ZSTD)
    assert ours == text_payload, "same codec, same level, same frames"
    await store.close()


@pytest.mark.asyncio
async def test_budget_is_all_or_nothing() -> None:
    store = _store(budget=3 * (P + RECORD_OVERHEAD))
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    with pytest.raises(BudgetExceeded, match="budget exceeded") as info:
        await store.put(NS, {2 * P: os.urandom(P), 3 * P: os.urandom(P)}, generation=1)
    err = info.value
    assert err.needed_bytes == 2 * (P + RECORD_OVERHEAD)
    assert err.budget_bytes - err.used_bytes < err.needed_bytes
    assert not await store.get_many(NS, [2 * P, 3 * P], missing_ok=True)
    # Replacing a page only needs the difference.
    await store.put(NS, {0: bytes(P), P: os.urandom(P), 2 * P: os.urandom(P)}, generation=2)
    await store.close()


@pytest.mark.asyncio
async def test_corrupted_compressed_payload_fails_loudly() -> None:
    store = _store()
    text = sample_pages(random.Random(1), 3)[2 * P]
    await store.put(NS, {0: text}, generation=1)
    record = record_at(store, NS, 0)
    payload = bytearray(record.payload)
    payload[len(payload) // 2] ^= 0x04
    replace_record(store, NS, 0, record._replace(payload=bytes(payload)))
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        await store.get(NS, 0)
    assert info.value.backend == "zstd"
    await store.close()


@pytest.mark.asyncio
async def test_huge_pages_decode_off_the_loop() -> None:
    store = _store()
    huge = PageNamespace("vm1", 1, 2 * 1024 * 1024)
    pages = sample_pages(random.Random(2), 4, size=huge.page_size)
    await store.put(huge, pages, generation=1)
    assert {o: p.data for o, p in (await store.get_many(huge, list(pages))).items()} == pages
    await store.close()


@pytest.mark.asyncio
async def test_coldest_follows_put_order() -> None:
    now = [10.0]
    store = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20), clock=lambda: now[0])
    for n in range(4):
        now[0] = 10.0 + n
        await store.put(NS, {n * P: os.urandom(P)}, generation=n)
    now[0] = 20.0
    await store.put(NS, {0: os.urandom(P)}, generation=9)  # re-put: now the youngest
    assert [r.offset for r in await store.coldest(10)] == [P, 2 * P, 3 * P, 0]
    assert [r.offset for r in await store.coldest(10, stored_before=12.5)] == [P, 2 * P]
    assert await store.remove_if_generation(NS, {0: 0, P: 1}) == 1
    assert [r.offset for r in await store.coldest(2)] == [2 * P, 3 * P]
    await store.close()


@pytest.mark.asyncio
async def test_stored_pages_drop_out_of_the_garbage_collectors_walks() -> None:
    # A full collection walks every tracked object on the event loop: a tier of
    # millions of pages must not add millions of them (wsd/collector.py).
    store = _store()
    pages = sample_pages(random.Random(5), 64)
    await store.put(NS, pages, generation=1)
    # A tuple holding a tuple may be walked before its inner one is untracked:
    # untracked by the second collection it survives.
    gc.collect()
    gc.collect()
    entries = list(store._regions[NS.key].values())
    assert len(entries) == len(pages)
    assert not any(gc.is_tracked(e) for e in entries)
    assert not any(gc.is_tracked(key) for key in store._age)
    await store.close()
