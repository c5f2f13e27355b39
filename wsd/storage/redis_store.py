"""The Redis tier: one key per page on a Redis or Valkey server, or a Redis Cluster.

What "durable" means here is decided by the server, not by this process: a put returns
once the server has applied it, and it survives a server crash only as far as the
server's persistence allows (``appendonly yes`` with ``appendfsync always`` fsyncs
before replying; ``everysec`` may lose the last second). With ``wait_replicas`` set,
``sync`` additionally waits until that many replicas hold every earlier write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Final, NoReturn, TypeVar

import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from wsd.storage.concurrency import Offload
from wsd.storage.config import RedisStoreConfig
from wsd.storage.errors import StorageError, StorageFull, TierUnavailable, Where
from wsd.storage.page import (
    BackendKind,
    ExpectedGenerations,
    PageNamespace,
    StoredPage,
    StoreStats,
)
from wsd.storage.record import HeaderFields, PageCodec
from wsd.storage.redis_transport import (
    ClusterTransport,
    RedisTransport,
    StandaloneTransport,
    page_key,
    region_pattern,
)
from wsd.storage.store_base import StoreBase

INLINE_CODEC_BYTES: Final = 64 * 1024
"""Unencrypted batches up to this size are checksummed on the loop thread: about
0.3 µs per 4 KiB page against 70 to 90 µs for a worker round trip. Encryption (about
5 µs per page) always runs on a worker."""

T = TypeVar("T")

_UNAVAILABLE: Final = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    OSError,
    asyncio.TimeoutError,
)


class RedisStore(StoreBase):
    """The Redis tier. Create with ``await RedisStore.open(config, ...)``, or pass a
    transport directly (tests use an in-memory one)."""

    kind: ClassVar[BackendKind] = BackendKind.REDIS
    # As durable as the server's persistence settings make it (see the module docstring).
    durable: ClassVar[bool] = True

    def __init__(
        self,
        config: RedisStoreConfig,
        transport: RedisTransport,
        *,
        key: bytes | None = None,
        name: str = "redis",
    ) -> None:
        super().__init__(name=name)
        self._config = config
        self._transport = transport
        self._codec = PageCodec(backend=name, key=key)
        self._offload = Offload(backend=name, threads=2)
        # Sealing puts (checksums, AES-GCM) runs below the loop's priority;
        # opening fetched pages, which serve faults, does not.
        self._sealing = Offload(backend=name, threads=2, background=True)

    @classmethod
    async def open(
        cls,
        config: RedisStoreConfig,
        *,
        key: bytes | None = None,
        password: str | None = None,
        name: str = "redis",
    ) -> RedisStore:
        """Connect and check that the server answers (TierUnavailable if it does not)."""
        options: dict[str, Any] = {
            "username": config.username,
            "password": password,
            "socket_timeout": config.socket_timeout_seconds,
            "socket_connect_timeout": config.connect_timeout_seconds,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), config.retries),
        }
        transport: RedisTransport
        if config.cluster:
            transport = ClusterTransport(RedisCluster.from_url(config.url, **options))
        else:
            transport = StandaloneTransport(
                Redis.from_url(config.url, **options),
                barrier_key=f"{config.key_prefix}:barrier".encode(),
            )
        store = cls(config, transport, key=key, name=name)
        try:
            await store._call("connecting", None, transport.ping())
        except BaseException:
            await store.close()
            raise
        return store

    def _key(self, ns: PageNamespace, offset: int) -> bytes:
        return page_key(self._config.key_prefix, ns, offset, self._config.slot_group_pages)

    async def _call(self, what: str, ns: PageNamespace | None, call: Awaitable[T]) -> T:
        """Await a redis-py call, translating its errors at the boundary."""
        try:
            return await call
        except StorageError:
            raise
        except Exception as err:
            self.counters.failures += 1
            self._raise(err, what, ns)

    def _raise(self, err: BaseException, what: str, ns: PageNamespace | None) -> NoReturn:
        where: Where = {"backend": self._name}
        if ns is not None:
            where = {"backend": self._name, "vm_id": ns.vm_id, "region": ns.region}
        text = str(err) or type(err).__name__
        if isinstance(err, rex.AuthenticationError | rex.AuthorizationError):
            raise StorageError(f"{what}: not authorized: {text}", **where) from err
        if isinstance(err, _UNAVAILABLE):
            raise TierUnavailable(f"{what}: redis unavailable: {text}", **where) from err
        if isinstance(err, rex.OutOfMemoryError) or "OOM" in text:
            raise StorageFull(f"{what}: redis is out of memory: {text}", **where) from err
        raise StorageError(f"{what}: {type(err).__name__}: {text}", **where) from err

    def _step(self, ns: PageNamespace) -> int:
        """Pages per command, so no command or reply exceeds ``max_command_bytes``."""
        return max(1, self._config.max_command_bytes // (ns.page_size + 64))

    def _inline(self, ns: PageNamespace, pages: int) -> bool:
        """Whether sealing or opening this many pages runs on the loop thread."""
        return not self._codec.encrypted and pages * ns.page_size <= INLINE_CODEC_BYTES

    async def _store(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> None:
        async with self._guard.hold(ns.key, pages.keys(), blocks_readers=False):
            inline = self._inline(ns, len(pages))
            blobs = await self._sealing.run(self._seal, ns, pages, generations, inline=inline)
            step = self._step(ns)
            items = list(blobs.items())
            chunks = [dict(items[i : i + step]) for i in range(0, len(items), step)]
            await self._call(f"storing {len(pages)} pages", ns, self._transport.mset(chunks))

    def _seal(
        self, ns: PageNamespace, pages: Mapping[int, bytes], gens: Mapping[int, int]
    ) -> dict[bytes, bytes]:
        seal = self._codec.seal
        return {
            self._key(ns, offset): seal(ns, offset, gens[offset], data).to_bytes()
            for offset, data in pages.items()
        }

    async def _fetch(
        self, ns: PageNamespace, offsets: list[int], expected: ExpectedGenerations, missing_ok: bool
    ) -> dict[int, StoredPage]:
        keys = [self._key(ns, offset) for offset in offsets]
        step = self._step(ns)
        chunks = [keys[i : i + step] for i in range(0, len(keys), step)]
        values = await self._call(f"fetching {len(keys)} pages", ns, self._transport.mget(chunks))
        blobs = {o: v for o, v in zip(offsets, values, strict=True) if v is not None}
        self._check_missing(ns, offsets, blobs, missing_ok)
        records = self._records(ns, blobs)  # parsed lazily, by whoever opens them
        inline = self._inline(ns, len(blobs))
        return await self._offload.run(self._codec.open_many, ns, records, expected, inline=inline)

    def _records(
        self, ns: PageNamespace, blobs: Mapping[int, bytes]
    ) -> Iterator[tuple[int, HeaderFields, bytes]]:
        for offset, blob in blobs.items():
            record = self._codec.parse(ns, offset, blob)
            yield offset, record.header_fields, record.payload

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        self._check_open()
        self.counters.discards += 1
        if offsets is None:
            pattern = region_pattern(self._config.key_prefix, ns)
            keys = await self._call("listing region keys", ns, self._transport.scan(pattern))
        else:
            wanted = ns.check_offsets(offsets, backend=self._name)
            keys = [self._key(ns, offset) for offset in wanted]
        if keys:
            await self._call(f"deleting {len(keys)} pages", ns, self._transport.delete(keys))

    async def sync(self) -> None:
        """Puts are applied by the server when they return; with ``wait_replicas`` this
        also waits until that many replicas have every earlier write."""
        self._check_open()
        self.counters.syncs += 1
        wanted = self._config.wait_replicas
        if not wanted:
            return
        timeout = self._config.wait_timeout_ms
        acknowledged = await self._call(
            "waiting for replicas", None, self._transport.barrier(wanted, timeout)
        )
        if acknowledged < wanted:
            raise TierUnavailable(
                f"only {acknowledged} of {wanted} replicas acknowledged within {timeout} ms",
                backend=self._name,
            )

    async def stats(self) -> StoreStats:
        # Page counts would need a SCAN of a server that others may share; not cheap.
        return StoreStats(
            backend=self._name,
            pages=None,
            stored_bytes=None,
            logical_bytes=None,
            budget_bytes=None,
            counters=StoreStats.snapshot(self.counters),
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._sealing.close()
        await self._offload.close()
        await self._transport.close()
