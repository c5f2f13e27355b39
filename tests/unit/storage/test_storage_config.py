"""The [storage] configuration models: discriminated on kind, strict, secrets by reference."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from wsd.storage import (
    FileStoreConfig,
    RedisStoreConfig,
    TieredStoreConfig,
    ZstdStoreConfig,
    parse_storage_config,
)
from wsd.storage.page import BackendKind


def _error(data: Any) -> str:
    with pytest.raises(ValidationError) as info:
        parse_storage_config(data)
    return str(info.value)


def test_each_kind_parses_to_its_model() -> None:
    assert isinstance(
        parse_storage_config({"kind": "file", "root": "/var/lib/wsd"}), FileStoreConfig
    )
    zstd = parse_storage_config({"kind": "zstd", "budget_bytes": "512MiB"})
    assert isinstance(zstd, ZstdStoreConfig)
    assert zstd.budget_bytes == 512 * 1024 * 1024
    redis = parse_storage_config({"kind": "redis", "url": "unix:///run/redis/redis.sock?db=2"})
    assert isinstance(redis, RedisStoreConfig)
    tiered = parse_storage_config(
        {
            "kind": "tiered",
            "tiers": [
                {"kind": "zstd", "budget_bytes": 1 << 30},
                {"kind": "file", "root": "/var/lib/wsd", "max_bytes": "64GiB"},
                {"kind": "redis", "url": "redis://10.0.0.1:6379/0"},
            ],
            "demote_after_seconds": 300,
        }
    )
    assert isinstance(tiered, TieredStoreConfig)
    assert [t.kind for t in tiered.tiers] == [BackendKind.ZSTD, BackendKind.FILE, BackendKind.REDIS]


def test_unknown_kind_and_unknown_keys_are_named() -> None:
    assert "kind" in _error({"kind": "s3"})
    message = _error({"kind": "file", "root": "/x", "rot": "/y"})
    assert "rot" in message and "Extra inputs are not permitted" in message


def test_models_are_frozen() -> None:
    config = FileStoreConfig(root="/var/lib/wsd")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        config.io_threads = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"kind": "file", "root": "relative/dir"}, "absolute"),
        ({"kind": "file", "root": "/x", "io_threads": 0}, "io_threads"),
        ({"kind": "zstd", "budget_bytes": 0}, "budget_bytes"),
        ({"kind": "zstd"}, "budget_bytes"),
        ({"kind": "redis", "url": "http://localhost"}, "scheme"),
        ({"kind": "redis", "url": "redis://user:hunter2@localhost/0"}, "password"),
        ({"kind": "redis", "url": "unix:///s.sock", "cluster": True}, "cluster"),
        ({"kind": "redis", "url": "redis://h:1", "cluster": True, "wait_replicas": 1}, "wait"),
        ({"kind": "redis", "url": "redis://h:1", "key_prefix": "a:b"}, "key_prefix"),
    ],
)
def test_invalid_values_say_what_is_wrong(data: dict[str, Any], needle: str) -> None:
    assert needle in _error(data)


def test_secrets_are_never_inline() -> None:
    base = {"kind": "file", "root": "/x"}
    message = _error({**base, "encryption": {"key": {"key": "00" * 32}}})
    assert "not accepted in the configuration text" in message
    assert "Extra inputs" in _error({**base, "encryption": {"key_hex": "00" * 32}})
    assert "exactly one" in _error({**base, "encryption": {"key": {}}})
    both = {"file": "/etc/wsd/key", "credential": "wsd-key"}
    assert "exactly one" in _error({**base, "encryption": {"key": both}})
    assert "absolute" in _error({**base, "encryption": {"key": {"file": "key"}}})
    assert "credential" in _error({**base, "encryption": {"key": {"credential": "../etc"}}})
    redis = {"kind": "redis", "url": "redis://h:1", "password": {"password": "x"}}
    assert "not accepted" in _error(redis)


def test_tier_order_and_watermarks() -> None:
    redis_first = {
        "kind": "tiered",
        "tiers": [{"kind": "redis", "url": "redis://h:1"}, {"kind": "file", "root": "/x"}],
    }
    assert "redis must be the last tier" in _error(redis_first)
    one = {"kind": "tiered", "tiers": [{"kind": "file", "root": "/x"}]}
    assert "at least 2" in _error(one)
    nested = {"kind": "tiered", "tiers": [{"kind": "tiered", "tiers": []}, {"kind": "file"}]}
    assert "tiers.0" in _error(nested)
    marks = {
        "kind": "tiered",
        "tiers": [{"kind": "zstd", "budget_bytes": 1}, {"kind": "file", "root": "/x"}],
        "low_watermark": 0.95,
        "high_watermark": 0.9,
    }
    assert "low_watermark" in _error(marks)


def test_the_example_in_docs_storage_md_loads() -> None:
    text = (Path(__file__).parents[3] / "docs" / "storage.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_storage_config(tomllib.loads(example)["storage"])
    assert isinstance(config, TieredStoreConfig)
    assert [t.kind for t in config.tiers] == [BackendKind.ZSTD, BackendKind.FILE, BackendKind.REDIS]
    file_tier = config.tiers[1]
    assert isinstance(file_tier, FileStoreConfig) and file_tier.encryption is not None
    assert file_tier.encryption.key.credential == "wsd-storage-key"
