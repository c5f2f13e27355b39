"""A real redis-server stopped mid-batch: clear retryable errors, and after it comes
back (same directory and socket, appendfsync always) every acknowledged page is there."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from redis_server import RedisServer

from wsd.storage import (
    PageNamespace,
    PageNotFound,
    PageStore,
    TierUnavailable,
    parse_storage_config,
)
from wsd.storage.conformance import sample_pages
from wsd.storage.registry import open_backend

pytestmark = pytest.mark.integration

NS = PageNamespace("vm-outage", 2)
BATCH = 512  # 2 MiB per MSET: long enough on the wire to be cut in the middle


async def _open(server: RedisServer) -> PageStore:
    config = parse_storage_config(
        {
            "kind": "redis",
            "url": server.unix_url,
            "retries": 0,
            "connect_timeout_seconds": 0.5,
            "socket_timeout_seconds": 2,
        }
    )
    return await open_backend(config, environ={})


@pytest.mark.asyncio
async def test_stop_mid_batch_then_restart(redis_server: RedisServer) -> None:
    rng = random.Random(9)
    store = await _open(redis_server)
    acknowledged: dict[int, bytes] = {}
    failed: dict[int, bytes] = {}
    killed = asyncio.Event()

    async def writer() -> None:
        for n in range(1000):
            batch = sample_pages(rng, BATCH, first=n * BATCH * 4096)
            try:
                await store.put(NS, batch, generation=1)
                await store.sync()
            except TierUnavailable as err:
                assert err.retryable and err.vm_id == NS.vm_id
                assert "redis unavailable" in str(err)
                failed.update(batch)
                return
            acknowledged.update(batch)
            if len(acknowledged) >= 4 * BATCH and not killed.is_set():
                killed.set()
        raise AssertionError("the server was never stopped")

    async def killer() -> None:
        await killed.wait()
        await asyncio.to_thread(redis_server.stop, kill=True)

    await asyncio.wait_for(asyncio.gather(writer(), killer()), 60)
    assert failed, "a put failed while the server was down"

    with pytest.raises(TierUnavailable):
        await store.get(NS, 0)
    with pytest.raises(TierUnavailable):
        await store.put(NS, {0: os.urandom(4096)}, generation=2)

    await asyncio.to_thread(redis_server.start)
    for instance in (store, await _open(redis_server)):
        found = await instance.get_many(NS, list(acknowledged))
        assert {o: p.data for o, p in found.items()} == acknowledged
        # The cut batch was one MSET: all of it or none of it, never a torn page.
        partial = await instance.get_many(NS, list(failed), missing_ok=True)
        assert len(partial) in (0, len(failed))
        assert all(p.data == failed[o] for o, p in partial.items())
        with pytest.raises(PageNotFound):
            await instance.get(NS, (len(acknowledged) + 10 * BATCH) * 4096)
        await instance.close()


@pytest.mark.asyncio
async def test_acknowledged_pages_survive_a_crash(redis_server: RedisServer) -> None:
    store = await _open(redis_server)
    pages = sample_pages(random.Random(3), 64)
    await store.put(NS, pages, generation=4)
    await store.sync()
    await asyncio.to_thread(redis_server.stop, kill=True)
    await asyncio.to_thread(redis_server.start)
    found = await store.get_many(NS, list(pages))
    assert {o: (p.data, p.generation) for o, p in found.items()} == {
        o: (d, 4) for o, d in pages.items()
    }
    await store.close()


@pytest.mark.asyncio
async def test_open_fails_retryably_while_down(redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(TierUnavailable):
        await _open(redis_server)
