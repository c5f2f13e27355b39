"""The stored form of a page: header, checksum, optional AES-256-GCM, fill markers.

Every backend stores a ``SealedRecord``: a 36-byte header followed by a payload.

    offset size field
    0      2    magic b"WP"
    2      1    format version (1)
    3      1    payload kind: 1 data, 2 fill (one repeated byte), 3 zstd frame
    4      1    flags: bit 0 encrypted
    5      3    zero
    8      8    generation, little endian
    16     8    checksum: xxh3_64 of the payload, seeded with xxh3_64(identity)
    24     12   AES-GCM nonce (zero when not encrypted)

The *identity* is ``b"wsd1" | region u64 | offset u64 | page_size u32 | generation u64 |
kind u8 | flags u8 | vm_id`` (little endian, vm_id last because it is the only
variable-length part). It seeds the checksum, so a record copied to another offset,
region or VM fails the checksum even without encryption; and it is the GCM associated
data, so with encryption such a copy fails authentication even if the attacker also
recomputes the checksum.
"""

from __future__ import annotations

import enum
import functools
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from typing import Final, NamedTuple, Protocol

import numpy as np
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wsd import _batch
from wsd.storage.errors import IntegrityError
from wsd.storage.page import PageNamespace, StoredPage


class PayloadKind(enum.IntEnum):
    """What the payload of a record holds."""

    DATA = 1
    FILL = 2
    ZSTD = 3


class RecordFlag(enum.IntFlag):
    """Header flags; every flag is covered by the checksum seed and the GCM AAD."""

    NONE = 0
    ENCRYPTED = 1


HEADER: Final = struct.Struct("<2sBBB3xQQ12s")
MAGIC: Final = b"WP"
VERSION: Final = 1
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_NO_NONCE: Final = bytes(NONCE_BYTES)
_IDENTITY: Final = struct.Struct("<4sQQIQBB")
_KINDS: Final = frozenset(int(k) for k in PayloadKind)
_ENCRYPTED: Final = int(RecordFlag.ENCRYPTED)
_DATA: Final = int(PayloadKind.DATA)
_FILL: Final = int(PayloadKind.FILL)
_ZSTD: Final = int(PayloadKind.ZSTD)


HeaderFields = tuple[int, int, int, int, bytes]
"""(kind, flags, generation, checksum, nonce), as unpacked from a header."""


class SealedRecord(NamedTuple):
    """One page as stored: header fields plus payload.

    ``kind`` and ``flags`` hold PayloadKind and RecordFlag values as plain ints, and
    the record is a NamedTuple, not a frozen dataclass: one is built per page, and
    both enums and frozen dataclasses cost more to build than the checksum does. The
    first five fields are the ``HeaderFields`` that ``PageCodec.open_fields`` takes.
    """

    kind: int
    flags: int
    generation: int
    checksum: int
    nonce: bytes
    payload: bytes

    @property
    def header_fields(self) -> HeaderFields:
        """(kind, flags, generation, checksum, nonce)."""
        return (self.kind, self.flags, self.generation, self.checksum, self.nonce)

    def header(self) -> bytes:
        """The 36-byte header."""
        return HEADER.pack(
            MAGIC, VERSION, self.kind, self.flags, self.generation, self.checksum, self.nonce
        )

    def to_bytes(self) -> bytes:
        """Header and payload, as one blob (the Redis value)."""
        return self.header() + self.payload

    @staticmethod
    def from_parts(header: bytes | memoryview, payload: bytes) -> SealedRecord:
        """Parse a header; raises ValueError when it is not a valid header."""
        magic, version, kind, flags, generation, checksum, nonce = HEADER.unpack(header)
        check_header(magic, version, kind, flags)
        return SealedRecord(kind, flags, generation, checksum, nonce, payload)

    @staticmethod
    def from_bytes(blob: bytes) -> SealedRecord:
        """Parse a blob made by ``to_bytes``; raises ValueError when malformed."""
        if len(blob) < HEADER.size:
            raise ValueError(f"record is {len(blob)} bytes, shorter than its header")
        return SealedRecord.from_parts(blob[: HEADER.size], blob[HEADER.size :])


def check_header(magic: bytes, version: int, kind: int, flags: int) -> None:
    """Raise ValueError unless the fixed header fields are ones this code wrote."""
    if magic != MAGIC:
        raise ValueError(f"bad record magic {bytes(magic)!r}")
    if version != VERSION:
        raise ValueError(f"unknown record version {version}")
    if kind not in _KINDS:
        raise ValueError(f"unknown payload kind {kind}")
    if flags & ~_ENCRYPTED:
        raise ValueError(f"unknown record flags {flags:#x}")


def identity(ns: PageNamespace, offset: int, generation: int, kind: int, flags: int) -> bytes:
    """What a record is bound to (see the module docstring)."""
    fixed = _IDENTITY.pack(b"wsd1", ns.region, offset, ns.page_size, generation, kind, flags)
    return fixed + ns.vm_id.encode("ascii")


@functools.lru_cache(maxsize=16)
def _identity_dtype(vm_bytes: int) -> np.dtype[np.void]:
    names = ["tag", "region", "offset", "page_size", "generation", "kind", "flags", "vm"]
    formats = ["S4", "<u8", "<u8", "<u4", "<u8", "u1", "u1", f"S{vm_bytes}"]
    offsets = [0, 4, 12, 20, 24, 32, 33, 34]
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": 34 + vm_bytes}
    )


def identity_table(
    ns: PageNamespace,
    offsets: np.ndarray,
    generations: np.ndarray,
    kinds: np.ndarray,
    flags: int,
) -> tuple[bytes, int]:
    """``identity()`` of many records of one namespace, built at once.

    Returns the identities back to back and the length of each, which is the same
    for every record of a namespace. The batched paths of the file tier slice and
    hash these instead of packing one identity per page.
    """
    vm = ns.vm_id.encode("ascii")
    dtype = _identity_dtype(len(vm))
    # Every record of the batch shares all but three fields: repeat one, fill those in.
    template = identity(ns, 0, 0, 0, flags)
    table = np.frombuffer(bytearray(template * len(offsets)), dtype=dtype)
    table["offset"] = offsets
    table["generation"] = generations
    table["kind"] = kinds
    return table.tobytes(), dtype.itemsize


def payload_checksum(payload: bytes, ident: bytes) -> int:
    """xxh3_64 of the payload, seeded by the identity."""
    return xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(ident))


@functools.lru_cache(maxsize=4)
def _zero_page(size: int) -> bytes:
    return bytes(size)


def fill_byte(data: bytes) -> int | None:
    """The byte a page consists of, if it is one byte repeated; else None.

    Zero pages, by far the most common fill, cost one memcmp against a cached zero
    page. Other fills compare the page with itself shifted by one; the three probes
    before that reject almost every other page without touching the whole page.
    """
    first = data[0]
    if data[-1] != first or data[len(data) >> 1] != first:
        return None
    if not first:
        return 0 if data == _zero_page(len(data)) else None
    return first if data[1:] == data[:-1] else None


_FILL_BYTES: Final = tuple(bytes((b,)) for b in range(256))


def fill_page(byte: int, size: int) -> bytes:
    """A page of ``byte`` repeated; zero pages, the common case, share one cached object
    per size (bytes are immutable)."""
    return _zero_page(size) if not byte else _FILL_BYTES[byte] * size


class Compressor(Protocol):
    """Page compression used by a codec (the zstd tier)."""

    def compress(self, data: bytes) -> bytes:
        """Compress one page."""
        ...

    def compress_many(self, datas: list[bytes]) -> list[bytes]:
        """``compress`` of each page, in order, frame for frame the same."""
        ...

    def decompress(self, payload: bytes, size: int) -> bytes:
        """Decompress to at most ``size`` bytes; raise ValueError when corrupt."""
        ...


class PageCodec:
    """Turns pages into sealed records and back, verifying everything on the way back.

    Thread-safe: the tiers call it from their worker threads.
    """

    def __init__(
        self,
        *,
        backend: str,
        key: bytes | None = None,
        compressor: Compressor | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._backend = backend
        self._aead = AESGCM(key) if key is not None else None
        self._compressor = compressor
        self._random_bytes = random_bytes

    @property
    def encrypted(self) -> bool:
        """Whether records are sealed with AES-256-GCM."""
        return self._aead is not None

    def seal(self, ns: PageNamespace, offset: int, generation: int, data: bytes) -> SealedRecord:
        """Encode one page (already validated to be ``ns.page_size`` long)."""
        # Plain ints, not the enum members: a record of ints and bytes only is
        # one the garbage collector can stop tracking (wsd/collector.py).
        fill = fill_byte(data)
        if fill is not None:
            kind, plain = _FILL, _FILL_BYTES[fill]
        elif self._compressor is not None:
            packed = self._compressor.compress(data)
            # Incompressible pages stay raw, like zswap: no expansion, no decompression.
            if len(packed) < len(data):
                kind, plain = _ZSTD, packed
            else:
                kind, plain = _DATA, data
        else:
            kind, plain = _DATA, data
        if self._aead is None:
            flags, nonce, payload = 0, _NO_NONCE, plain
            ident = identity(ns, offset, generation, kind, flags)
        else:
            flags, nonce = _ENCRYPTED, self._random_bytes(NONCE_BYTES)
            ident = identity(ns, offset, generation, kind, flags)
            payload = self._aead.encrypt(nonce, plain, ident)
        return SealedRecord(
            kind, flags, generation, payload_checksum(payload, ident), nonce, payload
        )

    def seal_many(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> dict[int, SealedRecord]:
        """``seal`` of every page, record for record the same.

        Without encryption, finding fill pages and both hashes of every record
        run as one call each over the batch (``wsd._batch``, without the GIL),
        and the compressor gets the whole batch at once: a worker sealing a
        batch then holds the GIL for little more than building the records, and
        the event loop thread, which serves faults, rarely waits for it.
        """
        if self._aead is not None:  # AES-GCM dominates; one record at a time
            return {o: self.seal(ns, o, generations[o], d) for o, d in pages.items()}
        offsets = list(pages)
        datas = list(pages.values())
        fills = np.frombuffer(_batch.fills(datas), dtype=np.int16)
        kinds = np.where(fills < 0, _DATA, _FILL).astype(np.uint8)
        payloads = [
            _FILL_BYTES[f] if f >= 0 else d for d, f in zip(datas, fills.tolist(), strict=True)
        ]
        data_rows = np.flatnonzero(fills < 0).tolist()
        if self._compressor is not None and data_rows:
            plain = [datas[row] for row in data_rows]
            for row, data, packed in zip(
                data_rows, plain, self._compressor.compress_many(plain), strict=True
            ):
                # Incompressible pages stay raw, like zswap (see seal).
                if len(packed) < len(data):
                    payloads[row] = packed
                    kinds[row] = _ZSTD
        gens = [generations[o] for o in offsets]
        table, length = identity_table(
            ns, np.array(offsets, dtype=np.uint64), np.array(gens, dtype=np.uint64), kinds, 0
        )
        sums = np.frombuffer(_batch.sums(payloads, _batch.seeds(table, length)), np.uint64)
        records = map(
            SealedRecord,
            kinds.tolist(),
            repeat(0),
            gens,
            sums.tolist(),
            repeat(_NO_NONCE),
            payloads,
        )
        return dict(zip(offsets, records, strict=True))

    def parse(self, ns: PageNamespace, offset: int, blob: bytes) -> SealedRecord:
        """Parse a stored blob, turning a malformed header into an IntegrityError."""
        try:
            return SealedRecord.from_bytes(blob)
        except ValueError as err:
            raise self._error(ns, offset, f"malformed record: {err}") from err

    def open(
        self,
        ns: PageNamespace,
        offset: int,
        record: SealedRecord,
        *,
        generation: int | None = None,
    ) -> StoredPage:
        """Verify and decode a record. Raises IntegrityError; never returns bad bytes."""
        return self.open_fields(
            ns, offset, record.header_fields, record.payload, generation=generation
        )

    def open_many(
        self,
        ns: PageNamespace,
        records: Iterable[tuple[int, HeaderFields, bytes]],
        generations: Mapping[int, int] | None,
    ) -> dict[int, StoredPage]:
        """``open_fields`` over (offset, header, payload) triples.

        The common case (a plaintext data page that verifies) is decided inline here,
        which halves the per-page cost of a batched get; anything else, including any
        failure, goes through ``open_fields``, which alone decides and reports errors.
        """
        found: dict[int, StoredPage] = {}
        size, region, vm = ns.page_size, ns.region, ns.vm_id.encode("ascii")
        pack, digest = _IDENTITY.pack, xxhash.xxh3_64_intdigest
        inline = self._aead is None and generations is None
        data_kind, fill_kind, no_nonce = _DATA, _FILL, _NO_NONCE
        for offset, header, payload in records:
            kind, flags, generation, checksum, nonce = header
            if inline and not flags and nonce == no_nonce:
                ident = pack(b"wsd1", region, offset, size, generation, kind, 0) + vm
                if digest(payload, digest(ident)) == checksum:
                    if kind == data_kind and len(payload) == size:
                        found[offset] = StoredPage(payload, generation)
                        continue
                    if kind == fill_kind and len(payload) == 1:
                        found[offset] = StoredPage(payload * size, generation)
                        continue
            expected = None if generations is None else generations.get(offset)
            found[offset] = self.open_fields(ns, offset, header, payload, generation=expected)
        return found

    def open_fields(
        self,
        ns: PageNamespace,
        offset: int,
        header: HeaderFields,
        payload: bytes,
        *,
        generation: int | None = None,
    ) -> StoredPage:
        """``open`` on header fields already unpacked (and checked by check_header)."""
        kind, flags, stored_generation, checksum, nonce = header
        aead = self._aead
        if aead is None:
            if flags or nonce != _NO_NONCE:
                raise self._error(ns, offset, "record is encrypted but no key is configured")
        elif not flags & _ENCRYPTED:
            # Accepting plaintext here would let anyone who can write the tier
            # substitute pages without the key.
            raise self._error(ns, offset, "record is not encrypted but encryption is configured")
        # identity() and payload_checksum() inlined: this runs once per page fetched.
        ident = _IDENTITY.pack(
            b"wsd1", ns.region, offset, ns.page_size, stored_generation, kind, flags
        ) + ns.vm_id.encode("ascii")
        actual = xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(ident))
        if actual != checksum:
            raise self._error(ns, offset, "checksum mismatch", expected=checksum, actual=actual)
        plain = payload
        if aead is not None:
            try:
                plain = aead.decrypt(nonce, payload, ident)
            except InvalidTag as err:
                raise self._error(
                    ns,
                    offset,
                    "AES-GCM authentication failed (wrong key, or the record was altered, "
                    "moved from another page or VM, or given another generation)",
                ) from err
        if kind == PayloadKind.DATA and len(plain) == ns.page_size:
            data = plain
        else:
            data = self._expand(ns, offset, kind, plain)
        if generation is not None and stored_generation != generation:
            raise self._error(
                ns,
                offset,
                "stale or unexpected generation",
                expected=generation,
                actual=stored_generation,
            )
        return StoredPage(data, stored_generation)

    def _expand(self, ns: PageNamespace, offset: int, kind: int, plain: bytes) -> bytes:
        size = ns.page_size
        if kind == PayloadKind.FILL:
            if len(plain) != 1:
                raise self._error(ns, offset, f"fill record holds {len(plain)} bytes, not 1")
            return plain * size
        if kind == PayloadKind.ZSTD:
            if self._compressor is None:
                raise self._error(ns, offset, "compressed record in a tier without compression")
            try:
                plain = self._compressor.decompress(plain, size)
            except ValueError as err:
                raise self._error(ns, offset, f"decompression failed: {err}") from err
        if len(plain) != size:
            raise self._error(ns, offset, f"page decodes to {len(plain)} bytes, not {size}")
        return plain

    def _error(
        self,
        ns: PageNamespace,
        offset: int,
        reason: str,
        *,
        expected: int | None = None,
        actual: int | None = None,
    ) -> IntegrityError:
        return IntegrityError(
            reason,
            backend=self._backend,
            vm_id=ns.vm_id,
            region=ns.region,
            offset=offset,
            expected=expected,
            actual=actual,
        )
