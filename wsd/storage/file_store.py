"""The file tier: one sparse data file and one index file per VM region.

Layout under ``root`` (the index format is in ``file_format.py``)::

    root/.lock                        flock: one process per root
    root/<vm_id>/region-<N>.data      page at byte offset X is stored at X (sparse)
    root/<vm_id>/region-<N>.index     4 KiB superblock, then one 64-byte entry per page

Keeping data at its own offset keeps the data file sparse and page-aligned; a page is
present only if its index entry says so, so stale bytes in the data file are never
served. An index entry is the record header (see ``record.py``) plus the part of the
payload that is not page data: the GCM tag, or the byte of a fill page (zero pages
take no data space at all).

Durability: ``sync`` fdatasyncs every data and index file written since the last
sync, and fsyncs the directories in which files were created.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import heapq
import itertools
import operator
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final

import numpy as np
import structlog
import xxhash

from wsd import _batch
from wsd.storage.concurrency import Offload
from wsd.storage.config import FileStoreConfig
from wsd.storage.errors import (
    BudgetExceeded,
    EncryptionKeyError,
    IntegrityError,
    StorageError,
    Where,
)
from wsd.storage.file_codec import FileCodec, ReadPages, SealedBatch
from wsd.storage.file_format import (
    EMPTY_ENTRY,
    ENTRY_BYTES,
    ENTRY_DTYPE,
    INDEX_BASE,
    INDEX_VERSION,
    KNOWN_KIND,
    READ_RUN_PAGES,
    REGION_FILE,
    SUPERBLOCK,
    SUPERBLOCK_MAGIC,
    pwrite_all,
    pwrite_pages,
    runs,
    scan_entries,
    superblock,
)
from wsd.storage.fsops import fsync_dir, punch_hole, storage_error
from wsd.storage.keys import key_check_value
from wsd.storage.page import (
    VM_ID_PATTERN,
    BackendKind,
    ExpectedGenerations,
    PageNamespace,
    PageRef,
    StoredPage,
    StoreStats,
)
from wsd.storage.record import MAGIC, PayloadKind
from wsd.storage.store_base import StoreBase

log = structlog.get_logger("wsd.storage")


class _Dropped(Exception):
    """The region was discarded while an operation was queued for it."""


@dataclass(eq=False)
class _Region:
    """Open files and page counts of one region; shared with worker threads.

    Worker threads use the descriptors only between ``using()`` enter and exit; a
    dropped region closes them when its last user leaves, so that a descriptor number
    is never reused under a worker's feet.
    """

    ns: PageNamespace
    directory: Path
    data_fd: int
    index_fd: int
    pages: int = 0
    data_pages: int = 0
    _users: int = 0
    _dropped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def using(self) -> _Region:
        """``with region.using():`` the descriptors stay open (raises ``_Dropped``)."""
        return self

    # A class's __enter__/__exit__, not a @contextmanager generator: a fault's
    # inline get enters once, and the generator's machinery cost more than the read.
    def __enter__(self) -> None:
        with self._lock:
            if self._dropped:
                raise _Dropped
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._dropped and not self._users:
                self._close()

    def drop(self) -> None:
        with self._lock:
            self._dropped = True
            if not self._users:
                self._close()

    def _close(self) -> None:
        for fd in (self.data_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.index_fd = -1


# Threads reserved for gets (the fault path), apart from the io_threads that
# puts, discards and syncs share.
READ_THREADS: Final = 2


class _NoWaitUnsupported(Exception):
    """The filesystem does not take RWF_NOWAIT reads (EOPNOTSUPP)."""


def _pread_nowait(fd: int, size: int, offset: int) -> bytes:
    """``os.pread`` that raises ``BlockingIOError`` instead of waiting for the disk.

    A short read is refused too: under RWF_NOWAIT it may mean "the rest is not
    cached", not end of file, and the callers read a short page as zeros past
    the end.  The blocking read in a worker tells the two apart.
    """
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            raise _NoWaitUnsupported from e
        raise
    if got < size:
        raise BlockingIOError(errno.EAGAIN, "short RWF_NOWAIT read")
    return bytes(buf)


class FileStore(StoreBase):
    """The file tier. Create with ``await FileStore.open(config, key=...)``."""

    kind: ClassVar[BackendKind] = BackendKind.FILE
    durable: ClassVar[bool] = True

    def __init__(
        self,
        config: FileStoreConfig,
        *,
        key: bytes | None,
        clock: Callable[[], float],
        lock_fd: int,
        name: str = "file",
    ) -> None:
        super().__init__(name=name)
        self._config = config
        self._root = config.root
        self._codec = FileCodec(backend=name, key=key)
        self._key_check = key_check_value(key) if key is not None else None
        self._clock = clock
        self._lock_fd = lock_fd
        # Writes, syncs and removals run below the loop's priority (wsd.priority).
        self._offload = Offload(backend=name, threads=config.io_threads, background=True)
        # Reads have threads of their own, at the loop's priority: a get serves
        # a vCPU blocked in a fault and must never queue behind an eviction's
        # writes and fsyncs.
        self._reads = Offload(backend=name, threads=READ_THREADS)
        self._nowait = True  # until the filesystem refuses RWF_NOWAIT reads
        self._regions: dict[tuple[str, int], _Region] = {}
        self._lifecycle = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self._dirty: set[_Region] = set()
        self._new_dirs: set[Path] = set()
        self._accounting = threading.Lock()
        self._used_bytes = 0
        self._failed: str | None = None

    @classmethod
    async def open(
        cls,
        config: FileStoreConfig,
        *,
        key: bytes | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "file",
    ) -> FileStore:
        """Open (creating if needed) the root and every region already in it."""
        lock_fd = await asyncio.to_thread(cls._lock_root, config.root, name)
        store = cls(config, key=key, clock=clock, lock_fd=lock_fd, name=name)
        try:
            await store._offload.run(store._load_existing)
        except BaseException:
            await store._release()
            raise
        return store

    # -- setup ------------------------------------------------------------------------

    @staticmethod
    def _lock_root(root: Path, name: str) -> int:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise storage_error(err, f"opening {str(root)!r}", backend=name) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise StorageError(f"{str(root)!r} is in use by another process", backend=name) from err
        return fd

    def _load_existing(self) -> None:
        for vm_dir in sorted(self._root.iterdir()):
            if not vm_dir.is_dir() or not VM_ID_PATTERN.fullmatch(vm_dir.name):
                continue
            for index_path in sorted(vm_dir.iterdir()):
                match = REGION_FILE.fullmatch(index_path.name)
                if match is None:
                    continue
                region, _ = self._open_region_files(vm_dir.name, int(match[1]), None)
                self._count(region)
                self._regions[region.ns.key] = region
                self._used_bytes += region.data_pages * region.ns.page_size

    def _open_region_files(
        self, vm_id: str, region_no: int, ns: PageNamespace | None
    ) -> tuple[_Region, list[Path]]:
        """Open a region's files; with ``ns`` given, create them if missing.

        Returns the region and the directories that gained an entry and need an fsync.
        """
        directory = self._root / vm_id
        index_path = directory / f"region-{region_no}.index"
        where = self._where(vm_id, region_no)
        fds: list[int] = []
        new_dirs: list[Path] = []
        try:
            if ns is not None and not directory.exists():
                directory.mkdir(mode=0o700)
                new_dirs.append(self._root)
            existed = index_path.exists()
            if not existed:
                assert ns is not None
                self._create_index(index_path, ns)
                new_dirs.append(directory)
            flags = os.O_RDWR | os.O_CLOEXEC
            fds.append(os.open(index_path.with_suffix(".data"), flags | os.O_CREAT, 0o600))
            fds.append(os.open(index_path, flags))
            ns_on_disk = self._check_superblock(fds[1], vm_id, region_no)
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise storage_error(err, f"opening region files {str(index_path)!r}", **where) from err
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return _Region(ns_on_disk, directory, fds[0], fds[1]), new_dirs

    def _create_index(self, path: Path, ns: PageNamespace) -> None:
        """Create an index file with its superblock, atomically.

        Written and fdatasynced under a temporary name, then renamed: an index file that
        exists always has its superblock, even after ENOSPC or a crash midway, so a
        half-created region can never make the whole root fail to open.
        """
        temporary = path.with_suffix(".index.new")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            pwrite_all(fd, [superblock(ns, self._key_check)], 0)
            os.fdatasync(fd)
            os.rename(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _check_superblock(self, fd: int, vm_id: str, region_no: int) -> PageNamespace:
        where = self._where(vm_id, region_no)
        raw = os.pread(fd, SUPERBLOCK.size + 8, 0)
        body, tail = raw[: SUPERBLOCK.size], raw[SUPERBLOCK.size :]
        if len(tail) != 8 or struct.unpack("<Q", tail)[0] != xxhash.xxh3_64_intdigest(body):
            raise StorageError("index superblock is missing or corrupt", **where)
        magic, version, page_size, region, encrypted, check, vm = SUPERBLOCK.unpack(body)
        if magic != SUPERBLOCK_MAGIC or version != INDEX_VERSION:
            raise StorageError(f"unknown index format {magic!r} v{version}", **where)
        if vm.rstrip(b"\0").decode("ascii", "replace") != vm_id or region != region_no:
            raise StorageError("index superblock names another VM or region", **where)
        if encrypted and self._key_check is None:
            raise EncryptionKeyError("region is encrypted but no key is configured", **where)
        if not encrypted and self._key_check is not None:
            raise EncryptionKeyError(
                "region was written without encryption but a key is configured", **where
            )
        if encrypted and check != self._key_check:
            raise EncryptionKeyError("region was written with another key", **where)
        return PageNamespace(vm_id, region_no, page_size)

    def _count(self, region: _Region) -> None:
        """Count present and data-bearing entries, reading only allocated extents."""
        pages = data_pages = 0
        for _, entries in scan_entries(region.index_fd):
            present = entries["magic"] == MAGIC
            pages += int(present.sum())
            data_pages += int((present & (entries["kind"] == PayloadKind.DATA)).sum())
        region.pages, region.data_pages = pages, data_pages

    async def _region(self, ns: PageNamespace, *, create: bool) -> _Region | None:
        region = self._regions.get(ns.key)
        if region is None and create:
            async with self._lifecycle:
                region = self._regions.get(ns.key)
                if region is None:
                    created, new_dirs = await self._offload.run(
                        self._open_region_files, ns.vm_id, ns.region, ns
                    )
                    self._regions[ns.key] = region = created
                    # The superblock and the new names become durable at the next sync.
                    self._dirty.add(created)
                    self._new_dirs.update(new_dirs)
        if region is not None:
            ns.check_stored_page_size(region.ns.page_size, backend=self._name)
        return region

    def _where(self, vm_id: str, region: int) -> Where:
        """Error context for a region of this store."""
        return {"backend": self._name, "vm_id": vm_id, "region": region}

    def _check_writable(self) -> None:
        self._check_open()
        if self._failed is not None:
            # After a failed fdatasync the kernel may have dropped the dirty pages and
            # cleared the error, so a retry could succeed without the data on disk.
            raise StorageError(
                f"an earlier sync failed ({self._failed}); reopen the store",
                backend=self._name,
            )

    # -- put --------------------------------------------------------------------------

    async def _store(
        self, ns: PageNamespace, pages: Mapping[int, bytes], generations: Mapping[int, int]
    ) -> None:
        region = await self._region(ns, create=True)
        assert region is not None
        stored_at = self._clock()
        async with self._guard.hold(ns.key, pages.keys()):
            try:
                await self._offload.run(self._write_batch, region, pages, generations, stored_at)
            except StorageError:
                self.counters.failures += 1
                raise
            except _Dropped as err:
                self.counters.failures += 1
                raise StorageError(
                    "region was discarded while the put was queued", **self._where(*ns.key)
                ) from err
            finally:
                self._dirty.add(region)

    def _write_batch(
        self,
        region: _Region,
        pages: Mapping[int, bytes],
        gens: Mapping[int, int],
        stored_at: float,
    ) -> None:
        ns, size = region.ns, region.ns.page_size
        batch = self._codec.seal(ns, pages, gens, stored_at)
        where = self._where(*ns.key)
        with region.using():
            try:
                old = self._read_kinds(region, batch.indexes)
            except OSError as err:
                raise storage_error(err, "reading index entries", **where) from err
            new_data = len(batch.data_indexes)
            old_pages = int(np.count_nonzero(old))
            old_data = int(np.count_nonzero(old == PayloadKind.DATA))
            self._account(region, len(batch.indexes) - old_pages, new_data - old_data)
            try:
                self._write_records(region, batch, old)
            except OSError as err:
                self._invalidate(region, batch.indexes)
                self._free_blocks(region, batch.indexes)
                self._account(region, -len(batch.indexes), -new_data)
                first = batch.indexes[0] * size
                raise storage_error(
                    err, f"writing {len(batch.indexes)} pages from {first:#x}", **where
                ) from err

    def _account(self, region: _Region, pages: int, data_pages: int) -> None:
        """Apply a change of page counts, refusing growth beyond ``max_bytes``."""
        delta = data_pages * region.ns.page_size
        with self._accounting:
            limit = self._config.max_bytes
            if limit is not None and delta > 0 and self._used_bytes + delta > limit:
                raise BudgetExceeded(
                    backend=self._name,
                    vm_id=region.ns.vm_id,
                    region=region.ns.region,
                    budget_bytes=limit,
                    used_bytes=self._used_bytes,
                    needed_bytes=delta,
                )
            self._used_bytes += delta
            region.pages += pages
            region.data_pages += data_pages

    def _write_records(self, region: _Region, batch: SealedBatch, old: np.ndarray) -> None:
        # Data first: if a write fails midway, the entries still describe the old data,
        # which the checksums then reject, rather than new entries over missing data.
        pwrite_pages(region.data_fd, batch.data, batch.data_indexes)
        entries = memoryview(batch.entries)
        position = 0
        for first, count in runs(batch.indexes):
            chunk = entries[position * ENTRY_BYTES : (position + count) * ENTRY_BYTES]
            pwrite_all(region.index_fd, [chunk], INDEX_BASE + first * ENTRY_BYTES)
            position += count
        # A fill page replacing a data page no longer needs its data blocks.
        freed = (np.array(batch.kinds) != PayloadKind.DATA) & (old == PayloadKind.DATA)
        self._punch(region, np.array(batch.indexes)[freed].tolist())

    def _punch(self, region: _Region, indexes: Sequence[int]) -> None:
        size = region.ns.page_size
        for first, count in runs(sorted(indexes)):
            punch_hole(region.data_fd, first * size, count * size)

    def _invalidate(self, region: _Region, indexes: Sequence[int]) -> None:
        """Best effort after a failed write: the batch's entries become absent.

        Overwriting an entry that already exists needs no new block, so this works on
        a full filesystem; if it fails anyway, the checksums still reject any torn page.
        """
        try:
            for first, count in runs(indexes):
                pwrite_all(region.index_fd, [EMPTY_ENTRY] * count, INDEX_BASE + first * ENTRY_BYTES)
        except OSError:
            pass

    def _free_blocks(self, region: _Region, indexes: Sequence[int]) -> None:
        """Best effort after a failed write: free the data blocks of the batch's pages.

        Their entries are gone, so nothing reads those blocks again.  Left
        allocated, the blocks every batch wrote before failing on a full disk
        would stay, and the space freed by discards would never be enough again.
        """
        with suppress(OSError):
            self._punch(region, indexes)

    def _read_kinds(self, region: _Region, indexes: Sequence[int]) -> np.ndarray:
        """The kind stored at each of ``indexes`` (sorted), 0 where no page is."""
        raw = b"".join(
            os.pread(region.index_fd, count * ENTRY_BYTES, INDEX_BASE + first * ENTRY_BYTES).ljust(
                count * ENTRY_BYTES, b"\0"
            )
            for first, count in runs(indexes)
        )
        table = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        kinds = table["kind"]
        # An unknown kind is corrupt; counting it as data over-estimates usage.
        known = KNOWN_KIND[kinds]
        kinds = np.where(known, kinds, np.uint8(PayloadKind.DATA))
        return np.where(table["magic"] == MAGIC, kinds, np.uint8(0))

    # -- get --------------------------------------------------------------------------

    async def _fetch(
        self, ns: PageNamespace, offsets: list[int], expected: ExpectedGenerations, missing_ok: bool
    ) -> dict[int, StoredPage]:
        region = await self._region(ns, create=False)
        found: dict[int, StoredPage] | None = None
        if region is not None and len(offsets) == 1 and self._nowait:
            # One page, usually a vCPU's fault: read on the loop thread if the
            # page cache has it (RWF_NOWAIT), which saves the thread round
            # trip that was most of a fault's time on this tier.
            try:
                found = self._read_batch(region, offsets, expected, _pread_nowait)
            except BlockingIOError:
                pass
            except _NoWaitUnsupported:
                self._nowait_refused()
        if found is None:
            found = {}
            if region is not None:
                found = await self._reads.run(self._read_batch, region, offsets, expected)
        self._check_missing(ns, offsets, found, missing_ok)
        return found

    def _nowait_refused(self) -> None:
        """The file system has no ``RWF_NOWAIT`` reads: stop trying, and say so once."""
        self._nowait = False
        log.info(
            "file tier: the file system refuses RWF_NOWAIT reads, so every fetch goes "
            "through a worker thread (slower faults; ext4, XFS or btrfs take them)",
            backend=self._name,
            root=str(self._root),
        )

    def get_inline(
        self, ns: PageNamespace, offset: int, *, generation: int | None = None
    ) -> StoredPage | None:
        """``get`` on the calling (event loop) thread, when the page cache has the page.

        Its index entry and its data are read with ``preadv(RWF_NOWAIT)``: a few
        microseconds, where ``get`` costs an asyncio task, the deadline's task and a
        thread round trip even when it reads inline.  None when a read would block,
        the region is not open yet, a writer holds the page, the page is not stored or
        the filesystem cannot say; the caller then uses ``get``.  Raises
        IntegrityError like ``get`` (wrong generation included).
        """
        if self._closed or not self._nowait or offset % ns.page_size:
            return None
        region = self._regions.get(ns.key)
        if region is None or self._guard.held(ns.key, offset):
            return None
        ns.check_stored_page_size(region.ns.page_size, backend=self._name)
        expected = None if generation is None else {offset: generation}
        try:
            page = self._read_one(region, offset, expected)
        except BlockingIOError:
            return None
        except _NoWaitUnsupported:
            self._nowait_refused()
            return None
        except IntegrityError:
            self.counters.gets += 1
            self.counters.integrity_errors += 1
            raise
        if page is not None:
            self.counters.gets += 1
            self.counters.pages_got += 1
        return page

    def _read_one(
        self, region: _Region, offset: int, expected: ExpectedGenerations
    ) -> StoredPage | None:
        """:meth:`_read_batch` of one page with ``_pread_nowait``, for a fault.

        Its entry, then its data, and the codec's check of that one entry: the
        batch's runs, joins and reader closure cost several times the two reads.
        """
        size = region.ns.page_size
        try:
            with region.using():
                entry = _pread_nowait(
                    region.index_fd, ENTRY_BYTES, INDEX_BASE + offset // size * ENTRY_BYTES
                )
                if entry.count(0) == ENTRY_BYTES:
                    return None
                data = None
                if entry[3] == PayloadKind.DATA:
                    data = _pread_nowait(region.data_fd, size, offset)
        except _Dropped:
            return None
        except (BlockingIOError, _NoWaitUnsupported):
            raise
        except OSError as err:
            raise self._read_error(region, err, "reading 1 page", offset) from err
        return self._codec.open_entry(region.ns, offset, entry, data, expected)

    def _read_error(self, region: _Region, err: OSError, what: str, offset: int) -> StorageError:
        """A failed read of the region's files, named with the first offset read."""
        where = self._where(*region.ns.key)
        where["offset"] = offset
        return storage_error(err, what, **where)

    def _read_batch(
        self,
        region: _Region,
        offsets: list[int],
        expected: ExpectedGenerations,
        pread: Callable[[int, int, int], bytes] = os.pread,
    ) -> dict[int, StoredPage]:
        """The stored pages among ``offsets``, in that order: one worker call for the
        whole batch, one pread of entries per run of consecutive pages, and one pread
        per data page, verified chunk by chunk as it is read.

        With ``pread=_pread_nowait`` a read that would block raises
        ``BlockingIOError`` (and ``_NoWaitUnsupported`` where the filesystem
        cannot say), for the caller to read in a worker instead."""
        found: dict[int, StoredPage] = {}
        size = region.ns.page_size
        indexes = list(map(operator.floordiv, offsets, itertools.repeat(size)))
        ordered = sorted(indexes)
        group = runs(ordered)
        try:
            with region.using():
                # Past the end of the index file, entries read as absent.
                index = b"".join(
                    pread(
                        region.index_fd, count * ENTRY_BYTES, INDEX_BASE + first * ENTRY_BYTES
                    ).ljust(count * ENTRY_BYTES, b"\0")
                    for first, count in group
                )
                if index.count(0) != len(index):
                    read = self._page_reader(region, pread)
                    self._codec.open(region.ns, group, index, read, expected=expected, found=found)
        except _Dropped:
            return {}
        except (BlockingIOError, _NoWaitUnsupported):
            raise
        except OSError as err:
            raise self._read_error(
                region, err, f"reading {len(offsets)} pages", ordered[0] * size
            ) from err
        if ordered != indexes:
            found = {o: found[o] for o in offsets if o in found}
        return found

    @staticmethod
    def _page_reader(
        region: _Region, pread: Callable[[int, int, int], bytes] = os.pread
    ) -> ReadPages:
        """Reads pages of the data file (see ReadPages)."""
        fd, size = region.data_fd, region.ns.page_size
        if pread is os.pread:
            # The batch's reads and checksums in C, without the GIL: one preadv per
            # run of pages, straight into the bytes returned, each page hashed while
            # still in the cache.
            def read_native(offsets: np.ndarray, seeds: bytes | None) -> tuple[list[bytes], bytes]:
                return _batch.read_pages(fd, offsets, size, seeds, True)

            return read_native

        def read(offsets: np.ndarray, seeds: bytes | None) -> tuple[list[bytes], bytes]:
            # Past the end of the file a page reads as zeros, as in a hole.
            count = len(offsets)
            pages = list(
                map(
                    pread,
                    itertools.repeat(fd, count),
                    itertools.repeat(size, count),
                    offsets.tolist(),
                )
            )
            if min(map(len, pages), default=size) < size:
                pages = [page.ljust(size, b"\0") for page in pages]
            return pages, b"" if seeds is None else _batch.sums(pages, seeds)

        return read

    # -- discard ----------------------------------------------------------------------

    async def discard(self, ns: PageNamespace, offsets: Iterable[int] | None = None) -> None:
        self._check_writable()
        self.counters.discards += 1
        if offsets is None:
            await self._drop_region(ns)
            return
        wanted = ns.check_offsets(offsets, backend=self._name)
        region = await self._region(ns, create=False)
        if region is None or not wanted:
            return
        async with self._guard.hold(ns.key, wanted):
            await self._offload.run(self._remove, region, wanted, None)
            self._dirty.add(region)

    def _remove(
        self, region: _Region, offsets: Sequence[int], expected: Mapping[int, int] | None
    ) -> int:
        """Clear entries (only those of the expected generation, if given), punch data."""
        try:
            with region.using():
                return self._remove_entries(region, offsets, expected)
        except _Dropped:
            return 0

    def _remove_entries(
        self, region: _Region, offsets: Sequence[int], expected: Mapping[int, int] | None
    ) -> int:
        ns, size = region.ns, region.ns.page_size
        cleared: list[int] = []
        data: list[int] = []
        present = 0
        try:
            for first, count in runs(sorted(o // size for o in offsets), limit=READ_RUN_PAGES):
                raw = os.pread(
                    region.index_fd, count * ENTRY_BYTES, INDEX_BASE + first * ENTRY_BYTES
                )
                for n in range(len(raw) // ENTRY_BYTES):
                    entry = raw[n * ENTRY_BYTES : (n + 1) * ENTRY_BYTES]
                    if entry == EMPTY_ENTRY:
                        continue
                    valid = entry[:2] == MAGIC
                    index = first + n
                    if expected is not None:
                        generation = struct.unpack_from("<Q", entry, 8)[0]
                        if not valid or expected.get(index * size) != generation:
                            continue
                    cleared.append(index)
                    present += valid
                    if valid and entry[3] == PayloadKind.DATA:
                        data.append(index)
            for first, count in runs(cleared):
                pwrite_all(region.index_fd, [EMPTY_ENTRY] * count, INDEX_BASE + first * ENTRY_BYTES)
            self._punch(region, data)
        except OSError as err:
            raise storage_error(err, "discarding pages", **self._where(*ns.key)) from err
        self._account(region, -present, -len(data))
        return present

    async def _drop_region(self, ns: PageNamespace) -> None:
        async with self._lifecycle:
            region = self._regions.pop(ns.key, None)
            if region is None:
                return
            self._dirty.discard(region)
            with self._accounting:
                self._used_bytes -= region.data_pages * region.ns.page_size
            await self._offload.run(self._unlink_region, region)

    def _unlink_region(self, region: _Region) -> None:
        stem = region.directory / f"region-{region.ns.region}"
        try:
            # Index first: without it the data file is garbage anyway.
            for suffix in (".index", ".data"):
                stem.with_suffix(suffix).unlink(missing_ok=True)
            fsync_dir(region.directory)
        except OSError as err:
            raise storage_error(
                err, "removing region files", **self._where(*region.ns.key)
            ) from err
        finally:
            region.drop()

    # -- sync, stats, close -----------------------------------------------------------

    async def sync(self) -> None:
        self._check_writable()
        async with self._sync_lock:
            # Taken inside the lock: a sync that starts while another runs must also
            # wait for the files that one is flushing.
            dirty, self._dirty = self._dirty, set()
            dirs, self._new_dirs = self._new_dirs, set()
            self.counters.syncs += 1
            # All at once, on every worker: concurrent fsyncs share journal commits.
            # No order among them is needed for what sync promises: until it returns
            # nothing of these puts is acknowledged, and writeback may flush any of
            # these files before any other anyway; checksums reject a page whose entry
            # reached the disk without its data.
            jobs = [(region, fd) for region in dirty for fd in ("data", "index")]
            results = await asyncio.gather(
                *(self._offload.run(self._sync_file, region, which) for region, which in jobs),
                *(self._offload.run(self._sync_dir, directory) for directory in dirs),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    if isinstance(result, StorageError):
                        self._failed = result.message
                    self.counters.failures += 1
                    raise result

    def _sync_file(self, region: _Region, which: str) -> None:
        try:
            with region.using():
                fd = region.data_fd if which == "data" else region.index_fd
                os.fdatasync(fd)
        except _Dropped:
            return
        except OSError as err:
            where = self._where(*region.ns.key)
            raise storage_error(err, f"fdatasync of the {which} file", **where) from err

    def _sync_dir(self, directory: Path) -> None:
        try:
            fsync_dir(directory)
        except OSError as err:
            raise storage_error(err, f"fsync of {str(directory)!r}", backend=self._name) from err

    async def stats(self) -> StoreStats:
        regions = list(self._regions.values())
        return StoreStats(
            backend=self._name,
            pages=sum(r.pages for r in regions),
            stored_bytes=self._used_bytes,
            logical_bytes=sum(r.pages * r.ns.page_size for r in regions),
            budget_bytes=self._config.max_bytes,
            counters=StoreStats.snapshot(self.counters),
        )

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failed is None:
                await self.sync()
        finally:
            self._closed = True
            await self._release()

    async def _release(self) -> None:
        await self._reads.close()
        await self._offload.close()
        for region in self._regions.values():
            region.drop()
        self._regions.clear()
        os.close(self._lock_fd)

    # -- demotion source --------------------------------------------------------------

    async def coldest(self, limit: int, *, stored_before: float | None = None) -> list[PageRef]:
        if limit <= 0:
            return []
        regions = list(self._regions.values())
        return await self._offload.run(self._coldest, regions, limit, stored_before)

    def _coldest(
        self, regions: list[_Region], limit: int, stored_before: float | None
    ) -> list[PageRef]:
        best: list[tuple[float, int, int, int]] = []  # (stored_at, region slot, index, gen)
        for slot, region in enumerate(regions):
            try:
                with region.using():
                    for first, entries in scan_entries(region.index_fd):
                        mask = entries["magic"] == MAGIC
                        if stored_before is not None:
                            mask &= entries["stored_at"] < stored_before
                        hits = np.flatnonzero(mask)
                        if len(hits) > limit:
                            ages = entries["stored_at"][hits]
                            hits = hits[np.argpartition(ages, limit - 1)[:limit]]
                        for n in hits.tolist():
                            age = float(entries["stored_at"][n])
                            gen = int(entries["generation"][n])
                            best.append((age, slot, first + n, gen))
                        best = heapq.nsmallest(limit, best)
            except _Dropped:
                continue
        return [
            PageRef(regions[slot].ns, index * regions[slot].ns.page_size, gen, age)
            for age, slot, index, gen in sorted(best)
        ]

    def budget_usage(self) -> tuple[int, int | None]:
        """Bytes of page data stored, and ``max_bytes``."""
        return self._used_bytes, self._config.max_bytes

    async def remove_if_generation(self, ns: PageNamespace, expected: Mapping[int, int]) -> int:
        self._check_writable()
        region = await self._region(ns, create=False)
        if region is None or not expected:
            return 0
        async with self._guard.hold(ns.key, expected.keys()):
            removed = await self._offload.run(self._remove, region, list(expected), expected)
            self._dirty.add(region)
        return removed
