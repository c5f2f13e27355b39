"""Storage tiers for evicted guest pages: one Protocol, several backends, one registry.

Typical use::

    store = await open_backend(parse_storage_config(toml["storage"]))
    await store.put(ns, {offset: page}, generation=g)
    await store.sync()          # only now may the page leave guest memory
    page = await store.get(ns, offset, generation=g)

``RedisStore`` is not exported here: redis-py is 74 of the 618 modules the
daemon imported, so only a redis tier loads it (``wsd.storage.redis_store``).
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
from wsd.storage.file_store import FileStore
from wsd.storage.page import (
    BackendKind,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)
from wsd.storage.protocol import DemotionSource, InlineGet, PageStore
from wsd.storage.registry import BACKENDS, OpenContext, open_backend
from wsd.storage.tiered_store import TieredStore
from wsd.storage.zstd_store import ZstdStore

__all__ = [
    "BACKENDS",
    "STORAGE_CONFIG",
    "BackendKind",
    "BudgetExceeded",
    "DemotionSource",
    "EncryptionConfig",
    "EncryptionKeyError",
    "FileStore",
    "FileStoreConfig",
    "InlineGet",
    "IntegrityError",
    "InvalidPage",
    "OpenContext",
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
    "TieredStore",
    "TieredStoreConfig",
    "ZstdStore",
    "ZstdStoreConfig",
    "open_backend",
    "parse_storage_config",
]
