"""Batches of file-tier pages to index entries and data, and back, with little Python
per page.

The file tier splits each sealed record (``record.py``): the page-sized part of the
payload goes to the data file at the page's own offset, the header and the rest (the
GCM tag, or the byte of a fill page) to the page's index entry (``file_format.py``).
A put seals its whole batch here, and a get opens all the entries of its batch at
once. Headers, identities and entries are handled as numpy arrays. The per-page work
that reads, hashes or encrypts whole pages (finding fill pages, the two xxh3 of each
record, reading pages, AES-GCM with one key schedule per batch) is one call per batch
into ``_batch.c``, which lets the GIL go for it, so that an eviction's put does not
keep the event loop thread from serving a fault. The rest is chained ``map``/``zip``
calls that run in C (building the ``StoredPage``): on the 2-vCPU development VM a bare
loop iteration takes about 50 ns, so a Python loop body of a few dozen bytecodes per
page would cost more than all of that work.

Opening accepts on its own only what ``PageCodec.open_fields`` would accept: data and
fill entries whose header is exactly what this module writes with the store's flags,
whose checksum matches, whose GCM tag authenticates (encrypted) and whose generation is
the expected one. Every other entry (malformed, foreign, corrupt or stale) goes to
``PageCodec.open_fields``, which alone decides and reports the error, so both paths
accept and refuse exactly the same records.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Final, NamedTuple

import numpy as np

from wsd import _batch
from wsd.storage.errors import IntegrityError
from wsd.storage.file_format import (
    EMPTY_ENTRY,
    ENTRY_BYTES,
    ENTRY_FIELDS,
    PLAIN_DATA_HEAD,
    PLAIN_FILL_HEAD,
    encode_entries,
    plain_entries,
    sealed_parts,
)
from wsd.storage.page import PageNamespace, StoredPage
from wsd.storage.record import (
    NONCE_BYTES,
    TAG_BYTES,
    PageCodec,
    PayloadKind,
    RecordFlag,
    check_header,
    fill_page,
    identity_table,
)

_DATA: Final = int(PayloadKind.DATA)
_FILL: Final = int(PayloadKind.FILL)
_ENCRYPTED: Final = int(RecordFlag.ENCRYPTED)
_FILL_BYTES: Final = tuple(bytes((b,)) for b in range(256))

VECTOR_PAGES: Final = 8
"""Gets of fewer pages are opened entry by entry, without numpy: for a fault's single
page the numpy calls would cost more than they save."""

ReadPages = Callable[[np.ndarray, bytes | None], tuple[list[bytes], bytes]]
"""``read(offsets, seeds)``: the data file's bytes of the pages at these byte offsets
(u64), each exactly one page long (zeros past the end of the file), in the same order;
and with ``seeds`` (a u64 per page) the xxh3_64 of each page with its seed, as u64s,
else ``b""``."""


class SealedBatch(NamedTuple):
    """A put's pages sealed for the file tier, in ascending page order."""

    indexes: list[int]
    """The page index of each entry."""
    kinds: list[int]
    """The PayloadKind of each entry."""
    entries: bytes
    """The index entries, ``ENTRY_BYTES`` each, in the order of ``indexes``."""
    data_indexes: list[int]
    """The page indexes of the data pages, ascending."""
    data: list[bytes | memoryview]
    """The page-sized part of their payloads (the caller's pages, when not encrypted)."""


def _pieces(buffer: bytes, length: int) -> list[bytes]:
    """``buffer`` cut into pieces of ``length`` bytes.

    numpy's ``tolist`` of an unstructured void array builds the bytes objects in one C
    loop, several times faster than slicing the buffer once per piece."""
    return np.frombuffer(buffer, dtype=np.dtype((np.void, length))).tolist()  # type: ignore[no-any-return]


def lone_fills(fills: np.ndarray, indexes: np.ndarray) -> np.ndarray:
    """Which pages of a batch (``fills`` as ``_batch.fills`` gives them, ``indexes``
    ascending) are fill pages with a data page of the batch right before and right
    after them. ``FileCodec.seal`` stores those as data pages.

    Stored as fill pages, each would leave a one-page hole between two runs of the
    data file: one more extent for ext4 to write and sync, and one more ``pwritev``.
    On the development VM's ext4, a page of zeros written into such a hole cost no
    more than the hole, while holes of two pages and more cost less than their zeros
    (a ``/tmp`` script: 4,096 data pages in runs of 1, 2 and 8, then ``fdatasync``).
    With the bench's mix (every third page zero) a put and its sync take 0.63 to
    0.74 of the time (``bench/storage.py``, docs/benchmarks.md). Each such page
    costs a block of ``max_bytes`` like any data page, at most one per data page.
    """
    lone = np.zeros(len(fills), dtype=bool)
    if len(fills) >= 3:
        data = fills < 0
        adjacent = np.diff(indexes) == 1
        lone[1:-1] = ~data[1:-1] & data[:-2] & data[2:] & adjacent[:-1] & adjacent[1:]
    return lone


class _Rows(NamedTuple):
    """The present entries of a get, as numpy columns, for ``FileCodec.open``."""

    positions: np.ndarray
    """Where each entry is in the get's index (and its page in the get's data)."""
    offsets: np.ndarray
    generations: np.ndarray
    checksums: np.ndarray
    fill: np.ndarray
    identities: list[bytes]
    """Each entry's identity, as a record with the store's flags; only when the
    store encrypts (the GCM associated data), else empty."""
    seeds: np.ndarray
    """xxh3_64 of each identity."""
    has_data: np.ndarray
    """Entries of data pages, whose page is in the data file."""
    plain_data: np.ndarray
    """Entries exactly as this module writes a data page with the store's flags."""
    plain_fill: np.ndarray
    """Entries exactly as this module writes a fill page with the store's flags."""

    @staticmethod
    def of(
        ns: PageNamespace, group: Sequence[tuple[int, int]], index: bytes, *, flags: int
    ) -> _Rows | None:
        """The present entries of ``index``, the entries of ``group``; None if none is.
        ``flags`` are the store's: 0, or ENCRYPTED with a key."""
        count = len(index) // ENTRY_BYTES
        table = plain_entries(index)
        if table["head"].all():  # the usual batch: every page is present
            positions = np.arange(count)
        else:
            words = np.frombuffer(index, dtype=np.uint64, count=count * ENTRY_BYTES // 8)
            positions = np.flatnonzero(words.reshape(count, ENTRY_BYTES // 8).any(axis=1))
            if not len(positions):
                return None
            table = table[positions]
        head, tail_len = table["head"], table["tail_len"]
        clean = (table["nonce_lo"] == 0) & (table["nonce_hi"] == 0)
        kinds = (head >> np.uint64(24)).astype(np.uint8)
        # The page index of each entry: its position plus the gap before its run.
        if len(group) == 1:  # the usual batch: one run
            pages = positions.astype(np.uint64) + np.uint64(group[0][0])
        else:
            firsts = np.array([first for first, _ in group], dtype=np.uint64)
            counts = np.array([count for _, count in group], dtype=np.int64)
            gaps = firsts - np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.uint64)
            pages = positions.astype(np.uint64) + np.repeat(gaps, counts)[positions]
        offsets = pages * np.uint64(ns.page_size)
        generations = table["generation"]
        table_bytes, length = identity_table(ns, offsets, generations, kinds, flags)
        identities = _pieces(table_bytes, length) if flags else []
        seeds = np.frombuffer(_batch.seeds(table_bytes, length), dtype=np.uint64)
        if flags:
            # Any nonce; the tail holds the GCM tag, and for a fill page also its byte.
            data_head, fill_head = PLAIN_DATA_HEAD | flags << 32, PLAIN_FILL_HEAD | flags << 32
            clean, data_tail, fill_tail = np.True_, TAG_BYTES, 1 + TAG_BYTES
        else:
            data_head, fill_head, data_tail, fill_tail = PLAIN_DATA_HEAD, PLAIN_FILL_HEAD, 0, 1
        return _Rows(
            positions=positions,
            offsets=offsets,
            generations=generations,
            checksums=table["checksum"],
            fill=table["fill"],
            identities=identities,
            seeds=seeds,
            has_data=kinds == _DATA,  # whatever else the entry says: read its page
            plain_data=clean & (head == data_head) & (tail_len == data_tail),
            plain_fill=clean & (head == fill_head) & (tail_len == fill_tail),
        )


class FileCodec:
    """Seals put batches and opens the entries of gets. Thread-safe, like PageCodec."""

    def __init__(
        self,
        *,
        backend: str,
        key: bytes | None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._backend = backend
        self._codec = PageCodec(backend=backend, key=key, random_bytes=random_bytes)
        self._key = key
        self._random_bytes = random_bytes

    # -- put ----------------------------------------------------------------------------

    def seal(
        self,
        ns: PageNamespace,
        pages: Mapping[int, bytes],
        generations: Mapping[int, int],
        stored_at: float,
    ) -> SealedBatch:
        """Seal every page (each ``ns.page_size`` long) as ``PageCodec.seal`` would,
        except a lone fill page between two data pages when not encrypting
        (``lone_fills``), and lay the records out as index entries and data."""
        size = ns.page_size
        offsets = sorted(pages)
        count = len(offsets)
        plains = list(map(pages.__getitem__, offsets))
        gens = list(map(generations.__getitem__, offsets))
        offset_array = np.array(offsets, dtype=np.uint64)
        index_array = offset_array // np.uint64(size)
        fills = np.frombuffer(_batch.fills(plains), dtype=np.int16)
        is_data = fills < 0
        if self._key is None:
            is_data |= lone_fills(fills, index_array)
        fill_rows = np.flatnonzero(~is_data).tolist()
        data_rows = np.flatnonzero(is_data).tolist()
        for row, fill in zip(fill_rows, fills[~is_data].tolist(), strict=True):
            plains[row] = _FILL_BYTES[fill]  # a fill page's payload is its byte
        kinds = np.where(is_data, _DATA, _FILL).astype(np.uint8)
        key = self._key
        flags = int(RecordFlag.NONE if key is None else RecordFlag.ENCRYPTED)
        identities, length = identity_table(
            ns, offset_array, np.array(gens, dtype=np.uint64), kinds, flags
        )
        seeds = _batch.seeds(identities, length)
        nonces: list[bytes] | None = None
        if key is None:
            payloads = plains
            tails = [b""] * count
            for row in fill_rows:
                tails[row] = plains[row]
            data: list[bytes | memoryview] = list(map(plains.__getitem__, data_rows))
        else:
            # One read of the random source per batch; every record still gets its
            # own 96 random bits.
            nonces = _pieces(self._random_bytes(NONCE_BYTES * count), NONCE_BYTES)
            payloads = _batch.gcm_seal(key, nonces, plains, _pieces(identities, length))
            # The tag goes to the entry; the page-sized part of the ciphertext is
            # written from the payload itself, without another copy.
            tails = list(payloads)  # a fill page's whole payload: its byte and tag
            for row in data_rows:
                tails[row] = payloads[row][size:]
            data = [memoryview(payloads[row])[:size] for row in data_rows]
        checksums = np.frombuffer(_batch.sums(payloads, seeds), dtype=np.uint64)
        indexes = index_array.tolist()
        entries = encode_entries(
            kinds,
            flags=flags,
            generations=gens,
            checksums=checksums,
            nonces=nonces,
            tails=tails,
            stored_at=stored_at,
        )
        data_indexes = list(map(indexes.__getitem__, data_rows))
        return SealedBatch(indexes, kinds.tolist(), entries, data_indexes, data)

    # -- get ----------------------------------------------------------------------------

    def open(
        self,
        ns: PageNamespace,
        group: Sequence[tuple[int, int]],
        index: bytes,
        read: ReadPages,
        *,
        expected: Mapping[int, int] | None,
        found: dict[int, StoredPage],
    ) -> None:
        """Set ``found[offset]`` for every page present in ``group``.

        ``group`` lists the pages as runs of (first page, page count), ascending, and
        ``index`` holds their entries back to back; page data is fetched with
        ``read`` when it is needed. Raises IntegrityError for a page that fails
        verification.
        """
        size = ns.page_size
        if len(index) // ENTRY_BYTES < VECTOR_PAGES:
            position = 0
            for first, count in group:
                for page_index in range(first, first + count):
                    entry = index[position * ENTRY_BYTES : (position + 1) * ENTRY_BYTES]
                    if entry != EMPTY_ENTRY:
                        offset = page_index * size
                        page = None
                        if entry[3] == _DATA:
                            page = read(np.array([offset], dtype=np.uint64), None)[0][0]
                        found[offset] = self.open_entry(ns, offset, entry, page, expected)
                    position += 1
            return
        key = self._key
        rows = _Rows.of(ns, group, index, flags=0 if key is None else _ENCRYPTED)
        if rows is None:
            return
        # Each page is read once, straight into the bytes returned, and (plaintext)
        # hashed while it is still in the cache.
        data_seeds = None if key is not None else rows.seeds[rows.has_data].tobytes()
        pages, data_sums = read(rows.offsets[rows.has_data], data_seeds)
        offsets, generations = rows.offsets.tolist(), rows.generations.tolist()
        values = np.empty(len(offsets), dtype=object)
        values[rows.has_data] = np.array(pages, dtype=object)  # the bytes, not copies
        if key is not None:
            good = self._decrypt(key, ns, rows, index, values)
        else:
            sums = np.zeros(len(offsets), dtype=np.uint64)
            sums[rows.has_data] = np.frombuffer(data_sums, dtype=np.uint64)
            fills = rows.fill[rows.plain_fill].tolist()
            fill_seeds = rows.seeds[rows.plain_fill].tobytes()
            fill_payloads = list(map(_FILL_BYTES.__getitem__, fills))
            sums[rows.plain_fill] = np.frombuffer(
                _batch.sums(fill_payloads, fill_seeds), dtype=np.uint64
            )
            good = (rows.plain_data | rows.plain_fill) & (sums == rows.checksums)
            fill_pages = {fill: fill_page(fill, size) for fill in set(fills)}
            values[rows.plain_fill] = list(map(fill_pages.__getitem__, fills))
        if expected is not None:
            wanted = map(expected.get, offsets, generations)
            good &= np.fromiter(map(operator.eq, wanted, generations), dtype=bool)
        value_list = values.tolist()
        if good.all():
            stored = zip(value_list, generations, strict=True)
            found.update(zip(offsets, map(tuple.__new__, repeat(StoredPage), stored), strict=True))
            return
        # Some entry is left to the codec: it accepts it (an encrypted page) or raises.
        positions = rows.positions.tolist()
        checked = zip(offsets, positions, good.tolist(), value_list, generations, strict=True)
        for offset, position, ok, value, generation in checked:
            if ok:
                found[offset] = StoredPage(value, generation)
                continue
            entry = index[position * ENTRY_BYTES : (position + 1) * ENTRY_BYTES]
            page = value if entry[3] == _DATA else None
            found[offset] = self.open_entry(ns, offset, entry, page, expected)

    @staticmethod
    def _decrypt(
        key: bytes, ns: PageNamespace, rows: _Rows, index: bytes, values: np.ndarray
    ) -> np.ndarray:
        """Check and decrypt a batch of encrypted records at once, replacing each data
        page's ciphertext in ``values`` by the page; which rows are good.

        All or nothing: unless every entry is one this module writes, every checksum
        matches and every record authenticates, no row is good, and the per-record
        codec opens them all and reports the first failure."""
        count = len(values)
        none = np.zeros(count, dtype=bool)
        if not (rows.plain_data | rows.plain_fill).all():
            return none
        parts = sealed_parts(index)[rows.positions]
        payloads = np.array(parts["tail"].tolist(), dtype=object)  # a fill page's byte, tag
        tags = parts["tag"][rows.has_data].tolist()
        payloads[rows.has_data] = list(map(bytes.__add__, values[rows.has_data].tolist(), tags))
        payload_list = payloads.tolist()
        sums = np.frombuffer(_batch.sums(payload_list, rows.seeds.tobytes()), dtype=np.uint64)
        if not (sums == rows.checksums).all():
            return none
        plains = _batch.gcm_open(key, parts["nonce"].tolist(), payload_list, rows.identities)
        if plains is None:
            return none
        values[:] = plains
        # A fill page's plaintext is its one byte, now authenticated.
        fills = map(operator.itemgetter(0), values[rows.plain_fill].tolist())
        values[rows.plain_fill] = list(map(fill_page, fills, repeat(ns.page_size)))
        return ~none

    def open_entry(
        self,
        ns: PageNamespace,
        offset: int,
        entry: bytes,
        page: bytes | memoryview | None,
        expected: Mapping[int, int] | None,
    ) -> StoredPage:
        """The page at ``offset`` from its index entry and, for a data page, its bytes
        in the data file, opened by ``PageCodec.open_fields``."""
        fields = ENTRY_FIELDS.unpack(entry)
        kind, tail_len, tail = fields[2], fields[7], fields[8]
        try:
            check_header(fields[0], fields[1], kind, fields[3])
        except ValueError as err:
            raise IntegrityError(
                f"malformed index entry: {err}",
                backend=self._backend,
                vm_id=ns.vm_id,
                region=ns.region,
                offset=offset,
            ) from err
        payload = tail[:tail_len]
        if kind == PayloadKind.DATA and page is not None:
            # A plaintext page has no tail: the page itself, not a 4 KiB copy of it.
            payload = b"".join((page, payload)) if payload else bytes(page)
        generation = None if expected is None else expected.get(offset)
        return self._codec.open_fields(ns, offset, fields[2:7], payload, generation=generation)
