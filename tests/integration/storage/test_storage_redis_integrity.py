"""Flipped, swapped and replayed records on a real redis-server fail loudly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis_server import RedisServer

from wsd.storage import IntegrityError, PageNamespace, PageStore, parse_storage_config
from wsd.storage.record import SealedRecord, identity, payload_checksum
from wsd.storage.redis_transport import page_key
from wsd.storage.registry import open_backend

pytestmark = pytest.mark.integration

NS = PageNamespace("vm-integrity", 0)
P = 4096


async def _open(server: RedisServer, prefix: str, key_file: Path | None) -> PageStore:
    table: dict[str, object] = {"kind": "redis", "url": server.unix_url, "key_prefix": prefix}
    if key_file is not None:
        table["encryption"] = {"key": {"file": str(key_file)}}
    return await open_backend(parse_storage_config(table), environ={})


def _rebind(blob: bytes, offset: int, generation: int | None = None) -> bytes:
    """Recompute the checksum for another place or generation: no key needed."""
    r = SealedRecord.from_bytes(blob)
    gen = r.generation if generation is None else generation
    checksum = payload_checksum(r.payload, identity(NS, offset, gen, r.kind, r.flags))
    return SealedRecord(r.kind, r.flags, gen, checksum, r.nonce, r.payload).to_bytes()


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
async def test_tampering_on_the_server(
    encrypted: bool, shared_redis: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    key_file = None
    if encrypted:
        key_file = tmp_path / "key"
        key_file.write_bytes(os.urandom(32))
        key_file.chmod(0o600)
    store = await _open(shared_redis, key_prefix, key_file)
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    k0, k1 = (page_key(key_prefix, NS, o, 256) for o in (0, P))
    raw = shared_redis.client()
    good0, good1 = raw.get(k0), raw.get(k1)
    assert isinstance(good0, bytes) and isinstance(good1, bytes)

    # A flipped byte in the page payload.
    raw.setrange(k0, 36 + 1000, bytes((good0[36 + 1000] ^ 0x01,)))
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        await store.get(NS, 0)
    assert (info.value.vm_id, info.value.offset, info.value.backend) == (NS.vm_id, 0, "redis")
    if encrypted:
        flipped = raw.get(k0)
        assert isinstance(flipped, bytes)
        raw.set(k0, _rebind(flipped, 0))
        with pytest.raises(IntegrityError, match="AES-GCM"):
            await store.get(NS, 0)

    # Two pages' records swapped (checksums recomputed when encryption is on).
    raw.set(k0, _rebind(good1, 0) if encrypted else good1)
    raw.set(k1, _rebind(good0, P) if encrypted else good0)
    for offset in (0, P):
        with pytest.raises(IntegrityError, match="AES-GCM" if encrypted else "checksum"):
            await store.get(NS, offset)

    # An old generation replayed over a newer one.
    raw.set(k0, good0)
    await store.put(NS, {0: os.urandom(P)}, generation=2)
    raw.set(k0, good0)
    with pytest.raises(IntegrityError, match="stale"):
        await store.get(NS, 0, generation=2)
    if encrypted:
        raw.set(k0, _rebind(good0, 0, generation=2))
        with pytest.raises(IntegrityError, match="AES-GCM"):
            await store.get(NS, 0)
    raw.close()
    await store.close()
