"""The backend contract (wsd.storage.conformance) against every backend, without servers.

Redis runs against an in-memory transport here; tests/integration/storage runs the
same checks against a real redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_fakes import FakeRedisServer, write_key

from wsd.storage import (
    EncryptionConfig,
    FileStoreConfig,
    InlineGet,
    IntegrityError,
    PageNamespace,
    PageNotFound,
    PageStore,
    RedisStoreConfig,
    SecretSource,
    TieredStoreConfig,
    ZstdStoreConfig,
)
from wsd.storage.conformance import CHECKS, Contract, sample_page
from wsd.storage.file_store import FileStore
from wsd.storage.redis_store import RedisStore
from wsd.storage.tiered_store import TieredStore
from wsd.storage.zstd_store import ZstdStore

Factory = Callable[[Path], Contract]


def _encryption(tmp_path: Path) -> EncryptionConfig:
    key_file = tmp_path / "aes.key"
    if not key_file.exists():
        write_key(key_file)
    return EncryptionConfig(key=SecretSource(file=key_file))


def _file(tmp_path: Path, *, encrypted: bool = False) -> Contract:
    encryption = _encryption(tmp_path) if encrypted else None
    config = FileStoreConfig(root=tmp_path / "pages", encryption=encryption)
    key = (tmp_path / "aes.key").read_bytes() if encrypted else None

    async def open_store() -> PageStore:
        return await FileStore.open(config, key=key)

    return Contract(open_store, durable=True)


def _zstd(tmp_path: Path) -> Contract:
    async def open_store() -> PageStore:
        return ZstdStore(ZstdStoreConfig(budget_bytes=64 * 1024 * 1024))

    return Contract(open_store, durable=False)


def _redis(tmp_path: Path, *, encrypted: bool = False) -> Contract:
    server = FakeRedisServer()
    key = write_key(tmp_path / "aes.key") if encrypted else None
    config = RedisStoreConfig(url="redis://127.0.0.1:1/0", slot_group_pages=4)

    async def open_store() -> PageStore:
        return RedisStore(config, server, key=key)

    return Contract(open_store, durable=True)


def _tiered(tmp_path: Path) -> Contract:
    """A small zstd budget so that the checks push pages through all three tiers."""
    server = FakeRedisServer()
    file_config = FileStoreConfig(root=tmp_path / "pages", max_bytes=5 * 2 * 1024 * 1024)
    zstd_config = ZstdStoreConfig(budget_bytes=3 * 1024 * 1024)
    redis_config = RedisStoreConfig(url="redis://127.0.0.1:1/0")
    config = TieredStoreConfig(tiers=[zstd_config, file_config, redis_config])

    async def open_store() -> PageStore:
        tiers: list[PageStore] = [
            ZstdStore(zstd_config, name="tiered/zstd"),
            await FileStore.open(file_config, name="tiered/file"),
            RedisStore(redis_config, server, name="tiered/redis"),
        ]
        return TieredStore(tiers, config)

    return Contract(open_store, durable=True)


BACKENDS: dict[str, Factory] = {
    "file": _file,
    "file-aes": lambda p: _file(p, encrypted=True),
    "zstd": _zstd,
    "redis-fake": _redis,
    "redis-fake-aes": lambda p: _redis(p, encrypted=True),
    "tiered": _tiered,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_contract(backend: str, check: str, tmp_path: Path) -> None:
    await CHECKS[check](BACKENDS[backend](tmp_path))


# -- model-based: random batches of puts, discards and gets against a dict -----------

_OFFSETS = st.integers(min_value=0, max_value=31).map(lambda n: n * 4096)
_PAGES = st.sampled_from([0, 1, 2, 3])  # flavour index into conformance.sample_page
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.dictionaries(_OFFSETS, _PAGES, min_size=1, max_size=8)),
        st.tuples(st.just("discard"), st.lists(_OFFSETS, max_size=6)),
        st.tuples(st.just("get"), st.lists(_OFFSETS, min_size=1, max_size=6)),
        st.tuples(st.just("reopen"), st.none()),
    ),
    min_size=1,
    max_size=25,
)
_counter = itertools.count()


async def _run_model(contract: Contract, ops: list[tuple[str, object]]) -> None:
    rng = random.Random(0)
    namespaces = [PageNamespace("vm-model-a", 0), PageNamespace("vm-model-b", 0)]
    model: dict[tuple[PageNamespace, int], tuple[bytes, int]] = {}
    store = await contract.open_store()
    generation = 0
    try:
        for step, (op, arg) in enumerate(ops):
            ns = namespaces[step % 2]
            if op == "put":
                assert isinstance(arg, dict)
                generation += 1
                batch = {o: sample_page(rng, 4096, f) for o, f in arg.items()}
                await store.put(ns, batch, generation=generation)
                model.update({(ns, o): (d, generation) for o, d in batch.items()})
            elif op == "discard":
                assert isinstance(arg, list)
                await store.discard(ns, arg)
                for o in arg:
                    model.pop((ns, o), None)
            elif op == "get":
                assert isinstance(arg, list)
                found = await store.get_many(ns, arg, missing_ok=True)
                expected = {o: model[(ns, o)] for o in arg if (ns, o) in model}
                assert {o: (p.data, p.generation) for o, p in found.items()} == expected
                for o in arg:
                    if (ns, o) not in model:
                        with pytest.raises(PageNotFound):
                            await store.get(ns, o)
            elif contract.durable:
                await store.sync()
                await store.close()
                store = await contract.open_store()
    finally:
        await store.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
@pytest.mark.parametrize("backend", ["file", "zstd", "redis-fake", "tiered"])
def test_model(backend: str, ops: list[tuple[str, object]], tmp_path: Path) -> None:
    # A fresh directory per example: tmp_path is shared by every example of the test.
    root = tmp_path / f"example-{next(_counter)}"
    root.mkdir()
    contract = BACKENDS[backend](root)
    run: Callable[[], Awaitable[None]] = lambda: _run_model(contract, ops)  # noqa: E731
    asyncio.run(run())


# -- InlineGet: the stores that can answer a fault's get on the calling thread -------


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["file", "file-aes", "zstd"])
async def test_get_inline_answers_at_once_or_says_to_wait(backend: str, tmp_path: Path) -> None:
    store = await BACKENDS[backend](tmp_path).open_store()
    assert isinstance(store, InlineGet)
    ns, p = PageNamespace("vm1", 0), 4096
    text = (b"the quick brown fox " * 205)[:p]
    await store.put(ns, {0: text, p: random.randbytes(p), 2 * p: bytes(p)}, generation=3)
    await store.sync()
    page = store.get_inline(ns, 0, generation=3)
    assert page is not None and page.data == text and page.generation == 3
    zero = store.get_inline(ns, 2 * p)
    assert zero is not None and zero.data == bytes(p)
    assert store.get_inline(ns, 3 * p) is None  # not stored: `get` raises PageNotFound
    assert store.get_inline(PageNamespace("vm2", 0), 0) is None  # nothing stored for it
    with pytest.raises(IntegrityError):
        store.get_inline(ns, p, generation=2)
    async with store._guard.hold(ns.key, [0]):  # type: ignore[attr-defined]
        assert store.get_inline(ns, 0) is None  # a writer holds it: `get` waits
    await store.close()
    assert store.get_inline(ns, 0) is None
