"""The backend contract (wsd.storage.conformance) against a real redis-server, and the
file and tiered stores on the real filesystem beside it."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from wsd.storage import PageNamespace, PageNotFound, PageStore, parse_storage_config
from wsd.storage.conformance import CHECKS, Contract, sample_page
from wsd.storage.registry import open_backend

pytestmark = pytest.mark.integration


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "aes.key"
    if not path.exists():
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    return path


def _contract(backend: str, server: RedisServer, prefix: str, tmp_path: Path) -> Contract:
    redis: dict[str, object] = {"kind": "redis", "url": server.unix_url, "key_prefix": prefix}
    aes = {"key": {"file": str(_key_file(tmp_path))}}
    tables: dict[str, dict[str, object]] = {
        "redis-unix": redis,
        "redis-tcp": {**redis, "url": server.tcp_url, "slot_group_pages": 4},
        "redis-aes": {**redis, "encryption": aes},
        "file": {"kind": "file", "root": str(tmp_path / "pages")},
        "tiered": {
            "kind": "tiered",
            "tiers": [
                {"kind": "zstd", "budget_bytes": "3MiB"},
                {"kind": "file", "root": str(tmp_path / "pages"), "max_bytes": "10MiB"},
                {**redis, "encryption": aes},
            ],
        },
    }
    config = parse_storage_config(tables[backend])

    async def open_store() -> PageStore:
        return await open_backend(config, environ={})

    return Contract(open_store, durable=True)


BACKENDS = ["redis-unix", "redis-tcp", "redis-aes", "file", "tiered"]


@pytest.mark.asyncio
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("backend", BACKENDS)
async def test_contract(
    backend: str, check: str, shared_redis: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    await CHECKS[check](_contract(backend, shared_redis, key_prefix, tmp_path))


_counter = itertools.count()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.dictionaries(
            st.integers(0, 63).map(lambda n: n * 4096), st.integers(0, 3), min_size=1, max_size=16
        ),
        min_size=1,
        max_size=6,
    ),
    drop=st.lists(st.integers(0, 63).map(lambda n: n * 4096), max_size=8),
)
def test_random_batches_against_a_dict(
    batches: list[dict[int, int]], drop: list[int], shared_redis: RedisServer, tmp_path: Path
) -> None:
    """Random batches, a discard and a reopen on a real server agree with a dict."""
    prefix = f"h{next(_counter)}x{os.getpid()}"
    contract = _contract("redis-aes", shared_redis, prefix, tmp_path)
    ns = PageNamespace("vm-model", 1)

    async def run() -> None:
        rng = random.Random(len(batches))
        model: dict[int, tuple[bytes, int]] = {}
        store = await contract.open_store()
        try:
            for generation, batch in enumerate(batches, 1):
                pages = {o: sample_page(rng, 4096, f) for o, f in batch.items()}
                await store.put(ns, pages, generation=generation)
                model.update({o: (d, generation) for o, d in pages.items()})
            await store.discard(ns, drop)
            for offset in drop:
                model.pop(offset, None)
            await store.sync()
        finally:
            await store.close()
        store = await contract.open_store()
        try:
            everything = [n * 4096 for n in range(64)]
            found = await store.get_many(ns, everything, missing_ok=True)
            assert {o: (p.data, p.generation) for o, p in found.items()} == model
            absent = [o for o in everything if o not in model]
            if absent:
                with pytest.raises(PageNotFound):
                    await store.get(ns, absent[0])
        finally:
            await store.close()

    asyncio.run(run())
