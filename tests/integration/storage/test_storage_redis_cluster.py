"""The Redis tier on a real three-node Redis Cluster (started for this module)."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer, free_cluster_port

from wsd.storage import PageNamespace, PageStore, parse_storage_config
from wsd.storage.conformance import CHECKS, Contract, sample_pages
from wsd.storage.registry import open_backend

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None or shutil.which("redis-server") is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")
    nodes = [
        RedisServer(
            tmp_path_factory.mktemp(f"node{n}"),
            port=free_cluster_port(),
            settings={"cluster-enabled": "yes", "cluster-config-file": "nodes.conf"},
        )
        for n in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [redis_cli, "--cluster", "create", *addresses, "--cluster-replicas", "0"],
            input="yes\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while True:
            states = []
            for node in nodes:
                with node.client() as client:
                    states.append(client.cluster("info")["cluster_state"])
            if all(state == "ok" for state in states):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"cluster did not become ready: {states}")
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def _contract(cluster: list[RedisServer], prefix: str) -> Contract:
    config = parse_storage_config(
        {
            "kind": "redis",
            "url": cluster[0].tcp_url,
            "cluster": True,
            "key_prefix": prefix,
            "slot_group_pages": 4,
        }
    )

    async def open_store() -> PageStore:
        return await open_backend(config, environ={})

    return Contract(open_store, durable=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("check", list(CHECKS))
async def test_contract_on_a_cluster(
    check: str, cluster: list[RedisServer], key_prefix: str
) -> None:
    await CHECKS[check](_contract(cluster, key_prefix))


@pytest.mark.asyncio
async def test_a_region_spreads_over_the_nodes(cluster: list[RedisServer], key_prefix: str) -> None:
    store = await _contract(cluster, key_prefix).open_store()
    ns = PageNamespace("vm-spread", 0)
    pages = sample_pages(random.Random(1), 256)
    await store.put(ns, pages, generation=1)
    counts = []
    for node in cluster:
        with redis.Redis(port=node.port) as client:
            counts.append(len(client.keys(f"{key_prefix}:*")))
    assert sum(counts) == 256 and sum(1 for c in counts if c) >= 2, counts
    await store.close()
