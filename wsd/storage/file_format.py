"""On-disk format of the file tier: index superblock and entries, and the I/O helpers
that read and write them. No store state lives here.

An index file is a 4 KiB superblock followed by one 64-byte entry per page, at
``INDEX_BASE + page_index * 64``::

    offset size entry field
    0      36   record header (record.py): magic, version, kind, flags, generation,
                checksum, nonce
    36     1    tail length
    37     17   tail: the GCM tag of a data page, or the (encrypted) byte of a fill page
    54     2    zero
    56     8    stored_at: the put's timestamp (float64), for age-based demotion

An all-zero entry is an absent page. The superblock is ``magic "WSDIDX\0\1" | version
u32 | page_size u32 | region u64 | encrypted u8 | key check 8 bytes | vm_id 64 bytes``
followed by its xxh3_64.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Final

import numpy as np
import xxhash

from wsd.kernel import COPY_SLICE_BYTES
from wsd.storage.page import PageNamespace
from wsd.storage.record import (
    MAGIC,
    VERSION,
    PayloadKind,
)

INDEX_BASE: Final = 4096
ENTRY: Final = struct.Struct("<36sB17s2xd")
# The same 64 bytes with the record header unpacked in place.
ENTRY_FIELDS: Final = struct.Struct("<2sBBB3xQQ12sB17s2xd")
ENTRY_BYTES: Final = ENTRY.size
EMPTY_ENTRY: Final = bytes(ENTRY_BYTES)
SUPERBLOCK: Final = struct.Struct("<8sIIQB8s64s")
SUPERBLOCK_MAGIC: Final = b"WSDIDX\x00\x01"
INDEX_VERSION: Final = 1
REGION_FILE: Final = re.compile(r"region-(\d+)\.index")
_IOV_MAX: Final = 1024
# Index entries are read in pieces of this many pages (4 KiB of entries) when scanned.
READ_RUN_PAGES: Final = 64
KINDS: Final = frozenset(int(k) for k in PayloadKind)
KNOWN_KIND: Final = np.isin(np.arange(256), list(KINDS))
"""Indexed by a kind byte: whether it is a PayloadKind."""
_SCAN_CHUNK: Final = 4 * 1024 * 1024
# Only the fields a scan needs: presence, kind, generation and age.
ENTRY_DTYPE: Final = np.dtype(
    {
        "names": ["magic", "kind", "generation", "stored_at"],
        "formats": ["S2", "u1", "<u8", "<f8"],
        "offsets": [0, 3, 8, 56],
        "itemsize": ENTRY_BYTES,
    }
)
# The entry as integers, to recognise plaintext data pages without unpacking each: the
# first 8 bytes hold magic, version, kind, flags and 3 zero bytes.
_PLAIN_DTYPE: Final = np.dtype(
    {
        "names": ["head", "generation", "checksum", "nonce_lo", "nonce_hi", "tail_len", "fill"],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<u4", "u1", "u1"],
        "offsets": [0, 8, 16, 24, 32, 36, 37],
        "itemsize": ENTRY_BYTES,
    }
)
# The parts of an entry an encrypted record needs besides those: nonce, GCM tag, and the
# whole tail (a fill page's payload: its encrypted byte and the tag).
_SEALED_DTYPE: Final = np.dtype(
    {
        "names": ["nonce", "tag", "tail"],
        "formats": ["V12", "V16", "V17"],
        "offsets": [24, 37, 37],
        "itemsize": ENTRY_BYTES,
    }
)
PLAIN_DATA_HEAD: Final = int.from_bytes(
    MAGIC + bytes((VERSION, PayloadKind.DATA, 0, 0, 0, 0)), "little"
)
PLAIN_FILL_HEAD: Final = int.from_bytes(
    MAGIC + bytes((VERSION, PayloadKind.FILL, 0, 0, 0, 0)), "little"
)
# The entry as a put writes it: the first 8 bytes are magic, version, kind, flags and
# 3 zero bytes, as one little-endian integer ``_HEAD_BASE | kind << 24 | flags << 32``.
_WRITE_DTYPE: Final = np.dtype(
    {
        "names": ["head", "generation", "checksum", "nonce", "tail_len", "tail", "stored_at"],
        "formats": ["<u8", "<u8", "<u8", "S12", "u1", "S17", "<f8"],
        "offsets": [0, 8, 16, 24, 36, 37, 56],
        "itemsize": ENTRY_BYTES,
    }
)
_HEAD_BASE: Final = int.from_bytes(MAGIC + bytes((VERSION,)), "little")
assert ENTRY_BYTES == 64


def runs(indexes: Sequence[int] | np.ndarray, *, limit: int = 1 << 62) -> list[tuple[int, int]]:
    """Sorted page indexes as (first, count) runs of at most ``limit`` consecutive pages."""
    if len(indexes) and int(indexes[-1]) - int(indexes[0]) == len(indexes) - 1:
        # One run, the usual batch: distinct sorted indexes spanning no more pages.
        first, total = int(indexes[0]), len(indexes)
        return [(first + n, min(limit, total - n)) for n in range(0, total, limit)]
    if len(indexes) < 16:
        out: list[tuple[int, int]] = []
        for index in map(int, indexes):
            if out and out[-1][0] + out[-1][1] == index and out[-1][1] < limit:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((index, 1))
        return out
    # Batches are hundreds of pages: find the breaks with numpy rather than a loop.
    array = np.asarray(indexes, dtype=np.int64)
    starts = np.flatnonzero(np.diff(array, prepend=array[0] - 2) != 1)
    counts = np.diff(starts, append=len(array))
    firsts = array[starts].tolist()
    if int(counts.max()) <= limit:
        return list(zip(firsts, counts.tolist(), strict=True))
    out = []
    for first, total in zip(firsts, counts.tolist(), strict=True):
        for piece in range(0, total, limit):
            out.append((first + piece, min(limit, total - piece)))
    return out


def pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> None:
    """Write every buffer contiguously at ``offset``, or raise.

    pwritev can be short on a filesystem that fills up midway; the remainder is then
    retried with pwrite, which reports ENOSPC instead of another short count.
    """
    for start in range(0, len(buffers), _IOV_MAX):
        chunk = buffers[start : start + _IOV_MAX]
        total = sum(len(b) for b in chunk)
        done = os.pwritev(fd, chunk, offset)
        if done < total:
            rest = memoryview(b"".join(chunk))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
                rest = rest[n:]
        offset += total


def pwrite_pages(fd: int, pages: Sequence[bytes | memoryview], indexes: Sequence[int]) -> None:
    """Write each page (all of one size) at its index times that size, or raise.

    One pwritev per run of consecutive indexes (ascending), issued through ``map``:
    a put's pages alternate with fill pages, which are holes, so a batch of 256 pages
    takes about a hundred calls, and a Python loop body per call would cost more than
    the call. A run is cut at ``COPY_SLICE_BYTES``: one long copy keeps fault service
    off its CPU. Short writes are finished by ``pwrite_all``.
    """
    if not pages:
        return
    size = len(pages[0])
    groups = runs(indexes, limit=min(_IOV_MAX, max(1, COPY_SLICE_BYTES // size)))
    counts = [count for _, count in groups]
    bounds = list(itertools.accumulate(counts, initial=0))
    chunks = list(map(pages.__getitem__, map(slice, bounds, bounds[1:])))
    offsets = [first * size for first, _ in groups]
    done = list(map(os.pwritev, itertools.repeat(fd), chunks, offsets))
    wanted = [count * size for count in counts]
    if done == wanted:
        return
    for chunk, offset, got, total in zip(chunks, offsets, done, wanted, strict=True):
        if got < total:
            pwrite_all(fd, [memoryview(b"".join(chunk))[got:]], offset + got)


def superblock(ns: PageNamespace, key_check: bytes | None) -> bytes:
    body = SUPERBLOCK.pack(
        SUPERBLOCK_MAGIC,
        INDEX_VERSION,
        ns.page_size,
        ns.region,
        key_check is not None,
        key_check or bytes(8),
        ns.vm_id.encode("ascii"),
    )
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def scan_entries(fd: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first page index, entries) over the allocated parts of an index file."""
    size = os.fstat(fd).st_size
    pos = INDEX_BASE
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start = max(INDEX_BASE, start - (start - INDEX_BASE) % ENTRY_BYTES)
        while start < end:
            length = min(_SCAN_CHUNK, end - start)
            raw = os.pread(fd, length - length % ENTRY_BYTES or ENTRY_BYTES, start)
            count = len(raw) // ENTRY_BYTES
            if not count:
                return
            entries = np.frombuffer(raw, dtype=ENTRY_DTYPE, count=count)
            yield (start - INDEX_BASE) // ENTRY_BYTES, entries
            start += count * ENTRY_BYTES
        pos = max(end, start)


def encode_entries(
    kinds: np.ndarray,
    *,
    flags: int,
    generations: Sequence[int],
    checksums: Sequence[int] | np.ndarray,
    nonces: Sequence[bytes] | None,
    tails: Sequence[bytes],
    stored_at: float,
) -> bytes:
    """The index entries of a batch, back to back (``None`` nonces: all zero)."""
    table = np.zeros(len(kinds), dtype=_WRITE_DTYPE)
    table["head"] = _HEAD_BASE | kinds.astype(np.uint64) << np.uint64(24) | flags << 32
    table["generation"] = generations
    table["checksum"] = checksums
    if nonces is not None:
        table["nonce"] = nonces
    table["tail_len"] = [len(tail) for tail in tails]
    table["tail"] = tails
    table["stored_at"] = stored_at
    return table.tobytes()


def sealed_parts(index: bytes) -> np.ndarray:
    """A run of entries as their nonce, GCM tag and tail, each a bytes-like void."""
    return np.frombuffer(index, dtype=_SEALED_DTYPE, count=len(index) // ENTRY_BYTES)


def plain_entries(index: bytes) -> np.ndarray:
    """A run of entries as the fields that recognise plaintext data and fill pages."""
    return np.frombuffer(index, dtype=_PLAIN_DTYPE, count=len(index) // ENTRY_BYTES)
