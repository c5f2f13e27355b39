"""Key layout and the two ways of talking to Redis: one server, or a Redis Cluster.

Key of a page (the Redis value is a sealed record, see ``record.py``)::

    <prefix>:{<vm_id>:<region>:<group>}:<page offset in hex>

``group`` is the page index divided by ``slot_group_pages``. The braces are a Redis
Cluster hash tag: the pages of one group share a hash slot, so a batch of nearby pages
is stored by one atomic MSET on one node, while a large region still spreads over many
slots (and nodes) instead of piling onto one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from wsd.storage.page import PageNamespace


def page_key(prefix: str, ns: PageNamespace, offset: int, group_pages: int) -> bytes:
    """The Redis key of one page."""
    group = offset // ns.page_size // group_pages
    return f"{prefix}:{{{ns.vm_id}:{ns.region}:{group}}}:{offset:x}".encode("ascii")


def region_pattern(prefix: str, ns: PageNamespace) -> bytes:
    """A SCAN MATCH pattern for every key of one region (and no other region or VM)."""
    return f"{prefix}:{{{ns.vm_id}:{ns.region}:*".encode("ascii")


def group_by_slot(keys: Sequence[bytes]) -> dict[int, list[int]]:
    """Positions of ``keys`` grouped by Redis Cluster hash slot, in order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        groups[key_slot(key)].append(position)
    return dict(groups)


class RedisTransport(Protocol):
    """The handful of commands the Redis tier needs. Errors are redis-py's; the store
    translates them."""

    async def mset(self, chunks: Sequence[Mapping[bytes, bytes]]) -> None:
        """Store every chunk. One server: all chunks in one MULTI/EXEC, so the whole
        batch is applied or none of it. Cluster: one MSET per hash slot, each atomic."""
        ...

    async def mget(self, chunks: Sequence[Sequence[bytes]]) -> list[bytes | None]:
        """Values of the keys of every chunk, flattened in order (None when absent)."""
        ...

    async def delete(self, keys: Sequence[bytes]) -> None:
        """Delete keys; absent keys are ignored."""
        ...

    async def scan(self, pattern: bytes) -> list[bytes]:
        """Every key matching ``pattern``, on every node."""
        ...

    async def barrier(self, replicas: int, timeout_ms: int) -> int:
        """Write a marker and WAIT for replicas; return how many acknowledged it."""
        ...

    async def ping(self) -> None:
        """Check the server answers."""
        ...

    async def close(self) -> None:
        """Close the connections."""
        ...


class StandaloneTransport:
    """One Redis or Valkey server (or a primary with replicas)."""

    def __init__(self, client: Redis, *, barrier_key: bytes) -> None:
        self._client = client
        self._barrier_key = barrier_key

    async def mset(self, chunks: Sequence[Mapping[bytes, bytes]]) -> None:
        if len(chunks) == 1:
            await self._client.mset(dict(chunks[0]))
            return
        async with self._client.pipeline(transaction=True) as pipe:
            for chunk in chunks:
                pipe.mset(dict(chunk))
            await pipe.execute()

    async def mget(self, chunks: Sequence[Sequence[bytes]]) -> list[bytes | None]:
        if len(chunks) == 1:
            # decode_responses is off, so values are bytes.
            return cast(list[bytes | None], await self._client.mget(list(chunks[0])))
        async with self._client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.mget(list(chunk))
            replies = await pipe.execute()
        return [value for reply in replies for value in reply]

    async def delete(self, keys: Sequence[bytes]) -> None:
        for start in range(0, len(keys), 1024):
            await self._client.delete(*keys[start : start + 1024])

    async def scan(self, pattern: bytes) -> list[bytes]:
        return [key async for key in self._client.scan_iter(match=pattern, count=1024)]

    async def barrier(self, replicas: int, timeout_ms: int) -> int:
        # WAIT covers the writes of its own connection only, and a pool spreads writes
        # over several. A fresh write on the WAIT's connection has a replication offset
        # at least that of every write acknowledged before it, whichever connection
        # carried those, so waiting for this one write waits for all of them.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._barrier_key, os.urandom(8))
            pipe.wait(replicas, timeout_ms)
            _, acknowledged = await pipe.execute()
        return int(acknowledged)

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


class ClusterTransport:
    """A Redis Cluster: commands are split by hash slot and pipelined to the owners."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    # redis-py's cluster pipeline refuses its mset/mget helpers outright, since their
    # keys may span slots; raw commands are routed by slot and these never span one.

    async def mset(self, chunks: Sequence[Mapping[bytes, bytes]]) -> None:
        async with self._client.pipeline() as pipe:
            for chunk in chunks:
                keys = list(chunk)
                for positions in group_by_slot(keys).values():
                    pairs = [part for p in positions for part in (keys[p], chunk[keys[p]])]
                    pipe.execute_command("MSET", *pairs)
            await pipe.execute()

    async def mget(self, chunks: Sequence[Sequence[bytes]]) -> list[bytes | None]:
        keys = [key for chunk in chunks for key in chunk]
        groups = list(group_by_slot(keys).values())
        async with self._client.pipeline() as pipe:
            for positions in groups:
                pipe.execute_command("MGET", *(keys[p] for p in positions))
            replies = await pipe.execute()
        values: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(groups, replies, strict=True):
            for position, value in zip(positions, reply, strict=True):
                values[position] = value
        return values

    async def delete(self, keys: Sequence[bytes]) -> None:
        async with self._client.pipeline() as pipe:
            for positions in group_by_slot(keys).values():
                pipe.execute_command("DEL", *(keys[p] for p in positions))
            await pipe.execute()

    async def scan(self, pattern: bytes) -> list[bytes]:
        return [key async for key in self._client.scan_iter(match=pattern, count=1024)]

    async def barrier(self, replicas: int, timeout_ms: int) -> int:
        # Refused by the configuration model; see docs/storage.md.
        raise NotImplementedError("WAIT barriers are not implemented for Redis Cluster")

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()
