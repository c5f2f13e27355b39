"""Sealed records: fill markers, checksums seeded by page identity, AES-GCM with AAD."""

from __future__ import annotations

import os

import pytest

from wsd.storage import IntegrityError, PageNamespace
from wsd.storage.record import (
    HEADER,
    PageCodec,
    PayloadKind,
    RecordFlag,
    SealedRecord,
    fill_byte,
    identity,
    payload_checksum,
)
from wsd.storage.zstd_store import _ThreadCompressor

NS = PageNamespace("vm1", 2)
KEY = bytes(range(32))


def test_fill_byte() -> None:
    assert fill_byte(bytes(4096)) == 0
    assert fill_byte(b"\xff" * 4096) == 0xFF
    assert fill_byte(b"\x00" * 4095 + b"\x01") is None
    assert fill_byte(b"\x01" + b"\x00" * 4095) is None
    middle = bytearray(4096)
    middle[1000] = 7
    assert fill_byte(bytes(middle)) is None


def test_header_is_36_bytes_and_round_trips() -> None:
    assert HEADER.size == 36
    record = PageCodec(backend="t").seal(NS, 0, 9, os.urandom(4096))
    assert SealedRecord.from_bytes(record.to_bytes()) == record


@pytest.mark.parametrize("key", [None, KEY])
def test_fill_pages_are_markers(key: bytes | None) -> None:
    codec = PageCodec(backend="t", key=key)
    record = codec.seal(NS, 4096, 1, b"\x5a" * 4096)
    assert record.kind == PayloadKind.FILL
    assert len(record.payload) == (17 if key else 1)
    assert codec.open(NS, 4096, record).data == b"\x5a" * 4096


def _assert_rejected(codec: PageCodec, record: SealedRecord, reason: str, **where: object) -> None:
    ns = where.get("ns", NS)
    offset = where.get("offset", 0)
    assert isinstance(ns, PageNamespace) and isinstance(offset, int)
    with pytest.raises(IntegrityError, match=reason) as info:
        codec.open(ns, offset, record)
    assert info.value.vm_id == ns.vm_id and info.value.offset == offset


def test_checksum_catches_a_flipped_byte_and_reports_both_values() -> None:
    codec = PageCodec(backend="file")
    record = codec.seal(NS, 0, 1, os.urandom(4096))
    payload = bytearray(record.payload)
    payload[100] ^= 1
    bad = record._replace(payload=bytes(payload))
    with pytest.raises(IntegrityError) as info:
        codec.open(NS, 0, bad)
    err = info.value
    assert err.expected == record.checksum and err.actual not in {None, record.checksum}
    text = str(err)
    assert "tier file" in text and "vm=vm1" in text and "region=2" in text and "offset=0x0" in text
    assert f"{record.checksum:#018x}" in text


def test_checksum_binds_identity_without_encryption() -> None:
    codec = PageCodec(backend="t")
    record = codec.seal(NS, 0, 1, os.urandom(4096))
    _assert_rejected(codec, record, "checksum", offset=4096)
    _assert_rejected(codec, record, "checksum", ns=PageNamespace("vm2", 2))
    _assert_rejected(codec, record, "checksum", ns=PageNamespace("vm1", 3))
    _assert_rejected(codec, record._replace(generation=2), "checksum")


def _forge(record: SealedRecord, ns: PageNamespace, offset: int, **changes: object) -> SealedRecord:
    """What an attacker without the key can do: change fields, fix the checksum."""
    forged = record._replace(**changes)  # type: ignore[arg-type]
    ident = identity(ns, offset, forged.generation, forged.kind, forged.flags)
    return forged._replace(checksum=payload_checksum(forged.payload, ident))


def test_gcm_catches_what_a_recomputed_checksum_hides() -> None:
    codec = PageCodec(backend="redis", key=KEY)
    record = codec.seal(NS, 0, 1, os.urandom(4096))
    flipped = bytearray(record.payload)
    flipped[5] ^= 0x80
    cases = {
        "flipped byte": (_forge(record, NS, 0, payload=bytes(flipped)), NS, 0),
        "moved offset": (_forge(record, NS, 4096), NS, 4096),
        "other vm": (_forge(record, PageNamespace("vm2", 2), 0), PageNamespace("vm2", 2), 0),
        "new generation": (_forge(record, NS, 0, generation=2), NS, 0),
        "fill kind": (_forge(record, NS, 0, kind=PayloadKind.FILL), NS, 0),
    }
    for name, (forged, ns, offset) in cases.items():
        with pytest.raises(IntegrityError, match="AES-GCM authentication failed"):
            codec.open(ns, offset, forged)
        assert name


def test_plaintext_record_refused_when_encryption_is_on() -> None:
    plain = PageCodec(backend="t").seal(NS, 0, 1, os.urandom(4096))
    _assert_rejected(PageCodec(backend="t", key=KEY), plain, "not encrypted")
    secret = PageCodec(backend="t", key=KEY).seal(NS, 0, 1, os.urandom(4096))
    _assert_rejected(PageCodec(backend="t"), secret, "no key is configured")
    _assert_rejected(PageCodec(backend="t", key=bytes(32)), secret, "AES-GCM")


def test_fresh_nonce_per_write() -> None:
    codec = PageCodec(backend="t", key=KEY)
    data = os.urandom(4096)
    nonces = {codec.seal(NS, 0, 1, data).nonce for _ in range(100)}
    assert len(nonces) == 100
    assert codec.seal(NS, 0, 1, data).flags & RecordFlag.ENCRYPTED


def test_expected_generation() -> None:
    codec = PageCodec(backend="t")
    record = codec.seal(NS, 0, 4, os.urandom(4096))
    assert codec.open(NS, 0, record, generation=4).generation == 4
    with pytest.raises(IntegrityError, match="stale") as info:
        codec.open(NS, 0, record, generation=5)
    assert (info.value.expected, info.value.actual) == (5, 4)


def test_malformed_blobs() -> None:
    codec = PageCodec(backend="t")
    with pytest.raises(IntegrityError, match="malformed"):
        codec.parse(NS, 0, b"short")
    blob = bytearray(codec.seal(NS, 0, 1, os.urandom(4096)).to_bytes())
    blob[0] = ord("X")
    with pytest.raises(IntegrityError, match="magic"):
        codec.parse(NS, 0, bytes(blob))
    record = codec.seal(NS, 0, 1, os.urandom(4096))
    _assert_rejected(codec, record._replace(payload=record.payload[:-1]), "checksum")


def test_compress_many_of_no_pages_is_empty() -> None:
    assert _ThreadCompressor(1).compress_many([]) == []


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("key", [None, KEY], ids=["clear", "aes"])
def test_seal_many_is_seal_of_each_page(compressed: bool, key: bytes | None) -> None:
    """Fill pages of any byte, compressible and incompressible data, mixed generations."""
    compressor = _ThreadCompressor(1) if compressed else None
    nonces = iter(range(1000))
    codec = PageCodec(
        backend="t",
        key=key,
        compressor=compressor,
        random_bytes=lambda n: next(nonces).to_bytes(n, "little"),
    )
    pages = {
        0: bytes(4096),
        4096: b"\x7f" * 4096,
        8192: (b"text page " * 410)[:4096],
        12288: os.urandom(4096),
        16384: b"\x00" * 4095 + b"\x01",
    }
    generations = {offset: 3 + k for k, offset in enumerate(pages)}
    many = codec.seal_many(NS, pages, generations)
    nonces = iter(range(1000))  # the same nonces for the record-by-record seal
    assert many == {o: codec.seal(NS, o, generations[o], d) for o, d in pages.items()}
    assert [r.kind for r in many.values()] == [
        PayloadKind.FILL,
        PayloadKind.FILL,
        PayloadKind.ZSTD if compressed else PayloadKind.DATA,
        PayloadKind.DATA,
        PayloadKind.ZSTD if compressed else PayloadKind.DATA,
    ]
