"""Loading the AES key from a file or a systemd credential, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from storage_fakes import write_key

from wsd.storage import EncryptionKeyError, SecretSource
from wsd.storage.keys import key_check_value, load_aes_key


def test_raw_key_file(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k")
    assert load_aes_key(SecretSource(file=tmp_path / "k"), environ={}, backend="file") == key


def test_hex_key_with_newline(tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / "k").write_text(key.hex() + "\n")
    (tmp_path / "k").chmod(0o400)
    assert load_aes_key(SecretSource(file=tmp_path / "k"), environ={}, backend="file") == key


def test_raw_key_ending_in_newline_byte_is_not_stripped(tmp_path: Path) -> None:
    key = os.urandom(31) + b"\n"
    write_key(tmp_path / "k", key)
    assert load_aes_key(SecretSource(file=tmp_path / "k"), environ={}, backend="file") == key


def test_systemd_credential(tmp_path: Path) -> None:
    key = write_key(tmp_path / "wsd-storage-key")
    source = SecretSource(credential="wsd-storage-key")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert load_aes_key(source, environ=environ, backend="redis") == key


def test_credential_without_systemd(tmp_path: Path) -> None:
    with pytest.raises(EncryptionKeyError, match="CREDENTIALS_DIRECTORY"):
        load_aes_key(SecretSource(credential="wsd-key"), environ={}, backend="redis")


@pytest.mark.parametrize(
    "content",
    [os.urandom(16), os.urandom(33), b"00" * 31 + b"\n", b"zz" * 32, b"", os.urandom(64)],
)
def test_bad_key_lengths(tmp_path: Path, content: bytes) -> None:
    write_key(tmp_path / "k", content)
    with pytest.raises(EncryptionKeyError, match="expected exactly 32 raw bytes or 64 hex") as info:
        load_aes_key(SecretSource(file=tmp_path / "k"), environ={}, backend="file")
    assert "backend=file" in str(info.value)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    write_key(tmp_path / "k", mode=0o644)
    with pytest.raises(EncryptionKeyError, match="0644"):
        load_aes_key(SecretSource(file=tmp_path / "k"), environ={}, backend="file")


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(EncryptionKeyError, match="cannot open secret"):
        load_aes_key(SecretSource(file=tmp_path / "absent"), environ={}, backend="file")


def test_key_check_value_tells_keys_apart() -> None:
    a, b = os.urandom(32), os.urandom(32)
    assert key_check_value(a) == key_check_value(a) != key_check_value(b)
    assert len(key_check_value(a)) == 8
