"""In-memory stand-ins for the storage tests: a Redis server, a clock, key files."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis.exceptions as rex


class FakeRedisServer:
    """A dict behind the RedisTransport interface; shared by every store opened on it,
    like a server. ``down`` makes every command fail as if the server were gone."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.down = False
        self.replicas = 0
        self.commands: list[tuple[str, int]] = []
        self.chunk_sizes: list[int] = []

    def _command(self, name: str, keys: int) -> None:
        if self.down:
            raise rex.ConnectionError("Error 111 connecting to fake. Connection refused.")
        self.commands.append((name, keys))

    async def mset(self, chunks: Sequence[Mapping[bytes, bytes]]) -> None:
        self._command("mset", sum(len(c) for c in chunks))
        self.chunk_sizes = [len(c) for c in chunks]
        for chunk in chunks:
            self.data.update(chunk)

    async def mget(self, chunks: Sequence[Sequence[bytes]]) -> list[bytes | None]:
        self._command("mget", sum(len(c) for c in chunks))
        self.chunk_sizes = [len(c) for c in chunks]
        return [self.data.get(key) for chunk in chunks for key in chunk]

    async def delete(self, keys: Sequence[bytes]) -> None:
        self._command("delete", len(keys))
        for key in keys:
            self.data.pop(key, None)

    async def scan(self, pattern: bytes) -> list[bytes]:
        self._command("scan", 0)
        # Redis globs and fnmatch agree on "*"; the patterns used contain no "[".
        return [k for k in self.data if fnmatch.fnmatchcase(k.decode(), pattern.decode())]

    async def barrier(self, replicas: int, timeout_ms: int) -> int:
        self._command("barrier", 0)
        return self.replicas

    async def ping(self) -> None:
        self._command("ping", 0)

    async def close(self) -> None:
        pass


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_key(path: Path, key: bytes | None = None, *, mode: int = 0o600) -> bytes:
    """Write a 32-byte key file with the given mode; returns the key."""
    key = os.urandom(32) if key is None else key
    path.write_bytes(key)
    path.chmod(mode)
    return key
