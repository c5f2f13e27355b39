"""The Redis tier without a server: key layout, cluster slot grouping, errors, integrity."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from storage_fakes import FakeRedisServer

from wsd.storage import (
    IntegrityError,
    PageNamespace,
    PageNotFound,
    RedisStoreConfig,
    StorageError,
    StorageFull,
    TierUnavailable,
)
from wsd.storage.record import SealedRecord, identity, payload_checksum
from wsd.storage.redis_store import RedisStore
from wsd.storage.redis_transport import ClusterTransport, group_by_slot, page_key, region_pattern

NS = PageNamespace("vm1", 3)
P = 4096
KEY = bytes(range(32))


def _config(**options: Any) -> RedisStoreConfig:
    return RedisStoreConfig(url="redis://127.0.0.1:6379/0", **options)


def test_key_layout_and_hash_tags() -> None:
    assert page_key("wsd", NS, 0x1F000, 256) == b"wsd:{vm1:3:0}:1f000"
    assert page_key("wsd", NS, 256 * P, 256) == b"wsd:{vm1:3:1}:100000"
    same_group = [page_key("wsd", NS, n * P, 256) for n in range(256)]
    assert len({key_slot(k) for k in same_group}) == 1, "one group, one slot: atomic MSET"
    groups = [page_key("wsd", NS, n * 256 * P, 256) for n in range(64)]
    assert len({key_slot(k) for k in groups}) > 32, "a big region spreads over slots"
    other_vm = page_key("wsd", PageNamespace("vm2", 3), 0, 256)
    assert other_vm != page_key("wsd", NS, 0, 256)


def test_region_pattern_matches_only_its_region() -> None:
    pattern = region_pattern("wsd", PageNamespace("vm1", 1)).decode()
    assert fnmatch.fnmatchcase("wsd:{vm1:1:0}:0", pattern)
    for other in ("wsd:{vm1:10:0}:0", "wsd:{vm10:1:0}:0", "wsd:{vm1:11:0}:0", "x:{vm1:1:0}:0"):
        assert not fnmatch.fnmatchcase(other, pattern), other


def test_group_by_slot_keeps_positions() -> None:
    keys = [page_key("wsd", NS, n * P, 2) for n in range(8)]
    groups = group_by_slot(keys)
    assert sorted(p for ps in groups.values() for p in ps) == list(range(8))
    for slot, positions in groups.items():
        assert all(key_slot(keys[p]) == slot for p in positions)


class _FakeClusterPipeline:
    def __init__(self, cluster: _FakeCluster) -> None:
        self._cluster = cluster
        self._stack: list[tuple[str, list[bytes], Any]] = []

    async def __aenter__(self) -> _FakeClusterPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _slot(self, keys: list[bytes]) -> None:
        # What RedisCluster enforces for multi-key commands.
        if len({key_slot(k) for k in keys}) != 1:
            raise rex.RedisClusterException("keys in request don't hash to the same slot")

    def execute_command(self, name: str, *args: bytes) -> None:
        if name == "MSET":
            mapping = dict(zip(args[::2], args[1::2], strict=True))
            self._slot(list(mapping))
            self._stack.append(("mset", list(mapping), mapping))
        else:
            self._slot(list(args))
            self._stack.append((name.lower(), list(args), None))

    async def execute(self) -> list[Any]:
        data = self._cluster.data
        results: list[Any] = []
        for name, keys, mapping in self._stack:
            self._cluster.commands.append((name, len(keys)))
            if name == "mset":
                data.update(mapping)
                results.append(True)
            elif name == "mget":
                results.append([data.get(k) for k in keys])
            else:
                results.append(sum(data.pop(k, None) is not None for k in keys))
        return results


class _FakeCluster:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.commands: list[tuple[str, int]] = []

    def pipeline(self) -> _FakeClusterPipeline:
        return _FakeClusterPipeline(self)

    async def scan_iter(self, match: bytes, count: int) -> AsyncIterator[bytes]:
        for key in list(self.data):
            if fnmatch.fnmatchcase(key.decode(), match.decode()):
                yield key

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


@pytest.mark.asyncio
async def test_cluster_transport_sends_one_command_per_slot() -> None:
    cluster = _FakeCluster()
    transport = ClusterTransport(cast(RedisCluster, cluster))
    store = RedisStore(_config(cluster=True, slot_group_pages=4), transport)
    pages = {n * P: os.urandom(P) for n in range(16)}
    await store.put(NS, pages, generation=1)
    assert cluster.commands == [("mset", 4)] * 4
    found = await store.get_many(NS, list(pages)[::-1])
    assert {o: p.data for o, p in found.items()} == pages
    await store.discard(NS, list(pages)[:6])
    await store.discard(PageNamespace("vm1", 4))  # another region: nothing to drop
    assert len(cluster.data) == 10
    await store.discard(NS)
    assert not cluster.data
    await store.close()


@pytest.mark.asyncio
async def test_large_batches_are_split_into_bounded_commands() -> None:
    server = FakeRedisServer()
    store = RedisStore(_config(max_command_bytes=8 * (P + 64)), server)
    pages = {n * P: os.urandom(P) for n in range(20)}
    await store.put(NS, pages, generation=1)
    assert server.commands == [("mset", 20)]
    assert server.chunk_sizes == [8, 8, 4], "one MULTI/EXEC of bounded MSETs"
    assert len(await store.get_many(NS, list(pages))) == 20
    assert server.chunk_sizes == [8, 8, 4]
    await store.close()


@pytest.mark.asyncio
async def test_server_down_is_retryable_and_acknowledges_nothing() -> None:
    server = FakeRedisServer()
    store = RedisStore(_config(), server)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    server.down = True
    with pytest.raises(TierUnavailable, match="redis unavailable") as info:
        await store.put(NS, {P: os.urandom(P)}, generation=1)
    assert info.value.retryable and info.value.vm_id == "vm1"
    with pytest.raises(TierUnavailable):
        await store.get(NS, 0)
    server.down = False
    with pytest.raises(PageNotFound):
        await store.get(NS, P)
    assert len((await store.get(NS, 0)).data) == P
    await store.close()


class _FailingTransport(FakeRedisServer):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def mset(self, chunks: Any) -> None:
        raise self.error


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "expected", "retryable"),
    [
        (rex.OutOfMemoryError("OOM command not allowed"), StorageFull, False),
        (rex.ResponseError("OOM command not allowed when used memory"), StorageFull, False),
        (rex.BusyLoadingError("LOADING Redis is loading"), TierUnavailable, True),
        (rex.TimeoutError("Timeout reading from socket"), TierUnavailable, True),
        (rex.ReadOnlyError("READONLY You can't write against a replica"), TierUnavailable, True),
        (rex.AuthenticationError("invalid password"), StorageError, False),
        (rex.ResponseError("WRONGTYPE"), StorageError, False),
    ],
)
async def test_errors_are_translated(
    error: Exception, expected: type[StorageError], retryable: bool
) -> None:
    store = RedisStore(_config(), _FailingTransport(error))
    with pytest.raises(expected) as info:
        await store.put(NS, {0: os.urandom(P)}, generation=1)
    assert type(info.value) is expected
    assert info.value.retryable is retryable
    assert info.value.__cause__ is error
    await store.close()


@pytest.mark.asyncio
async def test_sync_waits_for_replicas() -> None:
    server = FakeRedisServer()
    store = RedisStore(_config(wait_replicas=2, wait_timeout_ms=10), server)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    server.replicas = 1
    with pytest.raises(TierUnavailable, match="only 1 of 2 replicas"):
        await store.sync()
    server.replicas = 2
    await store.sync()
    assert server.commands.count(("barrier", 0)) == 2
    await store.close()


def _forge(blob: bytes, ns: PageNamespace, offset: int, **changes: Any) -> bytes:
    record = SealedRecord.from_bytes(blob)
    fields = {
        "kind": record.kind,
        "flags": record.flags,
        "generation": record.generation,
        "nonce": record.nonce,
        "payload": record.payload,
        **changes,
    }
    ident = identity(ns, offset, fields["generation"], fields["kind"], fields["flags"])
    fields["checksum"] = payload_checksum(fields["payload"], ident)
    return SealedRecord(**fields).to_bytes()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_corruption_swap_and_replay(key: bytes | None) -> None:
    server = FakeRedisServer()
    store = RedisStore(_config(), server, key=key)
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    k0, k1 = (page_key("wsd", NS, o, 256) for o in (0, P))
    good0, good1 = server.data[k0], server.data[k1]

    flipped = bytearray(good0)
    flipped[200] ^= 1
    server.data[k0] = bytes(flipped)
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        await store.get(NS, 0)
    assert (info.value.backend, info.value.offset) == ("redis", 0)

    server.data[k0], server.data[k1] = good1, good0
    with pytest.raises(IntegrityError):
        await store.get(NS, 0)
    if key is not None:
        server.data[k0], server.data[k1] = _forge(good1, NS, 0), _forge(good0, NS, P)
        for offset in (0, P):
            with pytest.raises(IntegrityError, match="AES-GCM"):
                await store.get(NS, offset)
        tampered = bytearray(SealedRecord.from_bytes(good0).payload)
        tampered[7] ^= 0x20
        server.data[k0] = _forge(good0, NS, 0, payload=bytes(tampered))
        with pytest.raises(IntegrityError, match="AES-GCM"):
            await store.get(NS, 0)

    server.data[k0] = good0
    await store.put(NS, {0: os.urandom(P)}, generation=2)
    server.data[k0] = good0  # replay generation 1
    with pytest.raises(IntegrityError, match="stale"):
        await store.get(NS, 0, generation=2)
    if key is not None:
        server.data[k0] = _forge(good0, NS, 0, generation=2)
        with pytest.raises(IntegrityError, match="AES-GCM"):
            await store.get(NS, 0)
    await store.close()
