"""The zstd tier: compressed pages in process memory, within a byte budget (like zswap).

Pages that are one repeated byte (zero pages above all) are stored as a one-byte fill
record, and pages that do not shrink are stored raw. Nothing here survives the
process: ``sync`` is a no-op and the tier is only as durable as the daemon.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Final

import zstandard

from wsd.storage.concurrency import Offload
from wsd.storage.config import ZstdStoreConfig
from wsd.storage.errors import BudgetExceeded, IntegrityError
from wsd.storage.page import (
    BackendKind,
    ExpectedGenerations,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)
from wsd.storage.record import HeaderFields, PageCodec, SealedRecord
from wsd.storage.store_base import StoreBase

RECORD_OVERHEAD: Final = 320
"""Bytes charged to the budget per page on top of its payload: the Python objects that
hold it (the entry tuple, its numbers, the payload object's header, the region and age
dict slots and keys), measured with tracemalloc on CPython 3.11 over 20000 fill pages
(448 while an entry was a SealedRecord inside a dataclass)."""

INLINE_DECODE_BYTES: Final = 64 * 1024
"""Gets of at most this many page bytes are decoded on the event loop thread.

Measured on the development VM: zstd decompression of a 4 KiB page takes about
1.2 µs and its xxh3 checksum 0.3 µs, while a round trip through a worker thread
costs 70 to 90 µs. Offloading would make a fault fifty times slower to save the loop
a couple of microseconds; 64 KiB bounds the inline work to about 20 µs. Huge pages
and large batches still go to the workers.
"""


class _ThreadCompressor:
    """zstd contexts are not thread-safe: one compressor and decompressor per thread."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def _contexts(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        contexts: tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor] | None
        contexts = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = (zstandard.ZstdCompressor(level=self._level), zstandard.ZstdDecompressor())
            self._local.contexts = contexts
        return contexts

    def compress(self, data: bytes) -> bytes:
        return self._contexts()[0].compress(data)

    def compress_many(self, datas: list[bytes]) -> list[bytes]:
        # One call, without the GIL, for the whole batch.  Page by page, each
        # call drops the GIL and must take it back, which beside a thread
        # running Python waits for that thread's switch interval: 2 ms a page
        # beside a Python loop, against 8 µs alone (docs/benchmarks.md,
        # "Two batches in flight, and one compression call per batch").
        if not datas:
            return []  # multi_compress_to_buffer refuses an empty batch
        inputs: list[bytes | bytearray | memoryview] = list(datas)
        frames = self._contexts()[0].multi_compress_to_buffer(inputs, threads=1)
        return [frames[k].tobytes() for k in range(len(frames))]

    def decompress(self, payload: bytes, size: int) -> bytes:
        try:
            return self._contexts()[1].decompress(payload, max_output_size=size)
        except zstandard.ZstdError as err:
            raise ValueError(str(err)) from err


_Entry = tuple[int, int, int, int, bytes, bytes, float]
"""One stored page: the six fields of its SealedRecord, then when it was stored.

An exact tuple of bytes and numbers, neither a NamedTuple nor a dataclass: the
cyclic garbage collector stops tracking such a tuple after the first
collection it survives, and never does for a subclass or a dataclass.  Kept
as SealedRecord and a dataclass, 65,536 pages made each full collection walk
120,000 more objects, on the event loop: 125 to 155 ms per collection
(``bench/evict_throughput.py``, zstd, timed with ``gc.callbacks``).
"""
# Literals, which the type checker can follow into the tuple; the layout is
# SealedRecord's, checked here once.
_GENERATION: Final = 2
_PAYLOAD: Final = 5
_STORED_AT: Final = 6
assert SealedRecord._fields.index("generation") == _GENERATION
assert SealedRecord._fields.index("payload") == _PAYLOAD == len(SealedRecord._fields) - 1
assert len(SealedRecord._fields) == _STORED_AT


def _entry(record: SealedRecord, stored_at: float) -> _Entry:
    return (*record, stored_at)


def _header_fields(entry: _Entry) -> HeaderFields:
    """(kind, flags, generation, checksum, nonce), as ``SealedRecord.header_fields``."""
    return entry[:_PAYLOAD]


def _cost(entry: _Entry) -> int:
    """Bytes charged to the budget for the page."""
    return len(entry[_PAYLOAD]) + RECORD_OVERHEAD


# Records inserted per step of a put, on the event loop thread.
INSERT_CHUNK: Final = 128


class ZstdStore(StoreBase):
    """The in-memory compressed tier. All state is touched on the event loop thread only;
    workers compress and return records, which the loop then inserts."""

    kind: ClassVar[BackendKind] = BackendKind.ZSTD
    durable: ClassVar[bool] = False

    def __init__(
        self,
        config: ZstdStoreConfig,
        *,
        clock: Callable[[], float] = time.time,
        name: str = "zstd",
    ) -> None:
        super().__init__(name=name)
        self._config = config
        self._codec = PageCodec(backend=name, compressor=_ThreadCompressor(config.level))
        self._clock = clock
        self._offload = Offload(backend=name, threads=config.threads)
        # Compression for puts runs below the loop's priority (wsd.priority);
        # gets, which serve faults, keep their own threads at the loop's.
        self._sealing = Offload(backend=name, threads=config.threads, background=True)
        self._regions: dict[tuple[str, int], dict[int, _Entry]] = {}
        self._page_sizes: dict[tuple[str, int], int] = {}
        # Oldest put first: re-putting a page moves it to the end (dicts keep order).
        self._age: dict[tuple[tuple[str, int], int], None] = {}
        self._used = 0
        self._reserved = 0  # budget held by puts still inserting
        self._payload = 0

    @property
    def budget_bytes(self) -> int:
        return self._config.budget_bytes

    async def _store(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> None:
        self._check_page_size(ns)
        async with self._guard.hold(ns.key, pages.keys()):
            records = await self._sealing.run(self._seal_batch, ns, pages, generations)
            self._check_open()
            region = self._regions.get(ns.key, {})
            replaced = sum([_cost(region[o]) for o in records.keys() & region.keys()])
            added = sum(map(len, [r.payload for r in records.values()]))
            added += RECORD_OVERHEAD * len(records)
            # All or nothing: a batch that does not fit stores no page, so the tiering
            # layer can demote and retry, or send the whole batch to a lower tier.
            if self._used + self._reserved - replaced + added > self._config.budget_bytes:
                self.counters.failures += 1
                raise BudgetExceeded(
                    backend=self._name,
                    vm_id=ns.vm_id,
                    region=ns.region,
                    budget_bytes=self._config.budget_bytes,
                    used_bytes=self._used,
                    needed_bytes=added - replaced,
                )
            # Inserting costs microseconds a page on the loop thread: a batch of a
            # thousand would stall fault service for milliseconds, so it goes in
            # chunks.  The guard keeps readers of these offsets waiting meanwhile,
            # and the growth stays reserved so a concurrent put cannot overrun the
            # budget in between.
            reserve = max(0, added - replaced)
            self._reserved += reserve
            try:
                region = self._regions.setdefault(ns.key, region)
                self._page_sizes[ns.key] = ns.page_size
                now = self._clock()
                items = list(records.items())
                for start in range(0, len(items), INSERT_CHUNK):
                    if start:
                        await asyncio.sleep(0)
                        self._check_open()
                    for offset, record in items[start : start + INSERT_CHUNK]:
                        old = region.get(offset)
                        if old is not None:
                            self._forget(ns.key, offset, old)
                        entry = _entry(record, now)
                        region[offset] = entry
                        self._age[(ns.key, offset)] = None
                        self._used += _cost(entry)
                        self._payload += len(record.payload)
            finally:
                self._reserved -= reserve

    def _check_page_size(self, ns: PageNamespace) -> None:
        ns.check_stored_page_size(self._page_sizes.get(ns.key, ns.page_size), backend=self._name)

    def _seal_batch(
        self, ns: PageNamespace, pages: Mapping[int, bytes], gens: Mapping[int, int]
    ) -> dict[int, SealedRecord]:
        return self._codec.seal_many(ns, pages, gens)

    def _forget(self, key: tuple[str, int], offset: int, entry: _Entry) -> None:
        del self._age[(key, offset)]
        self._used -= _cost(entry)
        self._payload -= len(entry[_PAYLOAD])

    async def _fetch(
        self, ns: PageNamespace, offsets: list[int], expected: ExpectedGenerations, missing_ok: bool
    ) -> dict[int, StoredPage]:
        region = self._regions.get(ns.key, {})
        if region:
            self._check_page_size(ns)
        entries = {o: region[o] for o in offsets if o in region}
        self._check_missing(ns, offsets, entries, missing_ok)
        items = ((o, _header_fields(e), e[_PAYLOAD]) for o, e in entries.items())
        inline = len(entries) * ns.page_size <= INLINE_DECODE_BYTES
        return await self._offload.run(self._codec.open_many, ns, items, expected, inline=inline)

    def get_inline(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage | None:
        """``get`` without a coroutine: decode on the calling (event loop) thread.

        One page costs a zstd decode and a checksum, less than a thread round trip.
        None when the page is not here or a writer holds it (``get`` then waits).
        """
        if self._closed or self._guard.held(ns.key, offset):
            return None
        entry = self._regions.get(ns.key, {}).get(offset)
        if entry is None or offset % ns.page_size:
            return None
        self._check_page_size(ns)
        self.counters.gets += 1
        try:
            found = self._codec.open_fields(
                ns, offset, _header_fields(entry), entry[_PAYLOAD], generation=generation
            )
        except IntegrityError:
            self.counters.integrity_errors += 1
            raise
        self.counters.pages_got += 1
        return found

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        self._check_open()
        self.counters.discards += 1
        region = self._regions.get(ns.key)
        if region is None:
            return
        wanted = list(region) if offsets is None else ns.check_offsets(offsets, backend=self._name)
        async with self._guard.hold(ns.key, wanted):
            for offset in wanted:
                entry = region.pop(offset, None)
                if entry is not None:
                    self._forget(ns.key, offset, entry)
            if not region:
                self._regions.pop(ns.key, None)
                self._page_sizes.pop(ns.key, None)

    async def sync(self) -> None:
        """Nothing to do: this tier lives and dies with the process."""
        self._check_open()
        self.counters.syncs += 1

    async def stats(self) -> StoreStats:
        pages = len(self._age)
        logical = sum(len(region) * self._page_sizes[key] for key, region in self._regions.items())
        return StoreStats(
            backend=self._name,
            pages=pages,
            stored_bytes=self._payload,
            logical_bytes=logical,
            budget_bytes=self._config.budget_bytes,
            counters=StoreStats.snapshot(self.counters),
        )

    def budget_usage(self) -> tuple[int, int | None]:
        """Bytes charged against the budget (payloads plus per-page overhead), budget."""
        return self._used, self._config.budget_bytes

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._sealing.close()
        await self._offload.close()
        self._regions.clear()
        self._age.clear()
        self._used = self._payload = 0

    async def coldest(self, limit: int, *, stored_before: float | None = None) -> list[PageRef]:
        refs: list[PageRef] = []
        for key, offset in self._age:
            if len(refs) >= limit:
                break
            entry = self._regions[key][offset]
            if stored_before is not None and entry[_STORED_AT] >= stored_before:
                # Entries are in put order, so with a clock that does not step back
                # every later page is younger still.
                break
            ns = PageNamespace(key[0], key[1], self._page_sizes[key])
            refs.append(PageRef(ns, offset, entry[_GENERATION], entry[_STORED_AT]))
        return refs

    async def remove_if_generation(self, ns: PageNamespace, expected: Mapping[int, int]) -> int:
        region = self._regions.get(ns.key)
        if region is None:
            return 0
        removed = 0
        async with self._guard.hold(ns.key, expected.keys()):
            for offset, generation in expected.items():
                entry = region.get(offset)
                if entry is not None and entry[_GENERATION] == generation:
                    del region[offset]
                    self._forget(ns.key, offset, entry)
                    removed += 1
            if not region:
                self._regions.pop(ns.key, None)
                self._page_sizes.pop(ns.key, None)
        return removed
