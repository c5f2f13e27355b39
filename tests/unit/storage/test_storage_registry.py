"""The explicit registry and open_backend, with injected environment and clock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from storage_fakes import FakeClock, write_key

from wsd.storage import (
    BackendKind,
    EncryptionKeyError,
    PageNamespace,
    TierUnavailable,
    parse_storage_config,
)
from wsd.storage.concurrency import OffsetGuard
from wsd.storage.file_store import FileStore
from wsd.storage.registry import BACKENDS, open_backend
from wsd.storage.tiered_store import TieredStore
from wsd.storage.zstd_store import ZstdStore

NS = PageNamespace("vm1", 0)


def test_every_kind_is_registered() -> None:
    assert set(BACKENDS) == set(BackendKind)


@pytest.mark.asyncio
async def test_file_with_a_systemd_credential(tmp_path: Path) -> None:
    write_key(tmp_path / "wsd-key")
    config = parse_storage_config(
        {
            "kind": "file",
            "root": str(tmp_path / "pages"),
            "encryption": {"key": {"credential": "wsd-key"}},
        }
    )
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    store = await open_backend(config, environ=environ)
    assert isinstance(store, FileStore) and store.kind is BackendKind.FILE
    page = os.urandom(4096)
    await store.put(NS, {0: page}, generation=1)
    assert (await store.get(NS, 0)).data == page
    await store.close()
    with pytest.raises(EncryptionKeyError, match="CREDENTIALS_DIRECTORY"):
        await open_backend(config, environ={})


@pytest.mark.asyncio
async def test_tiered_names_its_tiers_and_shares_the_clock(tmp_path: Path) -> None:
    clock = FakeClock(500.0)
    config = parse_storage_config(
        {
            "kind": "tiered",
            "tiers": [
                {"kind": "zstd", "budget_bytes": "1MiB"},
                {"kind": "file", "root": str(tmp_path)},
            ],
        }
    )
    store = await open_backend(config, clock=clock, environ={})
    assert isinstance(store, TieredStore)
    assert [t.name for t in store.tiers] == ["tiered/zstd", "tiered/file"]
    assert isinstance(store.tiers[0], ZstdStore)
    await store.put(NS, {0: os.urandom(4096)}, generation=1)
    refs = await store.tiers[0].coldest(1)  # type: ignore[attr-defined]
    assert refs[0].stored_at == 500.0
    await store.close()


@pytest.mark.asyncio
async def test_unreachable_redis_is_a_retryable_open_error(tmp_path: Path) -> None:
    config = parse_storage_config(
        {
            "kind": "redis",
            "url": f"unix://{tmp_path}/absent.sock",
            "retries": 0,
            "connect_timeout_seconds": 0.5,
        }
    )
    with pytest.raises(TierUnavailable) as info:
        await open_backend(config, environ={})
    assert info.value.retryable and "backend=redis" in str(info.value)


@pytest.mark.asyncio
async def test_guard_orders_writers_and_blocks_readers_only_when_asked() -> None:
    guard = OffsetGuard()
    events: list[str] = []

    async def writer(name: str, blocks: bool, hold: float) -> None:
        async with guard.hold("ns", [1, 2], blocks_readers=blocks):
            events.append(f"{name}+")
            await asyncio.sleep(hold)
            events.append(f"{name}-")

    async def reader() -> None:
        await guard.wait_readable("ns", [2])
        events.append("read")

    first = asyncio.create_task(writer("a", False, 0.02))
    await asyncio.sleep(0)
    await reader()  # a holder that does not block readers
    second = asyncio.create_task(writer("b", True, 0.3))  # waits for a
    await asyncio.sleep(0.1)
    await reader()  # b holds and blocks readers
    await asyncio.gather(first, second)
    assert events == ["a+", "read", "a-", "b+", "b-", "read"]
    free, holding = guard.try_hold("ns", [1, 3])
    with holding:
        assert guard.held("ns", 1) and guard.held("ns", 3) and free == [1, 3]
        assert guard.try_hold("ns", [3, 4])[0] == [4]
    assert not guard.held("ns", 1)
