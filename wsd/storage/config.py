"""Configuration models of the ``[storage]`` table, one per backend, discriminated on ``kind``.

Secrets (the AES key, a Redis password) are never part of the configuration text:
the configuration names a file or a systemd credential that holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, model_validator

from wsd.storage.page import BackendKind

_CREDENTIAL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretSource(_Frozen):
    """Where a secret is read from: exactly one of a file or a systemd credential.

    ``credential`` names a file in ``$CREDENTIALS_DIRECTORY`` (systemd's
    ``LoadCredential=``/``LoadCredentialEncrypted=``).
    """

    file: Path | None = None
    credential: str | None = Field(default=None, pattern=_CREDENTIAL_NAME)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"key", "value", "secret", "password"} & data.keys():
            raise ValueError(
                "secrets are not accepted in the configuration text: "
                "put the secret in a file and set `file`, or use a systemd `credential`"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        if (self.file is None) == (self.credential is None):
            raise ValueError("set exactly one of `file` or `credential`")
        if self.file is not None and not self.file.is_absolute():
            raise ValueError(f"`file` must be an absolute path, got {str(self.file)!r}")
        return self


class EncryptionConfig(_Frozen):
    """AES-256-GCM for the file and Redis tiers.

    The key is 32 raw bytes, or 64 hexadecimal digits (surrounding whitespace allowed).
    """

    key: SecretSource


class FileStoreConfig(_Frozen):
    """One sparse data file and one index file per VM region, under ``root``."""

    kind: Literal[BackendKind.FILE] = BackendKind.FILE
    root: Path
    encryption: EncryptionConfig | None = None
    io_threads: int = Field(default=4, ge=1, le=64)
    max_bytes: ByteSize | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _absolute_root(self) -> FileStoreConfig:
        if not self.root.is_absolute():
            raise ValueError(f"`root` must be an absolute path, got {str(self.root)!r}")
        return self


class ZstdStoreConfig(_Frozen):
    """Compressed pages in process memory, within ``budget_bytes``. Not durable."""

    kind: Literal[BackendKind.ZSTD] = BackendKind.ZSTD
    budget_bytes: ByteSize = Field(gt=0)
    level: int = Field(default=1, ge=-7, le=22)
    threads: int = Field(default=2, ge=1, le=64)


class RedisStoreConfig(_Frozen):
    """A Redis or Valkey server (or cluster) holding one key per page."""

    kind: Literal[BackendKind.REDIS] = BackendKind.REDIS
    url: str = Field(description="redis://host:port/db, rediss://…, or unix:///path?db=N")
    cluster: bool = False
    username: str | None = None
    password: SecretSource | None = None
    key_prefix: str = Field(default="wsd", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    slot_group_pages: int = Field(default=256, ge=1, le=1 << 20)
    encryption: EncryptionConfig | None = None
    connect_timeout_seconds: float = Field(default=2.0, gt=0)
    socket_timeout_seconds: float = Field(default=5.0, gt=0)
    retries: int = Field(default=1, ge=0, le=10)
    max_command_bytes: ByteSize = Field(default=ByteSize(8 * 1024 * 1024), gt=0)
    wait_replicas: int = Field(default=0, ge=0)
    wait_timeout_ms: int = Field(default=1000, ge=0)

    @model_validator(mode="after")
    def _check(self) -> RedisStoreConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"`url` scheme must be redis, rediss or unix, got {parts.scheme!r}")
        if parts.password is not None:
            raise ValueError("`url` must not contain a password: use `password.file`")
        if self.cluster and parts.scheme == "unix":
            raise ValueError("`cluster = true` needs a redis:// or rediss:// seed node")
        if self.cluster and self.wait_replicas:
            # WAIT applies to one connection of one node; a cluster needs one barrier per
            # primary, which is not implemented (see docs/storage.md).
            raise ValueError("`wait_replicas` is not supported with `cluster = true`")
        return self


LeafStoreConfig = Annotated[
    FileStoreConfig | ZstdStoreConfig | RedisStoreConfig, Field(discriminator="kind")
]
_DEMOTABLE_KINDS = frozenset({BackendKind.FILE, BackendKind.ZSTD})


class TieredStoreConfig(_Frozen):
    """A stack of tiers, fastest first; pages are demoted downwards by age or budget."""

    kind: Literal[BackendKind.TIERED] = BackendKind.TIERED
    tiers: list[LeafStoreConfig] = Field(min_length=2, max_length=4)
    demote_after_seconds: float | None = Field(default=None, gt=0)
    demote_interval_seconds: float = Field(default=10.0, gt=0)
    demote_batch_pages: int = Field(default=256, ge=1, le=65536)
    high_watermark: float = Field(default=0.9, gt=0, le=1)
    low_watermark: float = Field(default=0.7, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> TieredStoreConfig:
        for index, tier in enumerate(self.tiers[:-1]):
            if tier.kind not in _DEMOTABLE_KINDS:
                raise ValueError(
                    f"tiers[{index}] is {tier.kind.value!r}: only file and zstd tiers can "
                    "demote to a lower tier, so redis must be the last tier"
                )
        if self.low_watermark > self.high_watermark:
            raise ValueError("`low_watermark` must not exceed `high_watermark`")
        return self


StorageConfig = Annotated[
    FileStoreConfig | ZstdStoreConfig | RedisStoreConfig | TieredStoreConfig,
    Field(discriminator="kind"),
]
"""The ``[storage]`` table: one backend, chosen by ``kind``."""

STORAGE_CONFIG: TypeAdapter[StorageConfig] = TypeAdapter(StorageConfig)


def parse_storage_config(data: Any) -> StorageConfig:
    """Validate a ``[storage]`` table (a dict, as loaded from TOML)."""
    return STORAGE_CONFIG.validate_python(data)
