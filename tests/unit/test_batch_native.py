"""wsd._batch (C) against the Python it stands in for: xxhash, fill_byte, pread, AESGCM."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd import _batch
from wsd.storage.record import fill_byte

PAGE = 4096

page_like = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.integers(0, 255).map(lambda b: bytes((b,)) * PAGE),
    st.tuples(st.integers(0, 255), st.integers(0, PAGE - 1), st.integers(0, 255)).map(
        lambda t: bytes((t[0],)) * t[1] + bytes((t[2],)) + bytes((t[0],)) * (PAGE - 1 - t[1])
    ),
    st.binary(min_size=PAGE, max_size=PAGE),
)


def u64s(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype=np.uint64).tolist()


@settings(max_examples=200)
@given(st.lists(page_like, max_size=12))
def test_fills_are_fill_byte(pages: list[bytes]) -> None:
    got = np.frombuffer(_batch.fills(pages), dtype=np.int16).tolist()
    assert got == [-1 if (b := fill_byte(p)) is None else b for p in pages]


def test_an_empty_page_is_not_a_fill() -> None:
    assert np.frombuffer(_batch.fills([b""]), dtype=np.int16).tolist() == [-1]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.binary(max_size=PAGE + 20), st.integers(0, 2**64 - 1)), max_size=8))
def test_sums_are_xxh3_with_each_seed(items: list[tuple[bytes, int]]) -> None:
    payloads = [p for p, _ in items]
    seeds = np.array([s for _, s in items], dtype=np.uint64)
    want = [xxhash.xxh3_64_intdigest(p, seed=s) for p, s in items]
    assert u64s(_batch.sums(payloads, seeds)) == want
    # memoryviews (an encrypted page's slice of its payload) are read the same way
    assert u64s(_batch.sums(list(map(memoryview, payloads)), seeds)) == want


@given(st.integers(1, 70), st.integers(0, 5))
def test_seeds_are_xxh3_of_each_identity(length: int, count: int) -> None:
    table = os.urandom(length * count)
    want = [xxhash.xxh3_64_intdigest(table[i * length : (i + 1) * length]) for i in range(count)]
    assert u64s(_batch.seeds(table, length)) == want


@given(st.lists(page_like, max_size=8))
def test_digests128_are_xxh3_128_digest(pages: list[bytes]) -> None:
    raw = _batch.digests128(pages)
    assert [raw[i * 16 : (i + 1) * 16] for i in range(len(pages))] == [
        xxhash.xxh3_128_digest(p) for p in pages
    ]


@given(st.integers(0, 6), st.sampled_from([1, 7, 4096]))
def test_page_digests128_digest_each_page_of_a_buffer(count: int, size: int) -> None:
    buffer = os.urandom(count * size)
    raw = _batch.page_digests128(memoryview(buffer), size)
    assert raw == b"".join(
        xxhash.xxh3_128_digest(buffer[i * size : (i + 1) * size]) for i in range(count)
    )


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="10 bytes is not a whole number of 4-byte pages"):
        _batch.page_digests128(b"x" * 10, 4)
    with pytest.raises(ValueError, match="not a whole number of 7-byte identities"):
        _batch.seeds(b"x" * 10, 7)
    with pytest.raises(ValueError, match="2 payloads but 8 bytes of seeds"):
        _batch.sums([b"a", b"b"], b"\0" * 8)
    with pytest.raises(TypeError, match=r"pages\[1\] is not a bytes-like object"):
        _batch.fills([b"a", 3])  # type: ignore[list-item]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    """A read-only file of 80 random pages, the last one cut short by 100 bytes."""
    content = os.urandom(80 * PAGE - 100)
    path = tmp_path_factory.mktemp("batch") / "data"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield fd, content
    os.close(fd)


def expected_page(content: bytes, offset: int) -> bytes:
    return content[offset : offset + PAGE].ljust(PAGE, b"\0")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 90), max_size=70), st.booleans())
def test_read_pages_is_pread_of_each_page(
    data_file: tuple[int, bytes], indexes: list[int], hashed: bool
) -> None:
    """Runs longer than one preadv, gaps, repeats, descending pages, the short last
    page and pages past the end of the file (zeros) all read as os.pread would."""
    fd, content = data_file
    offsets = np.array(indexes, dtype=np.uint64) * np.uint64(PAGE)
    seeds = np.arange(len(indexes), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    pages, sums = _batch.read_pages(fd, offsets, PAGE, seeds if hashed else None, True)
    want = [expected_page(content, o) for o in offsets.tolist()]
    assert pages == want
    if hashed:
        assert u64s(sums) == [
            xxhash.xxh3_64_intdigest(p, seed=s) for p, s in zip(want, seeds.tolist(), strict=True)
        ]
    else:
        assert sums == b""


def test_read_pages_gives_new_pages_each_time(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    offsets = np.array([0, PAGE], dtype=np.uint64)
    first, _ = _batch.read_pages(fd, offsets, PAGE, None, True)
    second, _ = _batch.read_pages(fd, offsets, PAGE, None, True)
    assert first == second
    assert all(a is not b for a, b in zip(first, second, strict=True))


def test_reading_past_the_end_fails_unless_zeros_are_wanted(
    data_file: tuple[int, bytes],
) -> None:
    fd, content = data_file
    offsets = np.array([78 * PAGE, 79 * PAGE], dtype=np.uint64)  # the last is cut short
    pages, _ = _batch.read_pages(fd, offsets, PAGE, None, True)
    assert pages[1] == expected_page(content, 79 * PAGE)
    with pytest.raises(OSError, match=r"preadv of 2 pages at 0x4e000: end of file after 8092 "):
        _batch.read_pages(fd, offsets, PAGE, None, False)


def test_a_failed_read_names_errno_and_pages(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        offsets = np.array([3 * PAGE, 4 * PAGE], dtype=np.uint64)
        with pytest.raises(IsADirectoryError) as info:
            _batch.read_pages(fd, offsets, PAGE, None, True)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EISDIR
    assert "preadv of 2 pages at 0x3000" in str(info.value)


records = st.lists(
    st.tuples(
        st.binary(min_size=12, max_size=12),
        st.one_of(page_like, st.just(b"")),
        st.binary(max_size=70),
    ),
    max_size=8,
)


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=32), records)
def test_gcm_seal_and_open_are_aesgcm(key: bytes, items: list[tuple[bytes, bytes, bytes]]) -> None:
    nonces, plains, aads = ([r[i] for r in items] for i in range(3))
    reference = AESGCM(key)
    sealed = _batch.gcm_seal(key, nonces, plains, aads)
    assert sealed == list(map(reference.encrypt, nonces, plains, aads))
    assert _batch.gcm_open(key, nonces, sealed, aads) == plains


def flipped(value: bytes, bit: int) -> bytes:
    """``value`` with one bit changed; an empty value gains a byte instead."""
    if not value:
        return b"\0"
    at = bit % len(value)
    return value[:at] + bytes((value[at] ^ 1 << bit % 8,)) + value[at + 1 :]


@settings(max_examples=100)
@given(
    st.binary(min_size=32, max_size=32),
    records.filter(bool),
    st.integers(0, 7),
    st.sampled_from(["nonce", "payload", "aad", "key"]),
    st.integers(0, 2**16),
)
def test_gcm_open_refuses_a_batch_with_any_record_changed(
    key: bytes, items: list[tuple[bytes, bytes, bytes]], row: int, field: str, bit: int
) -> None:
    nonces, plains, aads = ([r[i] for r in items] for i in range(3))
    sealed = _batch.gcm_seal(key, nonces, plains, aads)
    row %= len(items)
    if field == "key":
        key = flipped(key, bit)
    else:
        changed = {"nonce": nonces, "payload": sealed, "aad": aads}[field]
        changed[row] = flipped(changed[row], bit)
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonces[row], sealed[row], aads[row])
    assert _batch.gcm_open(key, nonces, sealed, aads) is None


def test_gcm_open_refuses_a_payload_too_short_for_its_tag() -> None:
    key, nonce = bytes(32), bytes(12)
    good = _batch.gcm_seal(key, [nonce], [b"page"], [b""])
    assert _batch.gcm_open(key, [nonce, nonce], [good[0], good[0][:15]], [b"", b""]) is None


def test_gcm_bad_arguments_are_named() -> None:
    nonce = bytes(12)
    with pytest.raises(ValueError, match="an AES-256 key is 32 bytes, not 16"):
        _batch.gcm_seal(bytes(16), [nonce], [b"p"], [b""])
    with pytest.raises(ValueError, match=r"nonces\[1\] is 8 bytes, not 12"):
        _batch.gcm_seal(bytes(32), [nonce, bytes(8)], [b"p", b"q"], [b"", b""])
    with pytest.raises(ValueError, match="1 nonces, 2 payloads and 2 aads"):
        _batch.gcm_open(bytes(32), [nonce], [bytes(20), bytes(20)], [b"", b""])
    with pytest.raises(TypeError, match=r"plains\[0\] is not a bytes-like object"):
        _batch.gcm_seal(bytes(32), [nonce], [7], [b""])
