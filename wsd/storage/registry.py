"""The explicit backend registry: ``kind`` → opener. No discovery, no plugins by path."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from wsd.storage.config import (
    EncryptionConfig,
    FileStoreConfig,
    RedisStoreConfig,
    StorageConfig,
    TieredStoreConfig,
    ZstdStoreConfig,
)
from wsd.storage.file_store import FileStore
from wsd.storage.keys import load_aes_key, read_secret
from wsd.storage.page import BackendKind
from wsd.storage.protocol import PageStore
from wsd.storage.tiered_store import TieredStore
from wsd.storage.zstd_store import ZstdStore


@dataclass(frozen=True, slots=True)
class OpenContext:
    """What an opener may use besides its configuration; injected so tests can fake it."""

    clock: Callable[[], float]
    environ: Mapping[str, str]
    name: str


Opener = Callable[[Any, OpenContext], Awaitable[PageStore]]


async def _key(encryption: EncryptionConfig | None, ctx: OpenContext) -> bytes | None:
    if encryption is None:
        return None
    return await asyncio.to_thread(
        load_aes_key, encryption.key, environ=ctx.environ, backend=ctx.name
    )


async def _open_file(config: FileStoreConfig, ctx: OpenContext) -> PageStore:
    key = await _key(config.encryption, ctx)
    return await FileStore.open(config, key=key, clock=ctx.clock, name=ctx.name)


async def _open_zstd(config: ZstdStoreConfig, ctx: OpenContext) -> PageStore:
    return ZstdStore(config, clock=ctx.clock, name=ctx.name)


async def _open_redis(config: RedisStoreConfig, ctx: OpenContext) -> PageStore:
    # redis-py only for a redis tier: 74 of the 618 modules the daemon imported.
    from wsd.storage.redis_store import RedisStore  # noqa: PLC0415

    key = await _key(config.encryption, ctx)
    password = None
    if config.password is not None:
        raw = await asyncio.to_thread(
            read_secret, config.password, environ=ctx.environ, backend=ctx.name
        )
        password = raw.decode("utf-8").strip()
    return await RedisStore.open(config, key=key, password=password, name=ctx.name)


async def _open_tiered(config: TieredStoreConfig, ctx: OpenContext) -> PageStore:
    tiers: list[PageStore] = []
    try:
        for tier in config.tiers:
            name = f"{ctx.name}/{tier.kind.value}"
            tiers.append(await BACKENDS[tier.kind](tier, OpenContext(ctx.clock, ctx.environ, name)))
    except BaseException:
        for opened in reversed(tiers):
            await opened.close()
        raise
    return TieredStore(tiers, config, clock=ctx.clock, name=ctx.name)


BACKENDS: Final[Mapping[BackendKind, Opener]] = MappingProxyType(
    {
        BackendKind.FILE: _open_file,
        BackendKind.ZSTD: _open_zstd,
        BackendKind.REDIS: _open_redis,
        BackendKind.TIERED: _open_tiered,
    }
)


async def open_backend(
    config: StorageConfig,
    *,
    clock: Callable[[], float] = time.time,
    environ: Mapping[str, str] | None = None,
    name: str | None = None,
) -> PageStore:
    """Open the store a ``[storage]`` table describes.

    ``clock`` timestamps puts (for age-based demotion); ``environ`` is where
    ``$CREDENTIALS_DIRECTORY`` is looked up (the process environment by default).
    """
    ctx = OpenContext(clock, os.environ if environ is None else environ, name or config.kind.value)
    return await BACKENDS[config.kind](config, ctx)
