"""The tiered stack: demotion by budget and age, never losing or resurrecting a page."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from storage_fakes import FakeClock, FakeRedisServer
from zstd_layout import record_at, replace_record

from wsd.storage import (
    FileStoreConfig,
    IntegrityError,
    PageNamespace,
    PageNotFound,
    PageStore,
    RedisStoreConfig,
    TieredStoreConfig,
    TierUnavailable,
    ZstdStoreConfig,
)
from wsd.storage.file_store import FileStore
from wsd.storage.redis_store import RedisStore
from wsd.storage.tiered_store import TieredStore
from wsd.storage.zstd_store import RECORD_OVERHEAD, ZstdStore

NS = PageNamespace("vm1", 0)
P = 4096
SLOT = P + RECORD_OVERHEAD  # budget cost of one incompressible page


def _tiered(
    tiers: list[PageStore], clock: FakeClock | None = None, **policy: object
) -> TieredStore:
    configs = [
        ZstdStoreConfig(budget_bytes=1)
        if isinstance(t, ZstdStore)
        else FileStoreConfig(root=Path("/unused"))
        if isinstance(t, FileStore)
        else RedisStoreConfig(url="redis://h:1")
        for t in tiers
    ]
    config = TieredStoreConfig(tiers=configs, **policy)  # type: ignore[arg-type]
    return TieredStore(tiers, config, clock=clock or FakeClock())


async def _where(store: TieredStore, offsets: list[int]) -> list[str]:
    """Which tier holds each offset."""
    names = []
    for offset in offsets:
        for tier in store.tiers:
            if await tier.get_many(NS, [offset], missing_ok=True):
                names.append(tier.kind.value)
                break
        else:
            names.append("-")
    return names


@pytest.mark.asyncio
async def test_budget_pressure_demotes_the_oldest_pages(tmp_path: Path) -> None:
    clock = FakeClock()
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=4 * SLOT), clock=clock)
    file = await FileStore.open(FileStoreConfig(root=tmp_path), clock=clock)
    store = _tiered([zstd, file], clock, low_watermark=0.5, demote_batch_pages=1)
    pages = {n * P: os.urandom(P) for n in range(8)}
    for offset, data in pages.items():
        clock.advance(1)
        await store.put(NS, {offset: data}, generation=1)
    assert zstd.budget_usage()[0] <= 4 * SLOT
    placement = await _where(store, list(pages))
    assert placement[-1] == "zstd" and placement[0] == "file", placement
    assert placement == sorted(placement), "oldest pages went down first"
    await store.sync()
    assert {o: p.data for o, p in (await store.get_many(NS, list(pages))).items()} == pages
    stats = await store.stats()
    assert [t.backend for t in stats.tiers] == ["zstd", "file"]
    assert stats.pages == 8
    await store.close()


@pytest.mark.asyncio
async def test_a_batch_too_big_for_the_fast_tier_goes_below(tmp_path: Path) -> None:
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=2 * SLOT))
    file = await FileStore.open(FileStoreConfig(root=tmp_path))
    store = _tiered([zstd, file])
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    big = {n * P: os.urandom(P) for n in range(4)}
    await store.put(NS, big, generation=2)
    assert await _where(store, list(big)) == ["file"] * 4
    page = await store.get(NS, 0)
    assert (page.data, page.generation) == (big[0], 2), "old copy in zstd must not shadow"
    await store.close()


@pytest.mark.asyncio
async def test_age_demotion(tmp_path: Path) -> None:
    clock = FakeClock()
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20), clock=clock)
    file = await FileStore.open(FileStoreConfig(root=tmp_path), clock=clock)
    store = _tiered([zstd, file], clock, demote_after_seconds=300, demote_batch_pages=2)
    await store.put(NS, {n * P: os.urandom(P) for n in range(5)}, generation=1)
    clock.advance(200)
    await store.put(NS, {8 * P: bytes(P)}, generation=1)
    assert await store.demote_once() == 0
    clock.advance(150)
    assert await store.demote_once() == 5
    assert await _where(store, [0, 4 * P, 8 * P]) == ["file", "file", "zstd"]
    await store.close()


@pytest.mark.asyncio
async def test_demotion_never_drops_a_page_the_lower_tier_did_not_make_durable() -> None:
    clock = FakeClock()
    server = FakeRedisServer()
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20), clock=clock)
    redis = RedisStore(RedisStoreConfig(url="redis://h:1", wait_replicas=1), server)
    store = _tiered([zstd, redis], clock, demote_after_seconds=10)
    data = os.urandom(P)
    await store.put(NS, {0: data}, generation=1)
    clock.advance(60)
    with pytest.raises(TierUnavailable, match="replicas"):
        await store.demote_once()  # written to redis, but the replica barrier failed
    assert await _where(store, [0]) == ["zstd"]
    server.replicas = 1
    assert await store.demote_once() == 1
    assert await _where(store, [0]) == ["redis"]
    assert (await store.get(NS, 0)).data == data
    await store.close()


@pytest.mark.asyncio
async def test_a_lost_fast_tier_never_resurrects_an_older_copy(tmp_path: Path) -> None:
    clock = FakeClock()
    file_config = FileStoreConfig(root=tmp_path)
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20), clock=clock)
    file = await FileStore.open(file_config, clock=clock)
    store = _tiered([zstd, file], clock, demote_after_seconds=10)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    clock.advance(60)
    assert await store.demote_once() == 1
    await store.put(NS, {0: os.urandom(P)}, generation=2)  # back into zstd
    await store.sync()
    await file.close()  # the daemon crashes: zstd's pages die with it
    file = await FileStore.open(file_config, clock=clock)
    after_crash = _tiered([ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20)), file])
    with pytest.raises(PageNotFound):
        await after_crash.get(NS, 0)
    await after_crash.close()
    await zstd.close()


@pytest.mark.asyncio
async def test_integrity_error_does_not_fall_through(tmp_path: Path) -> None:
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20))
    file = await FileStore.open(FileStoreConfig(root=tmp_path))
    store = _tiered([zstd, file])
    await file.put(NS, {0: os.urandom(P)}, generation=1)  # an older copy, planted below
    await zstd.put(NS, {0: os.urandom(P)}, generation=2)
    record = record_at(zstd, NS, 0)
    replace_record(zstd, NS, 0, record._replace(checksum=record.checksum ^ 1))
    with pytest.raises(IntegrityError) as info:
        await store.get(NS, 0)
    assert info.value.backend == "zstd"
    with pytest.raises(IntegrityError):
        await store.get_many(NS, [0])
    await store.close()


@pytest.mark.asyncio
async def test_discard_reaches_every_tier(tmp_path: Path) -> None:
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20))
    file = await FileStore.open(FileStoreConfig(root=tmp_path))
    store = _tiered([zstd, file])
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    await file.put(NS, {2 * P: os.urandom(P)}, generation=1)
    await store.discard(NS, [0, 2 * P])
    assert await _where(store, [0, P, 2 * P]) == ["-", "zstd", "-"]
    await store.discard(NS)
    assert await _where(store, [P]) == ["-"]
    await store.close()


@pytest.mark.asyncio
async def test_close_drains_the_memory_tier(tmp_path: Path) -> None:
    config = FileStoreConfig(root=tmp_path)
    store = _tiered(
        [ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20)), await FileStore.open(config)]
    )
    pages = {n * P: os.urandom(P) for n in range(300)}
    await store.put(NS, pages, generation=1)
    assert not store.durable
    await store.close()
    file = await FileStore.open(config)
    assert {o: p.data for o, p in (await file.get_many(NS, list(pages))).items()} == pages
    await file.close()


@pytest.mark.asyncio
async def test_background_demotion_loop(tmp_path: Path) -> None:
    clock = FakeClock()
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20), clock=clock)
    file = await FileStore.open(FileStoreConfig(root=tmp_path), clock=clock)
    store = _tiered([zstd, file], clock, demote_after_seconds=5, demote_interval_seconds=0.01)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    clock.advance(10)
    stop = asyncio.Event()
    loop = asyncio.create_task(store.run_demotion(stop))
    for _ in range(500):
        if await _where(store, [0]) == ["file"]:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(loop, 1)
    assert await _where(store, [0]) == ["file"]
    await store.close()


def test_only_demotable_tiers_above_the_last() -> None:
    redis = RedisStore(RedisStoreConfig(url="redis://h:1"), FakeRedisServer())
    zstd = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20))
    with pytest.raises(TypeError, match="cannot demote"):
        TieredStore([redis, zstd], TieredStoreConfig.model_construct())


@pytest.mark.asyncio
async def test_puts_into_a_durable_tier_do_not_need_the_tiers_below(tmp_path: Path) -> None:
    server = FakeRedisServer()
    file = await FileStore.open(FileStoreConfig(root=tmp_path))
    redis = RedisStore(RedisStoreConfig(url="redis://h:1"), server)
    store = _tiered([file, redis])
    await redis.put(NS, {0: os.urandom(P)}, generation=1)  # an older copy below
    server.down = True
    data = os.urandom(P)
    await store.put(NS, {0: data}, generation=2)
    await store.sync()
    assert (await store.get(NS, 0)).data == data, "the file copy shadows the old one"
    server.down = False
    memory = ZstdStore(ZstdStoreConfig(budget_bytes=1 << 20))
    stacked = _tiered([memory, redis])
    server.down = True
    with pytest.raises(TierUnavailable):
        await stacked.put(NS, {0: data}, generation=3)  # would leave gen 1 below memory
    server.down = False
    await memory.close()
    await store.close()
