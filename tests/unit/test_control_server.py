"""The control server against hostile clients: refusals before reading, bounds, timeouts.

A real socket in a temporary directory and a handler that echoes; the
server's timeout is cut to a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from wsd.access import AccessPolicy
from wsd.control import Request
from wsd.control.server import ControlServer
from wsd.vmm.limits import HandoffLimits

TIMEOUT = 0.3
STATUS = b'{"version":1,"command":"status"}\n'


async def echo(req: Request) -> dict[str, Any]:
    # Big enough that a peer that never reads fills its socket buffer soon.
    return {"command": str(req.command), "padding": "x" * 32768}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(
        tmp_path / "c.sock",
        echo,
        limits=HandoffLimits(max_pending_connections=3),
        timeout=TIMEOUT,
    )
    srv.listen()
    serving = asyncio.create_task(srv.serve())
    yield srv
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path), limit=1 << 20)


async def wait_for(cond: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_peer_not_allowed_is_refused_before_it_sends_anything(tmp_path: Path) -> None:
    only_someone_else = AccessPolicy(uids=frozenset({4242}))
    srv = ControlServer(tmp_path / "c.sock", echo, access=only_someone_else, timeout=TIMEOUT)
    srv.listen()
    serving = asyncio.create_task(srv.serve())
    try:
        reader, writer = await connect(srv.path)
        # Nothing sent: the refusal comes at once, not after a request or a timeout.
        reply = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT / 2))
        assert await reader.read() == b""
        writer.close()
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert reply["error"]["code"] == "forbidden"
    assert srv.refused["forbidden"] == 1


@pytest.mark.asyncio
async def test_connections_are_bounded_and_one_more_is_told_at_once(
    server: ControlServer,
) -> None:
    held = [await connect(server.path) for _ in range(3)]
    await wait_for(lambda: server.connections == 3)
    reader, writer = await connect(server.path)
    reply = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT / 2))
    writer.close()
    assert reply["error"]["code"] == "busy"
    assert "limits.max_pending_connections" in reply["error"]["message"]
    for _, w in held:
        w.close()
    await wait_for(lambda: server.connections == 0)
    reader, writer = await connect(server.path)
    writer.write(STATUS)
    assert json.loads(await reader.readline())["ok"] is True
    writer.close()


@pytest.mark.asyncio
async def test_silent_and_dribbling_clients_are_closed_after_the_timeout(
    server: ControlServer,
) -> None:
    silent_reader, silent = await connect(server.path)
    dribble_reader, dribble = await connect(server.path)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for byte in STATUS[:-1]:
        # A byte at a time does not extend the deadline.
        dribble.write(bytes([byte]))
        await asyncio.sleep(TIMEOUT / 10)
        if dribble.is_closing() or dribble_reader.at_eof():
            break
    assert await asyncio.wait_for(silent_reader.read(), 2 * TIMEOUT) == b""
    assert await asyncio.wait_for(dribble_reader.read(), 2 * TIMEOUT) == b""
    assert loop.time() - started < 4 * TIMEOUT
    silent.close()
    dribble.close()
    await wait_for(lambda: server.connections == 0)


@pytest.mark.asyncio
async def test_a_peer_that_never_reads_its_replies_is_let_go(server: ControlServer) -> None:
    before = open_fds()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.path))
        s.setblocking(False)
        # Requests keep coming, replies are never read: the server's send
        # blocks once the buffers are full, and gives up after the timeout.
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            async with asyncio.timeout(10):
                while True:
                    try:
                        sent += s.send(STATUS * 64)
                    except BlockingIOError:
                        await asyncio.sleep(TIMEOUT / 5)
        assert sent > 0
    await wait_for(lambda: server.connections == 0)
    await wait_for(lambda: open_fds() == before)
