"""Per-page work on a batch of pages, in C without the GIL (_batch.c).

xxh3_64 here is the same function as ``xxhash.xxh3_64_intdigest``; every u64 is
native-endian (little endian on every platform wsd runs on), and a buffer of u64s must
be 8-byte aligned, as bytes objects and numpy arrays are.
"""

from collections.abc import Sequence

import numpy as np
from typing_extensions import Buffer

_Bytes = Buffer | np.ndarray

def fills(pages: Sequence[_Bytes], /) -> bytes:
    """Per page an int16: the byte the page is made of, or -1 (data, or empty)."""

def seeds(identities: _Bytes, length: int, /) -> bytes:
    """xxh3_64 of each ``length``-byte identity of ``identities``, as u64s."""

def sums(payloads: Sequence[_Bytes], seeds: _Bytes, /) -> bytes:
    """xxh3_64 of each payload seeded with its u64 of ``seeds``, as u64s."""

def digests128(pages: Sequence[_Bytes], /) -> bytes:
    """``xxhash.xxh3_128_digest`` of each page, 16 bytes each, back to back."""

def page_digests128(buffer: _Bytes, size: int, /) -> bytes:
    """``digests128`` of each ``size``-byte page of ``buffer``."""

def read_pages(
    fd: int, offsets: _Bytes, size: int, seeds: _Bytes | None, zeros_past_end: bool, /
) -> tuple[list[bytes], bytes]:
    """A new ``size``-byte bytes of the file at each u64 offset, read with one
    ``preadv`` per run of up to 32 consecutive pages; and with ``seeds``, the xxh3_64
    of each page with its seed (u64s), else b"".

    Past the end of the file a page reads as zeros with ``zeros_past_end``, else
    the read fails with EIO. Raises OSError (errno and the pages of the failed
    ``preadv``)."""

def gcm_seal(
    key: _Bytes, nonces: Sequence[_Bytes], plains: Sequence[_Bytes], aads: Sequence[_Bytes], /
) -> list[bytes]:
    """AES-256-GCM of each plain with its 12-byte nonce and associated data: the
    ciphertext and its 16-byte tag back to back, exactly as ``AESGCM.encrypt``."""

def gcm_open(
    key: _Bytes, nonces: Sequence[_Bytes], payloads: Sequence[_Bytes], aads: Sequence[_Bytes], /
) -> list[bytes] | None:
    """The plaintext of each payload (ciphertext and tag, as ``gcm_seal`` returns), as
    ``AESGCM.decrypt``; None if any payload fails to authenticate, without saying
    which."""
