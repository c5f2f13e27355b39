"""Storage tiers for evicted guest pages: one Protocol, several backends, one registry.

Typical use::

    store = await open_backend(parse_storage_config(toml["storage"]))
    await store.put(ns, {offset: page}, generation=g)
    await store.sync()          # only now may the page leave guest memory
    page = await store.get(ns, offset, generation=g)

This package exports the light part: configuration, errors, page types and
the Protocol.  The backends and the registry that opens them (numpy, zstd,
cryptography, redis-py) are imported from their modules, ``wsd.storage.registry``
and ``wsd.storage.<kind>_store``, so that the command line's client commands,
which read the configuration, do not load them.
"""

from wsd.storage.config import (
    STORAGE_CONFIG,
    EncryptionConfig,
    FileStoreConfig,
    RedisStoreConfig,
    SecretSource,
    StorageConfig,
    TieredStoreConfig,
    ZstdStoreConfig,
    parse_storage_config,
)
from wsd.storage.errors import (
    BudgetExceeded,
    EncryptionKeyError,
    IntegrityError,
    InvalidPage,
    PageNotFound,
    StorageError,
    StorageFull,
    StoreClosed,
    TierTimeout,
    TierUnavailable,
)
from wsd.storage.page import (
    BackendKind,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)
from wsd.storage.protocol import DemotionSource, InlineGet, PageStore

__all__ = [
    "STORAGE_CONFIG",
    "BackendKind",
    "BudgetExceeded",
    "DemotionSource",
    "EncryptionConfig",
    "EncryptionKeyError",
    "FileStoreConfig",
    "InlineGet",
    "IntegrityError",
    "InvalidPage",
    "PageNamespace",
    "PageNotFound",
    "PageRef",
    "PageStore",
    "RedisStoreConfig",
    "SecretSource",
    "StorageConfig",
    "StorageError",
    "StorageFull",
    "StoreClosed",
    "StoreStats",
    "StoredPage",
    "TierTimeout",
    "TierUnavailable",
    "TieredStoreConfig",
    "ZstdStoreConfig",
    "parse_storage_config",
]
