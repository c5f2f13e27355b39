"""Loading secrets (the AES-256 key, a Redis password) from a file or a systemd credential."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from wsd.storage.config import SecretSource
from wsd.storage.errors import EncryptionKeyError

AES_KEY_BYTES: Final = 32
_HEX_DIGITS: Final = frozenset(string.hexdigits)


def secret_path(source: SecretSource, *, environ: Mapping[str, str], backend: str) -> Path:
    """The file a secret source points at; credentials resolve in $CREDENTIALS_DIRECTORY."""
    if source.file is not None:
        return source.file
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise EncryptionKeyError(
            f"credential {source.credential!r} is configured but $CREDENTIALS_DIRECTORY "
            "is not set (run under systemd with LoadCredential=)",
            backend=backend,
        )
    assert source.credential is not None  # the model guarantees one of the two
    return Path(directory) / source.credential


def read_secret(source: SecretSource, *, environ: Mapping[str, str], backend: str) -> bytes:
    """Read a secret, refusing a file that other users can read or write."""
    path = secret_path(source, environ=environ, backend=backend)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        raise EncryptionKeyError(
            f"cannot open secret {str(path)!r}: {err.strerror}", backend=backend
        ) from err
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise EncryptionKeyError(f"secret {str(path)!r} is not a regular file", backend=backend)
        if mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise EncryptionKeyError(
                f"secret {str(path)!r} has mode {stat.S_IMODE(mode):04o}: "
                "it must not be accessible to other users (chmod 0600)",
                backend=backend,
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(4097)
    finally:
        os.close(fd)


def parse_aes_key(raw: bytes, *, origin: str, backend: str) -> bytes:
    """Accept exactly 32 raw bytes, or 64 hex digits with optional surrounding whitespace.

    The two forms cannot be confused: a raw key is exactly 32 bytes, a hex key is at
    least 64.
    """
    if len(raw) == AES_KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * AES_KEY_BYTES and all(chr(c) in _HEX_DIGITS for c in text):
        return bytes.fromhex(text.decode("ascii"))
    raise EncryptionKeyError(
        f"key {origin} holds {len(raw)} bytes: expected exactly {AES_KEY_BYTES} raw bytes "
        f"or {2 * AES_KEY_BYTES} hexadecimal digits (e.g. `openssl rand -hex 32`)",
        backend=backend,
    )


def load_aes_key(source: SecretSource, *, environ: Mapping[str, str], backend: str) -> bytes:
    """Load and validate a 256-bit AES key."""
    path = secret_path(source, environ=environ, backend=backend)
    raw = read_secret(source, environ=environ, backend=backend)
    return parse_aes_key(raw, origin=repr(str(path)), backend=backend)


def key_check_value(key: bytes) -> bytes:
    """A short public fingerprint of a key, stored with the data so that opening it with
    another key fails with a clear error instead of a wall of integrity errors."""
    return hmac.digest(key, b"wsd storage key check v1", hashlib.sha256)[:8]
