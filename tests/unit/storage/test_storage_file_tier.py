"""The file tier on a local directory: layout, corruption, swaps and replays, ownership."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
from file_layout import flip, region_paths
from structlog.testing import capture_logs

from wsd.storage import (
    BudgetExceeded,
    EncryptionKeyError,
    FileStoreConfig,
    IntegrityError,
    InvalidPage,
    PageNamespace,
    StorageError,
)
from wsd.storage.file_format import ENTRY, ENTRY_BYTES, INDEX_BASE, runs
from wsd.storage.file_store import FileStore
from wsd.storage.record import PayloadKind, SealedRecord, identity, payload_checksum

NS = PageNamespace("vm1", 0)
KEY = bytes(range(32))
P = 4096


def _paths(root: Path, ns: PageNamespace = NS) -> tuple[Path, Path]:
    return region_paths(root, ns)


def _entry_at(offset: int) -> int:
    return INDEX_BASE + offset // P * ENTRY_BYTES


def _read_record(root: Path, offset: int) -> tuple[SealedRecord, int, bytes, float]:
    """The record of one page as the file tier stored it (header, data, tail)."""
    data_path, index_path = _paths(root)
    with index_path.open("rb") as f:
        f.seek(_entry_at(offset))
        header, tail_len, tail, stored_at = ENTRY.unpack(f.read(ENTRY_BYTES))
    with data_path.open("rb") as f:
        f.seek(offset)
        data = f.read(P)
    record = SealedRecord.from_parts(header, data + tail[:tail_len])
    return record, tail_len, tail, stored_at


def _write_record(root: Path, offset: int, record: SealedRecord, stored_at: float = 0.0) -> None:
    data_path, index_path = _paths(root)
    tail = record.payload[P:]
    with data_path.open("r+b") as f:
        f.seek(offset)
        f.write(record.payload[:P])
    with index_path.open("r+b") as f:
        f.seek(_entry_at(offset))
        f.write(ENTRY.pack(record.header(), len(tail), tail, stored_at))


async def _store(root: Path, key: bytes | None = None, **options: object) -> FileStore:
    return await FileStore.open(FileStoreConfig(root=root, **options), key=key)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_layout_is_sparse_and_page_aligned(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    page = os.urandom(P)
    await store.put(NS, {1000 * P: page, 0: bytes(P)}, generation=1)
    await store.sync()
    data_path, index_path = _paths(tmp_path)
    with data_path.open("rb") as f:
        f.seek(1000 * P)
        assert f.read(P) == page
    assert data_path.stat().st_blocks * 512 <= 2 * P, "zero page and gap take no space"
    assert index_path.stat().st_size == INDEX_BASE + 1001 * ENTRY_BYTES
    stats = await store.stats()
    assert (stats.pages, stats.stored_bytes, stats.logical_bytes) == (2, P, 2 * P)
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_flipped_data_byte_fails_loudly(tmp_path: Path, key: bytes | None) -> None:
    store = await _store(tmp_path, key)
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    await store.sync()
    flip(_paths(tmp_path)[0], 123)
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        await store.get(NS, 0)
    err = info.value
    assert (err.vm_id, err.region, err.offset, err.backend) == ("vm1", 0, 0, "file")
    assert err.expected is not None and err.actual is not None
    with pytest.raises(IntegrityError):
        await store.get_many(NS, [0, P])
    assert len((await store.get(NS, P)).data) == P
    assert (await store.stats()).counters.integrity_errors == 2
    # A fault's get on the event loop refuses it the same way.
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        store.get_inline(NS, 0, generation=1)
    assert (info.value.vm_id, info.value.offset) == ("vm1", 0)
    page = store.get_inline(NS, P, generation=1)
    assert page is not None and len(page.data) == P
    assert (await store.stats()).counters.integrity_errors == 3
    await store.close()


@pytest.mark.asyncio
async def test_flipped_index_byte_fails_loudly(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    for position in (0, 3, 8, 16, 36):  # magic, kind, generation, checksum, tail length
        await store.put(NS, {0: os.urandom(P)}, generation=1)
        flip(_paths(tmp_path)[1], _entry_at(0) + position)
        with pytest.raises(IntegrityError):
            await store.get(NS, 0)
        with pytest.raises(IntegrityError):
            store.get_inline(NS, 0)
    await store.close()


@pytest.mark.asyncio
async def test_gcm_tag_catches_tampering_with_a_fixed_checksum(tmp_path: Path) -> None:
    store = await _store(tmp_path, KEY)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    await store.sync()
    record, *_ = _read_record(tmp_path, 0)
    payload = bytearray(record.payload)
    payload[42] ^= 0x10
    ident = identity(NS, 0, record.generation, record.kind, record.flags)
    forged = SealedRecord(
        record.kind,
        record.flags,
        record.generation,
        payload_checksum(bytes(payload), ident),
        record.nonce,
        bytes(payload),
    )
    _write_record(tmp_path, 0, forged)
    with pytest.raises(IntegrityError, match="AES-GCM authentication failed"):
        await store.get(NS, 0)
    await store.close()


def _rebind(record: SealedRecord, offset: int) -> SealedRecord:
    """Recompute the checksum for another offset, as an attacker without the key can."""
    ident = identity(NS, offset, record.generation, record.kind, record.flags)
    checksum = payload_checksum(record.payload, ident)
    return SealedRecord(
        record.kind, record.flags, record.generation, checksum, record.nonce, record.payload
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_swapped_records_are_detected(tmp_path: Path, key: bytes | None) -> None:
    store = await _store(tmp_path, key)
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P)}, generation=1)
    await store.sync()
    a, *_ = _read_record(tmp_path, 0)
    b, *_ = _read_record(tmp_path, P)
    _write_record(tmp_path, 0, b)
    _write_record(tmp_path, P, a)
    for offset in (0, P):
        with pytest.raises(IntegrityError, match="checksum"):
            await store.get(NS, offset)
    if key is not None:
        # With the checksums recomputed for their new places, only GCM can tell.
        _write_record(tmp_path, 0, _rebind(b, 0))
        _write_record(tmp_path, P, _rebind(a, P))
        for offset in (0, P):
            with pytest.raises(IntegrityError, match="AES-GCM"):
                await store.get(NS, offset)
    await store.close()


@pytest.mark.asyncio
async def test_replayed_old_generation_is_detected(tmp_path: Path) -> None:
    store = await _store(tmp_path, KEY)
    old_page, new_page = os.urandom(P), os.urandom(P)
    await store.put(NS, {0: old_page}, generation=1)
    old, *_ = _read_record(tmp_path, 0)
    await store.put(NS, {0: new_page}, generation=2)
    await store.sync()
    _write_record(tmp_path, 0, old)
    # An intact old record is authentic; the expected generation exposes the replay.
    with pytest.raises(IntegrityError, match="stale") as info:
        await store.get(NS, 0, generation=2)
    assert (info.value.expected, info.value.actual) == (2, 1)
    # Relabelling it as generation 2 breaks the AAD instead.
    ident = identity(NS, 0, 2, old.kind, old.flags)
    relabelled = SealedRecord(
        old.kind, old.flags, 2, payload_checksum(old.payload, ident), old.nonce, old.payload
    )
    _write_record(tmp_path, 0, relabelled)
    with pytest.raises(IntegrityError, match="AES-GCM"):
        await store.get(NS, 0)
    await store.close()


@pytest.mark.asyncio
async def test_key_mismatches_are_clear(tmp_path: Path) -> None:
    store = await _store(tmp_path, KEY)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    await store.close()
    with pytest.raises(EncryptionKeyError, match="another key"):
        await _store(tmp_path, bytes(32))
    with pytest.raises(EncryptionKeyError, match="no key is configured"):
        await _store(tmp_path)
    plain_root = tmp_path / "plain"
    store = await _store(plain_root)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    await store.close()
    with pytest.raises(EncryptionKeyError, match="without encryption"):
        await _store(plain_root, KEY)


@pytest.mark.asyncio
async def test_page_size_is_fixed_per_region(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    huge = PageNamespace("vm1", 0, 2 * 1024 * 1024)
    with pytest.raises(InvalidPage, match="page size 4096"):
        await store.put(huge, {0: bytes(huge.page_size)}, generation=1)
    await store.close()


@pytest.mark.asyncio
async def test_one_process_per_root(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    with pytest.raises(StorageError, match="in use by another process"):
        await _store(tmp_path)
    await store.close()
    await (await _store(tmp_path)).close()


@pytest.mark.asyncio
async def test_corrupt_superblock_is_refused(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    await store.close()
    flip(_paths(tmp_path)[1], 20)
    with pytest.raises(StorageError, match="superblock"):
        await _store(tmp_path)


@pytest.mark.asyncio
async def test_max_bytes_budget_counts_data_pages_only(tmp_path: Path) -> None:
    store = await _store(tmp_path, max_bytes=2 * P)
    await store.put(NS, {0: os.urandom(P), P: os.urandom(P), 2 * P: bytes(P)}, generation=1)
    with pytest.raises(BudgetExceeded) as info:
        await store.put(NS, {3 * P: os.urandom(P)}, generation=1)
    assert (info.value.budget_bytes, info.value.used_bytes) == (2 * P, 2 * P)
    assert not await store.get_many(NS, [3 * P], missing_ok=True), "nothing stored"
    await store.put(NS, {0: os.urandom(P)}, generation=2)  # overwrite needs no room
    await store.put(NS, {0: bytes(P)}, generation=3)  # zero page frees its data block
    await store.put(NS, {3 * P: os.urandom(P)}, generation=1)
    assert store.budget_usage() == (2 * P, 2 * P)
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_a_lone_fill_page_between_data_pages_is_stored_as_data_unless_encrypted(
    tmp_path: Path, key: bytes | None
) -> None:
    store = await _store(tmp_path, key)
    data, zeros, ones = os.urandom(P), bytes(P), b"\1" * P
    # 1: lone, between 0 and 2; 4 and 5: a hole of two pages; 8: lone but 7 is not in
    # the batch; 11: lone, between 10 and 12, whose neighbours are fills.
    pages = {0: data, 1: zeros, 2: data, 3: data, 4: zeros, 5: ones, 6: data, 8: zeros, 9: data}
    pages |= {10: data, 11: ones, 12: data, 13: ones}
    await store.put(NS, {n * P: page for n, page in pages.items()}, generation=1)
    as_data = {1, 11} if key is None else set()
    stored_data = {n for n in pages if pages[n] is data} | as_data
    for n, page in pages.items():
        record = _read_record(tmp_path, n * P)[0]
        kind = PayloadKind.DATA if n in stored_data else PayloadKind.FILL
        assert record.kind == kind, f"page {n}"
        assert (await store.get(NS, n * P)).data == page
    assert (await store.stats()).stored_bytes == len(stored_data) * P
    await store.close()
    store = await _store(tmp_path, key)
    assert (await store.stats()).stored_bytes == len(stored_data) * P, "counted on reopen"
    await store.close()


@pytest.mark.asyncio
async def test_discard_punches_data_and_stats_survive_reopen(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.put(NS, {n * P: os.urandom(P) for n in range(16)}, generation=1)
    await store.discard(NS, [n * P for n in range(8)])
    await store.close()
    data_path, _ = _paths(tmp_path)
    assert data_path.stat().st_blocks * 512 <= 8 * P
    store = await _store(tmp_path)
    stats = await store.stats()
    assert (stats.pages, stats.stored_bytes) == (8, 8 * P)
    await store.discard(NS)
    assert not data_path.exists()
    assert (await store.stats()).pages == 0
    await store.close()


@pytest.mark.asyncio
async def test_coldest_and_conditional_removal(tmp_path: Path) -> None:
    now = [100.0]
    config = FileStoreConfig(root=tmp_path)
    store = await FileStore.open(config, clock=lambda: now[0])
    other = PageNamespace("vm2", 7)
    for n in range(6):
        now[0] = 100.0 + n
        await store.put(NS if n % 2 else other, {n * P: os.urandom(P)}, generation=n)
    refs = await store.coldest(3)
    assert [(r.ns, r.offset, r.generation, r.stored_at) for r in refs] == [
        (other, 0, 0, 100.0),
        (NS, P, 1, 101.0),
        (other, 2 * P, 2, 102.0),
    ]
    assert [r.offset for r in await store.coldest(10, stored_before=102.0)] == [0, P]
    assert await store.remove_if_generation(NS, {P: 99, 3 * P: 3}) == 1
    assert [r.offset for r in await store.coldest(10)] == [0, P, 2 * P, 4 * P, 5 * P]
    await store.close()


@pytest.mark.parametrize("size", [0, 1, 5, 15, 16, 300])
def test_runs_split_consecutive_pages(size: int) -> None:
    rng = random.Random(size)
    indexes = sorted(rng.sample(range(size * 3 + 1), size))
    found = runs(indexes, limit=4)
    assert [first + n for first, count in found for n in range(count)] == indexes
    assert all(1 <= count <= 4 for _, count in found)
    for (first, count), (following, _) in itertools.pairwise(found):
        assert following >= first + count


@pytest.mark.asyncio
async def test_a_failed_fdatasync_poisons_the_store(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.put(NS, {0: os.urandom(P)}, generation=1)
    region = store._regions[NS.key]
    # fdatasync of a character device fails with EINVAL, like a disk error would.
    original, region.data_fd = region.data_fd, os.open("/dev/null", os.O_RDWR)
    os.close(original)
    with pytest.raises(StorageError, match="fdatasync of the data file failed") as info:
        await store.sync()
    assert info.value.vm_id == NS.vm_id
    # Retrying could "succeed" after the kernel dropped the dirty pages: refused.
    with pytest.raises(StorageError, match="an earlier sync failed"):
        await store.put(NS, {P: os.urandom(P)}, generation=1)
    with pytest.raises(StorageError, match="an earlier sync failed"):
        await store.sync()
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_a_cached_page_is_read_on_the_loop_and_anything_else_in_a_worker(
    tmp_path: Path, key: bytes | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One page in the page cache: no worker call.  Would block, or a short read
    (RWF_NOWAIT may stop where the cache does, which is not end of file): the
    worker's blocking read.  A filesystem without RWF_NOWAIT: workers from then on."""
    store = await _store(tmp_path, key)
    pages = {o * P: os.urandom(P) for o in range(4)}
    await store.put(NS, pages, generation=1)
    await store.sync()
    worker_calls = 0
    real_run = store._reads.run

    async def counting_run(*args: object, **kwargs: object) -> object:
        nonlocal worker_calls
        worker_calls += 1
        return await real_run(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store._reads, "run", counting_run)
    assert (await store.get(NS, 0)).data == pages[0]
    assert worker_calls == 0
    assert len(await store.get_many(NS, [P, 2 * P])) == 2
    assert worker_calls == 1  # a batch always goes to a worker

    real_preadv = os.preadv
    outcomes = iter(["eagain", "short"])

    def nowait_refuses(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            if next(outcomes, "eagain") == "short":
                return real_preadv(fd, [memoryview(buffers[0])[:100]], offset, flags)
            raise BlockingIOError(11, "would block")
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", nowait_refuses)
    assert (await store.get(NS, P)).data == pages[P]
    assert (await store.get(NS, 3 * P)).data == pages[3 * P]
    assert worker_calls == 3

    def unsupported(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "preadv", unsupported)
    with capture_logs() as logs:
        assert (await store.get(NS, 0)).data == pages[0]
        assert worker_calls == 4 and not store._nowait
        assert (await store.get(NS, P)).data == pages[P]
        assert worker_calls == 5
    said = [e for e in logs if "refuses RWF_NOWAIT" in e["event"]]
    assert len(said) == 1, logs  # once, when it turns the inline get off
    await store.close()
