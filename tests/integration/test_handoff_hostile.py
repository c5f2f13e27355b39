"""Hostile clients of the hand-off socket: slow, many, greedy, flooding fds.

Each is refused with an error naming the limit, its fds are closed (counted in
/proc/self/fd; server and clients share this process) and the server goes on
accepting good hand-offs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from wsd.kernel import Userfaultfd, memfd_create, send_with_fds
from wsd.vmm.client import HandoffRefused, hand_off, read_reply
from wsd.vmm.limits import HandoffLimits
from wsd.vmm.protocol import ErrorCode, HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
MIB = 1 << 20
HOST = 0x7F0000000000


class StubSessions:
    def __init__(self) -> None:
        self.started: list[str] = []

    async def __call__(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        for fd in fds:
            os.close(fd)
        self.started.append(req.vm_id)

        async def close() -> None:
            pass

        return Accepted(accepted_reply(req, "stub"), close)


Serve = Callable[..., Awaitable[HandoffServer]]


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start a server with the given limits; stopped at the end of the test."""
    tasks: list[asyncio.Task[None]] = []

    async def start(**limits: Any) -> HandoffServer:
        srv = HandoffServer(tmp_path / "wsd.sock", StubSessions(), limits=HandoffLimits(**limits))
        srv.listen()
        tasks.append(asyncio.create_task(srv.serve()))
        return srv

    yield start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def message(vm_id: str = "vm-1", regions: int = 1, **over: Any) -> dict[str, Any]:
    size = 4 * MIB // regions
    msg: dict[str, Any] = {
        "type": "handoff",
        "version": 1,
        "vm_id": vm_id,
        "vmm_pid": os.getpid(),
        "regions": [
            {
                "guest_phys_addr": i * size,
                "host_virt_addr": HOST + i * size,
                "size": size,
                "fd_index": 1,
                "offset": i * size,
            }
            for i in range(regions)
        ],
    }
    msg.update(over)
    return msg


@pytest.fixture
def fds() -> Any:
    uffd = Userfaultfd.create()
    memfd = memfd_create("guest", size=4 * MIB)
    yield [uffd.fd, memfd]
    uffd.close()
    os.close(memfd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled(before: int, srv: HandoffServer) -> None:
    """Wait until the server is idle and holds no fd it did not hold before."""
    for _ in range(500):
        if open_fds() == before and srv.pending == 0:
            return
        await asyncio.sleep(0.01)
    assert open_fds() == before, "the server leaked fds"
    assert srv.pending == 0


async def refused(srv: HandoffServer, msg: dict[str, Any] | bytes, fds: list[int]) -> Any:
    with pytest.raises(HandoffRefused) as exc:
        await asyncio.to_thread(hand_off, srv.path, msg, fds)
    return exc.value


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


async def test_a_client_that_never_finishes_its_message_times_out(serve: Serve, fds) -> None:
    srv = await serve(message_timeout_seconds=0.3)
    before = open_fds()

    def slow() -> tuple[dict[str, Any], float]:
        with connect(srv.path) as s:
            send_with_fds(s, b'{"type": "handoff", "version": 1', fds)
            started = time.monotonic()
            return read_reply(s), time.monotonic() - started

    reply, waited = await asyncio.to_thread(slow)
    assert reply["error"]["code"] == "timeout"
    assert "no complete message within 0.3 s" in reply["error"]["message"]
    assert "limits.message_timeout_seconds" in reply["error"]["message"]
    assert waited < 3
    await settled(before, srv)
    assert srv.refused[ErrorCode.TIMEOUT] == 1
    ok, conn = await asyncio.to_thread(hand_off, srv.path, message(), fds)
    conn.close()
    assert ok["type"] == "accepted"


async def test_a_client_dribbling_bytes_is_bounded_by_the_total_time(serve: Serve) -> None:
    srv = await serve(message_timeout_seconds=0.5)

    def dribble() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        with connect(srv.path) as s:
            s.setblocking(False)
            for byte in b'{"type": "handoff", "version": 1, "vm_id": "slow", ' * 10:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    break  # the server has answered and closed
                time.sleep(0.02)
                if time.monotonic() - started > 5:
                    break
            s.setblocking(True)
            return read_reply(s), time.monotonic() - started

    reply, waited = await asyncio.to_thread(dribble)
    assert reply["error"]["code"] == "timeout"
    assert waited < 3


async def test_a_silent_client_times_out(serve: Serve) -> None:
    srv = await serve(message_timeout_seconds=0.2)

    def silent() -> dict[str, Any]:
        with connect(srv.path) as s:
            return read_reply(s)

    reply = await asyncio.to_thread(silent)
    assert reply["error"]["code"] == "timeout"
    assert "got 0 bytes" in reply["error"]["message"]


async def test_pending_connections_are_bounded(serve: Serve, fds) -> None:
    srv = await serve(max_pending_connections=2, message_timeout_seconds=1.0)
    idle = [await asyncio.to_thread(connect, srv.path) for _ in range(2)]
    try:
        for _ in range(100):
            if srv.pending == 2:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        err = await refused(srv, message(), fds)
        # Refused at once, not after the idle ones time out.
        assert time.monotonic() - started < 0.9
        assert err.code == "limit_exceeded"
        assert "2 hand-offs (limits.max_pending_connections)" in str(err)
        assert srv.refused[ErrorCode.LIMIT] == 1
    finally:
        for s in idle:
            s.close()
    for _ in range(300):
        if srv.pending == 0:
            break
        await asyncio.sleep(0.01)
    ok, conn = await asyncio.to_thread(hand_off, srv.path, message(), fds)
    conn.close()
    assert ok["type"] == "accepted"


async def test_sessions_are_bounded(serve: Serve, fds) -> None:
    srv = await serve(max_sessions=2)
    conns = []
    for i in range(2):
        _, conn = await asyncio.to_thread(hand_off, srv.path, message(f"vm-{i}"), fds)
        conns.append(conn)
    before = open_fds()
    err = await refused(srv, message("vm-3"), fds)
    assert err.code == "limit_exceeded"
    assert "already runs 2 sessions (limits.max_sessions)" in str(err)
    await settled(before, srv)
    conns.pop().close()
    for _ in range(300):
        if srv.sessions == 1:
            break
        await asyncio.sleep(0.01)
    _, conn = await asyncio.to_thread(hand_off, srv.path, message("vm-3"), fds)
    conns.append(conn)
    for c in conns:
        c.close()


async def test_regions_and_guest_bytes_per_session_are_bounded(serve: Serve, fds) -> None:
    srv = await serve(max_regions_per_session=2, max_guest_bytes_per_session=2 * MIB)
    err = await refused(srv, message(regions=4), fds)
    assert err.code == "limit_exceeded" and err.field == "regions"
    assert "4 regions exceed limits.max_regions_per_session (2)" in str(err)
    err = await refused(srv, message(regions=1), fds)
    assert err.code == "limit_exceeded"
    assert f"add up to {4 * MIB} bytes, more than limits.max_guest_bytes_per_session" in str(err)


async def test_many_concurrent_clients_each_get_an_answer(serve: Serve, fds) -> None:
    """More clients at once than the limits allow: some refused, none hung, none lost."""
    srv = await serve(max_pending_connections=8, max_sessions=20)
    before = open_fds()

    def client(i: int) -> tuple[str, socket.socket | None]:
        try:
            _, conn = hand_off(srv.path, message(f"vm-{i}"), fds)
        except HandoffRefused as e:
            assert e.code == "limit_exceeded", e
            return "refused", None
        return "accepted", conn

    results = await asyncio.gather(*(asyncio.to_thread(client, i) for i in range(60)))
    outcomes = [r for r, _ in results]
    assert outcomes.count("accepted") <= 20
    assert outcomes.count("accepted") + outcomes.count("refused") == 60
    for _, conn in results:
        if conn is not None:
            conn.close()
    for _ in range(500):
        if srv.sessions == 0 and srv.pending == 0 and open_fds() == before:
            break
        await asyncio.sleep(0.01)
    assert (srv.sessions, srv.pending) == (0, 0)
    assert open_fds() == before


async def test_an_fd_flood_over_several_writes_is_refused_and_closed(serve: Serve, fds) -> None:
    srv = await serve()
    before = open_fds()

    def flood() -> dict[str, Any]:
        with connect(srv.path) as s:
            # 40 + 40 fds: each write is under the per-message cap, the total is not.
            send_with_fds(s, b'{"type": "handoff", ', [fds[1]] * 40)
            send_with_fds(s, b'"version": 1}', [fds[1]] * 40)
            send_with_fds(s, b"\n", [fds[1]] * 40)
            return read_reply(s)

    reply = await asyncio.to_thread(flood)
    assert reply["error"]["code"] == "bad_fds"
    assert "more than 64 file descriptors attached" in reply["error"]["message"]
    await settled(before, srv)


@pytest.mark.parametrize("kind", ["pipe", "socket", "devnull", "regular", "eventfd", "small-memfd"])
async def test_a_region_fd_of_the_wrong_kind_is_named(
    serve: Serve, fds, tmp_path: Path, kind: str
) -> None:
    srv = await serve()
    owned: list[int] = []
    if kind == "pipe":
        owned = list(os.pipe())
    elif kind == "socket":
        a, b = socket.socketpair()
        owned = [a.detach(), b.detach()]
    elif kind == "devnull":
        owned = [os.open("/dev/null", os.O_RDONLY)]
    elif kind == "regular":
        owned = [os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)]
    elif kind == "eventfd":
        owned = [os.eventfd(0)]
    else:
        owned = [memfd_create("small", size=MIB)]
    before = open_fds()
    try:
        err = await refused(srv, message(), [fds[0], owned[0]])
        if kind == "small-memfd":
            assert err.code == "bad_region" and "past the end of its memfd" in str(err)
        else:
            assert err.code == "bad_fds"
            assert "regions[0].fd_index 1 is a" in str(err) and "not a memfd" in str(err)
        await settled(before, srv)
    finally:
        for fd in owned:
            os.close(fd)
