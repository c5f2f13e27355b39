"""The file tier's batched paths (file_codec.py): sealing a put's batch, and opening a
get's entries with numpy, which must accept and refuse exactly what PageCodec does."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import random
from pathlib import Path

import pytest
from file_layout import flip, region_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd.kernel import COPY_SLICE_BYTES
from wsd.storage import FileStoreConfig, IntegrityError, PageNamespace, PageNotFound
from wsd.storage.conformance import sample_page, sample_pages
from wsd.storage.file_codec import VECTOR_PAGES, FileCodec
from wsd.storage.file_format import ENTRY_BYTES, ENTRY_FIELDS, INDEX_BASE, pwrite_pages, runs
from wsd.storage.file_store import FileStore
from wsd.storage.record import (
    MAGIC,
    VERSION,
    PageCodec,
    PayloadKind,
    identity,
    payload_checksum,
)

NS = PageNamespace("vm-batch", 3)
KEY = bytes(range(32))
P = 4096
MANY = 4 * VECTOR_PAGES


async def _store(root: Path, key: bytes | None = None) -> FileStore:
    return await FileStore.open(FileStoreConfig(root=root), key=key)


async def _synced(root: Path, key: bytes | None = None) -> tuple[FileStore, dict[int, bytes]]:
    """A store holding MANY random pages, synced, so tests can damage the files."""
    store = await _store(root, key)
    pages = {n * P: os.urandom(P) for n in range(MANY)}
    await store.put(NS, pages, generation=1)
    await store.sync()
    return store, pages


def _mixed(count: int, *, first: int = 0, seed: int = 1) -> dict[int, bytes]:
    """Zero, fill, text and random pages, so every batch has both entry kinds."""
    return sample_pages(random.Random(seed), count, first=first)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
def test_seal_lays_out_exactly_the_records_of_the_record_codec(key: bytes | None) -> None:
    pages = _mixed(40)
    pages.update(_mixed(10, first=100 * P, seed=2))  # a second run
    gens = {offset: 5 + n for n, offset in enumerate(pages)}
    nonces = os.urandom(12 * len(pages))
    batch = FileCodec(backend="file", key=key, random_bytes=io.BytesIO(nonces).read).seal(
        NS, pages, gens, 1234.5
    )
    codec = PageCodec(backend="file", key=key, random_bytes=io.BytesIO(nonces).read)
    records = [(o, codec.seal(NS, o, gens[o], pages[o])) for o in sorted(pages)]
    assert batch.indexes == [o // P for o, _ in records]
    assert batch.kinds == [r.kind for _, r in records]
    entries = b""
    for _, r in records:
        tail = r.payload[P:] if r.kind == PayloadKind.DATA else r.payload
        fields = (MAGIC, VERSION, r.kind, r.flags, r.generation, r.checksum, r.nonce)
        entries += ENTRY_FIELDS.pack(*fields, len(tail), tail, 1234.5)
    assert batch.entries == entries
    data = [(o // P, r.payload[:P]) for o, r in records if r.kind == PayloadKind.DATA]
    assert batch.data_indexes == [i for i, _ in data]
    assert [bytes(d) for d in batch.data] == [d for _, d in data]
    if key is None:  # plaintext pages are written from the caller's bytes, uncopied
        assert all(d is pages[i * P] for i, d in zip(batch.data_indexes, batch.data, strict=True))


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_batched_and_single_gets_agree(tmp_path: Path, key: bytes | None) -> None:
    store = await _store(tmp_path, key)
    pages = _mixed(3 * MANY)
    gens = {offset: n for n, offset in enumerate(pages)}
    await store.put(NS, pages, generation=gens)
    wanted = list(pages)
    random.Random(3).shuffle(wanted)
    wanted = wanted[: 2 * MANY]
    found = await store.get_many(NS, wanted, generations={o: gens[o] for o in wanted})
    assert list(found) == wanted, "in the order asked for"
    for offset in wanted:
        single = await store.get(NS, offset, generation=gens[offset])
        assert found[offset] == single == (pages[offset], gens[offset])
    await store.close()


@pytest.mark.asyncio
async def test_gaps_misses_and_duplicates_in_a_batch(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    pages = {**_mixed(MANY), **_mixed(MANY, first=10 * MANY * P, seed=4)}
    await store.put(NS, pages, generation=1)
    missing = [MANY * P, (10 * MANY - 1) * P, 1000 * MANY * P]
    wanted = [*reversed(pages), *missing, *pages]
    found = await store.get_many(NS, wanted, missing_ok=True)
    assert list(found) == list(reversed(pages))
    assert {o: p.data for o, p in found.items()} == pages
    with pytest.raises(PageNotFound) as info:
        await store.get_many(NS, wanted)
    assert info.value.offsets == tuple(missing)
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_a_flipped_data_byte_fails_the_whole_batch(tmp_path: Path, key: bytes | None) -> None:
    store, pages = await _synced(tmp_path, key)
    victim = 7 * P
    flip(region_paths(tmp_path, NS)[0], victim + 1000)
    with pytest.raises(IntegrityError) as info:
        await store.get_many(NS, list(pages))
    err = info.value
    assert (err.offset, err.vm_id, err.region, err.backend) == (victim, NS.vm_id, NS.region, "file")
    assert "checksum mismatch" in err.reason
    assert err.expected is not None and err.actual is not None
    rest = [o for o in pages if o != victim]
    assert {o: p.data for o, p in (await store.get_many(NS, rest)).items()} == {
        o: pages[o] for o in rest
    }
    assert (await store.stats()).counters.integrity_errors == 1
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
@pytest.mark.parametrize("position", [0, 2, 3, 4, 5, 8, 16, 24, 35, 36, 37, 45])
async def test_every_entry_field_is_checked_in_a_batch(
    tmp_path: Path, position: int, key: bytes | None
) -> None:
    """magic, version, kind, flags, padding, generation, checksum, nonce, tail length,
    fill byte and GCM tag: a flipped bit in any of them fails the batch, never a wrong
    page."""
    store = await _store(tmp_path, key)
    pages = _mixed(MANY)
    await store.put(NS, pages, generation=1)
    # A random page; for the tail (37) page 1, a fill page. Position 45 is in a data
    # page's GCM tag with AES; without, in a fill page's tail past its length, which
    # PageCodec ignores too, like the padding (5).
    plain_tail = position == 45 and key is None
    victim = 1 * P if position == 37 or plain_tail else 7 * P
    index_path = region_paths(tmp_path, NS)[1]
    flip(index_path, INDEX_BASE + victim // P * ENTRY_BYTES + position)
    if position == 5 or plain_tail:  # ignored, like PageCodec does: the page is intact
        assert (await store.get_many(NS, list(pages)))[victim].data == pages[victim]
    else:
        with pytest.raises(IntegrityError) as info:
            await store.get_many(NS, list(pages))
        assert info.value.offset == victim
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_a_stale_generation_in_a_batch(tmp_path: Path, key: bytes | None) -> None:
    store = await _store(tmp_path, key)
    pages = _mixed(MANY)
    await store.put(NS, pages, generation=4)
    expected = dict.fromkeys(pages, 4)
    expected[9 * P] = 5
    with pytest.raises(IntegrityError, match="stale") as info:
        await store.get_many(NS, list(pages), generations=expected)
    assert (info.value.offset, info.value.expected, info.value.actual) == (9 * P, 5, 4)
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
async def test_a_record_moved_within_a_batch_is_refused(tmp_path: Path, key: bytes | None) -> None:
    store, pages = await _synced(tmp_path, key)
    data_path, index_path = region_paths(tmp_path, NS)
    with data_path.open("r+b") as data, index_path.open("r+b") as index:
        data.seek(2 * P)
        page = data.read(P)
        index.seek(INDEX_BASE + 2 * ENTRY_BYTES)
        entry = index.read(ENTRY_BYTES)
        data.seek(3 * P)
        data.write(page)
        index.seek(INDEX_BASE + 3 * ENTRY_BYTES)
        index.write(entry)
    with pytest.raises(IntegrityError, match="checksum") as info:
        await store.get_many(NS, list(pages))
    assert info.value.offset == 3 * P
    await store.close()


@pytest.mark.asyncio
async def test_a_moved_encrypted_record_with_a_recomputed_checksum_is_refused(
    tmp_path: Path,
) -> None:
    """The checksum is unkeyed: whoever moves a record can recompute it, and only the
    GCM tag, bound to the offset, then refuses the page (the batch falls back to the
    per-record codec, which names it)."""
    store, pages = await _synced(tmp_path, KEY)
    data_path, index_path = region_paths(tmp_path, NS)
    with data_path.open("r+b") as data, index_path.open("r+b") as index:
        data.seek(2 * P)
        page = data.read(P)
        index.seek(INDEX_BASE + 2 * ENTRY_BYTES)
        entry = bytearray(index.read(ENTRY_BYTES))
        fields = ENTRY_FIELDS.unpack(entry)
        kind, flags, generation, tail = fields[2], fields[3], fields[4], fields[8]
        ident = identity(NS, 3 * P, generation, kind, flags)
        entry[16:24] = payload_checksum(page + tail[:16], ident).to_bytes(8, "little")
        data.seek(3 * P)
        data.write(page)
        index.seek(INDEX_BASE + 3 * ENTRY_BYTES)
        index.write(entry)
    with pytest.raises(IntegrityError, match="AES-GCM authentication failed") as info:
        await store.get_many(NS, list(pages))
    assert info.value.offset == 3 * P
    await store.close()


@pytest.mark.asyncio
async def test_a_truncated_data_file_is_an_integrity_error(tmp_path: Path) -> None:
    store, pages = await _synced(tmp_path)
    os.truncate(region_paths(tmp_path, NS)[0], (MANY - 3) * P + 100)
    with pytest.raises(IntegrityError, match="checksum") as info:
        await store.get_many(NS, list(pages))
    assert info.value.offset == (MANY - 3) * P
    head = list(pages)[: MANY - 3]
    assert len(await store.get_many(NS, head)) == len(head)
    await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("page_size", [64 * 1024, 2 * 1024 * 1024])
async def test_batches_of_larger_pages(tmp_path: Path, page_size: int) -> None:
    """64 KiB pages read several to a chunk, 2 MiB pages one to a chunk."""
    ns = PageNamespace("vm-big", 0, page_size)
    store = await _store(tmp_path)
    pages = sample_pages(random.Random(5), VECTOR_PAGES + 2, size=page_size)
    del pages[3 * page_size]
    await store.put(ns, pages, generation=2)
    found = await store.get_many(ns, list(reversed(pages)))
    assert {o: (p.data, p.generation) for o, p in found.items()} == {
        o: (d, 2) for o, d in pages.items()
    }
    await store.close()


# -- model-based: batches large enough for the numpy paths, against a dict -------------

_OFFSETS = st.integers(min_value=0, max_value=95).map(lambda n: n * P)
_BATCH = st.dictionaries(_OFFSETS, st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=40)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _BATCH),
        st.tuples(st.just("discard"), st.lists(_OFFSETS, max_size=20)),
        st.tuples(st.just("get"), st.lists(_OFFSETS, min_size=1, max_size=60)),
        st.tuples(st.just("reopen"), st.none()),
    ),
    min_size=1,
    max_size=15,
)
_counter = itertools.count()


async def _run_model(root: Path, key: bytes | None, ops: list[tuple[str, object]]) -> None:
    rng = random.Random(0)
    model: dict[int, tuple[bytes, int]] = {}
    store = await _store(root, key)
    try:
        for generation, (op, arg) in enumerate(ops, start=1):
            if op == "put":
                assert isinstance(arg, dict)
                batch = {o: sample_page(rng, P, flavour) for o, flavour in arg.items()}
                await store.put(NS, batch, generation=generation)
                model.update({o: (d, generation) for o, d in batch.items()})
            elif op == "discard":
                assert isinstance(arg, list)
                await store.discard(NS, arg)
                for o in arg:
                    model.pop(o, None)
            elif op == "get":
                assert isinstance(arg, list)
                expected = {o: model[o] for o in arg if o in model}
                gens = {o: g for o, (_, g) in expected.items()}
                found = await store.get_many(NS, arg, generations=gens, missing_ok=True)
                assert list(found) == list(expected), "order of the request"
                assert {o: (p.data, p.generation) for o, p in found.items()} == expected
            else:
                await store.sync()
                await store.close()
                store = await _store(root, key)
    finally:
        await store.close()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "aes"])
def test_model_with_large_batches(
    key: bytes | None, ops: list[tuple[str, object]], tmp_path: Path
) -> None:
    root = tmp_path / f"example-{next(_counter)}"
    root.mkdir()
    asyncio.run(_run_model(root, key, ops))


def test_runs_of_one_contiguous_batch() -> None:
    assert runs(list(range(5, 600)), limit=256) == [(5, 256), (261, 256), (517, 83)]
    assert runs([7]) == [(7, 1)]
    assert runs([]) == []


def test_fill_pages_share_one_zero_page(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await _store(tmp_path)
        await store.put(NS, {n * P: bytes(P) for n in range(MANY)}, generation=1)
        found = await store.get_many(NS, [n * P for n in range(MANY)])
        assert len({id(p.data) for p in found.values()}) == 1
        assert all(p.data == bytes(P) for p in found.values())
        await store.close()

    asyncio.run(scenario())


def test_a_batch_is_written_in_bounded_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of consecutive pages is written COPY_SLICE_BYTES at a time: on a
    kernel without full preemption one long copy kept the fault service off
    its CPU (wsd.kernel.COPY_SLICE_BYTES)."""
    ps = 4096
    indexes = [*range(0, 300), *range(400, 401), *range(500, 700)]
    pages = [bytes([k % 251]) * ps for k in range(len(indexes))]
    pwritev, written = os.pwritev, []

    def recording(fd: int, buffers: list[bytes], offset: int) -> int:
        written.append(sum(map(len, buffers)))
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", recording)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_pages(fd, pages, indexes)
        assert max(written) == COPY_SLICE_BYTES and sum(written) == len(pages) * ps
        for k, index in enumerate(indexes):
            assert os.pread(fd, ps, index * ps) == pages[k]
    finally:
        os.close(fd)
