"""The file tier on a full filesystem (a small tmpfs mounted for the test)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsd.storage import FileStoreConfig, PageNamespace, PageNotFound, StorageFull
from wsd.storage.file_store import FileStore

pytestmark = pytest.mark.integration

NS = PageNamespace("vm-full", 1)
P = 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs; needs root (CAP_SYS_ADMIN) to mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "wsd-enospc", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, bytes(range(32))], ids=["plain", "aes"])
async def test_full_filesystem(small_fs: Path, key: bytes | None) -> None:
    rng = random.Random(1)
    store = await FileStore.open(FileStoreConfig(root=small_fs / "pages"), key=key)
    acknowledged: dict[int, bytes] = {}
    failed: dict[int, bytes] = {}
    for n in range(1000):
        batch = {(n * 8 + i) * P: rng.randbytes(P) for i in range(8)}
        try:
            await store.put(NS, batch, generation=1)
            await store.sync()
        except StorageFull as err:
            assert not err.retryable and "No space left on device" in str(err)
            assert (err.vm_id, err.region, err.backend) == (NS.vm_id, NS.region, "file")
            failed = batch
            break
        acknowledged.update(batch)
    assert failed and acknowledged, "the filesystem filled up after some batches"

    # Nothing of the failed batch is served; everything acknowledged is intact.
    for offset in failed:
        with pytest.raises(PageNotFound):
            await store.get(NS, offset)
    found = await store.get_many(NS, list(acknowledged))
    assert {o: p.data for o, p in found.items()} == acknowledged

    # Zero pages need no data blocks, and freeing space makes puts work again.
    victims = list(acknowledged)[:16]
    await store.discard(NS, victims)
    for offset in victims:
        del acknowledged[offset]
    await store.put(NS, dict(list(failed.items())[:4]), generation=2)
    await store.sync()
    await store.close()

    store = await FileStore.open(FileStoreConfig(root=small_fs / "pages"), key=key)
    found = await store.get_many(NS, list(acknowledged))
    assert {o: p.data for o, p in found.items()} == acknowledged
    for offset, data in list(failed.items())[:4]:
        assert (await store.get(NS, offset, generation=2)).data == data
    await store.close()


@pytest.mark.asyncio
async def test_no_room_for_a_new_region(small_fs: Path) -> None:
    filler = small_fs / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError:
            pass
    store = await FileStore.open(FileStoreConfig(root=small_fs / "pages"))
    with pytest.raises(StorageFull):
        await store.put(NS, {0: os.urandom(P)}, generation=1)
    filler.unlink()
    await store.put(NS, {0: bytes(P)}, generation=1)
    await store.close()
