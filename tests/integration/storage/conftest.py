"""Fixtures for storage tests against a real redis-server (see redis_server.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import REDIS_SERVER, RedisServer


def _require_redis() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"redis-server is not installed at {REDIS_SERVER} (tools/bootstrap.sh)")


@contextlib.contextmanager
def _running(directory: Path) -> Iterator[RedisServer]:
    _require_redis()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for a whole module; tests keep apart with their own key prefix."""
    with _running(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, free to be killed and restarted."""
    with _running(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses on a shared server."""
    return f"t{uuid.uuid4().hex[:12]}"
