"""The hand-off socket against well-formed and hostile clients, with real fds."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from wsd.kernel import OpenFlag, Userfaultfd, memfd_create, send_with_fds
from wsd.kernel.fds import F_SEAL_FUTURE_WRITE
from wsd.vmm.client import HandoffRefused, hand_off, read_reply
from wsd.vmm.protocol import HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
MIB = 1 << 20


class StubSessions:
    def __init__(self) -> None:
        self.started: list[HandoffRequest] = []
        self.ended: list[str] = []

    async def __call__(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        for fd in fds:
            os.close(fd)
        self.started.append(req)

        async def close() -> None:
            self.ended.append(req.vm_id)

        return Accepted(accepted_reply(req, "stub"), close)


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[HandoffServer, StubSessions]]:
    sessions = StubSessions()
    srv = HandoffServer(tmp_path / "wsd.sock", sessions)
    srv.listen()
    task = asyncio.create_task(srv.serve())
    yield srv, sessions
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def message(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "handoff",
        "version": 1,
        "vm_id": "vm-1",
        "vmm_pid": os.getpid(),
        "regions": [
            {"guest_phys_addr": 0, "host_virt_addr": 0x7F0000000000, "size": 4 * MIB, "fd_index": 1}
        ],
    }
    msg.update(over)
    return msg


class Fds:
    """A uffd and a 4 MiB memfd, as a VMM would attach them."""

    def __init__(self) -> None:
        self.uffd = Userfaultfd.create()
        self.memfd = memfd_create("guest", size=4 * MIB)

    def close(self) -> None:
        self.uffd.close()
        os.close(self.memfd)


@pytest.fixture
def fds() -> Any:
    f = Fds()
    yield f
    f.close()


async def refused(
    srv: HandoffServer, msg: dict[str, Any] | bytes, fds: list[int]
) -> HandoffRefused:
    with pytest.raises(HandoffRefused) as exc:
        await asyncio.to_thread(hand_off, srv.path, msg, fds)
    return exc.value


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_valid_handoff_is_accepted_and_closing_ends_the_session(server, fds) -> None:
    srv, sessions = server
    reply, conn = await asyncio.to_thread(hand_off, srv.path, message(), [fds.uffd.fd, fds.memfd])
    assert reply == {"type": "accepted", "version": 1, "vm_id": "vm-1", "mode": "stub"}
    assert sessions.started[0].regions[0].size == 4 * MIB
    conn.close()
    for _ in range(100):
        if sessions.ended:
            break
        await asyncio.sleep(0.01)
    assert sessions.ended == ["vm-1"]


async def test_socket_mode_is_tight(server) -> None:
    srv, _ = server
    assert os.stat(srv.path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("msg", "code", "text"),
    [
        (b"{not json\n", "bad_json", "not valid JSON"),
        (message(version=2), "bad_version", "unsupported protocol version 2"),
        (message(type="hello"), "invalid_message", "unknown message type 'hello'"),
        (message(vmm_pid=1), "forbidden", "vmm_pid 1 is not the connecting process"),
        (
            message(
                regions=[
                    {
                        "guest_phys_addr": 0,
                        "host_virt_addr": 0x7F0000000000,
                        "size": 4 * MIB + 100,
                        "fd_index": 1,
                    }
                ]
            ),
            "bad_region",
            "regions[0]: size 0x400064 is not a multiple of page_size",
        ),
        (
            message(
                regions=[
                    {
                        "guest_phys_addr": 0,
                        "host_virt_addr": 0x7F0000000000,
                        "size": 2 * MIB,
                        "fd_index": 1,
                    },
                    {
                        "guest_phys_addr": MIB,
                        "host_virt_addr": 0x7F0001000000,
                        "size": 2 * MIB,
                        "fd_index": 1,
                        "offset": 2 * MIB,
                    },
                ]
            ),
            "bad_region",
            "regions[1] overlaps regions[0] in guest memory",
        ),
        (
            message(
                regions=[
                    {
                        "guest_phys_addr": 0,
                        "host_virt_addr": 0x7F0000000000,
                        "size": 8 * MIB,
                        "fd_index": 1,
                    }
                ]
            ),
            "bad_region",
            "past the end of its memfd",
        ),
        (
            message(
                regions=[
                    {
                        "guest_phys_addr": i * 4096,
                        "host_virt_addr": 0x7F0000000000 + i * 4096,
                        "size": 4096,
                        "fd_index": 1,
                        "offset": i * 4096,
                    }
                    for i in range(1000)
                ]
            ),
            "bad_region",
            "1000 regions exceed the limit of 512",
        ),
        (
            message(uffd={"state": "registered"}),
            "invalid_message",
            "a registered uffd must state its 'features' and 'register_mode'",
        ),
        (
            message(held=[2]),
            "invalid_message",
            "held: only a reattach gives back pipes wsd asked to keep",
        ),
        (
            message(type="reattach", held=[1]),
            "invalid_message",
            "held[0]: fd_index 1 is used twice",
        ),
    ],
    ids=[
        "bad-json",
        "version",
        "type",
        "pid",
        "unaligned",
        "overlap",
        "outside-memfd",
        "region-count",
        "registered-without-details",
        "held-on-a-handoff",
        "held-twice",
    ],
)
async def test_bad_messages_get_a_precise_error(
    server, fds, msg: Any, code: str, text: str
) -> None:
    srv, sessions = server
    before = open_fds()
    err = await refused(srv, msg, [fds.uffd.fd, fds.memfd])
    assert err.code == code
    assert text in str(err)
    assert open_fds() == before, "the daemon leaked fds of a refused hand-off"
    assert not sessions.started


async def test_fd_problems(server, fds, tmp_path: Path) -> None:
    srv, sessions = server
    regular = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    blocking = Userfaultfd.create(OpenFlag.CLOEXEC)
    read_only = os.open(f"/proc/self/fd/{fds.memfd}", os.O_RDONLY)
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 4 * MIB)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
    try:
        cases = [
            ([], "0 were attached"),
            ([fds.uffd.fd], "1 was attached"),
            ([fds.uffd.fd, fds.memfd, fds.memfd], "3 were attached"),
            ([regular, fds.memfd], "uffd.fd_index 0 is a regular file"),
            ([fds.memfd, fds.memfd], "uffd.fd_index 0 is a memfd"),
            ([fds.uffd.fd, fds.uffd.fd], "regions[0].fd_index 1 is a userfaultfd"),
            ([fds.uffd.fd, regular], "regions[0].fd_index 1 is a regular file"),
            ([blocking.fd, fds.memfd], "uffd.fd_index 0 is a blocking userfaultfd"),
            ([fds.uffd.fd, read_only], "fd_index 1 is a memfd not open for reading and writing"),
            ([fds.uffd.fd, sealed], "regions[0].fd_index 1 is a memfd sealed against writes"),
        ]
        for attached, text in cases:
            err = await refused(srv, message(), attached)
            assert err.code == "bad_fds", err
            assert text in str(err)
        reattach = message(type="reattach", held=[2])
        err = await refused(srv, reattach, [fds.uffd.fd, fds.memfd, regular])
        assert err.code == "bad_fds" and err.field == "held[0]", err
        assert "held[0] (fd_index 2) is a regular file" in str(err)
    finally:
        os.close(regular)
        blocking.close()
        os.close(read_only)
        os.close(sealed)
    assert not sessions.started


async def test_too_many_fds_and_too_large(server, fds) -> None:
    srv, _ = server
    err = await refused(srv, message(), [fds.uffd.fd] + [fds.memfd] * 100)
    assert err.code == "bad_fds" and "more than" in str(err)
    huge = json.dumps(message(pad="x" * (2 * MIB))).encode() + b"\n"
    err = await refused(srv, huge, [fds.uffd.fd, fds.memfd])
    assert err.code == "too_large"


async def test_truncated_message_then_daemon_still_healthy(server, fds) -> None:
    srv, sessions = server

    def half_message() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.path))
            send_with_fds(s, b'{"type": "handoff"', [fds.memfd])
            s.shutdown(socket.SHUT_WR)
            return read_reply(s)

    reply = await asyncio.to_thread(half_message)
    assert reply["error"]["code"] == "invalid_message"
    assert "before the end of the message" in reply["error"]["message"]
    ok, conn = await asyncio.to_thread(
        hand_off, srv.path, message(vm_id="vm-2"), [fds.uffd.fd, fds.memfd]
    )
    conn.close()
    assert ok["vm_id"] == "vm-2" and [r.vm_id for r in sessions.started] == ["vm-2"]


async def test_firecracker_region_shape(server, fds) -> None:
    srv, sessions = server
    msg = message(
        regions=[
            {"base_host_virt_addr": 0x7F0000000000, "size": 4 * MIB, "offset": 0, "page_size": 4096}
        ]
    )
    _, conn = await asyncio.to_thread(hand_off, srv.path, msg, [fds.uffd.fd, fds.memfd])
    conn.close()
    r = sessions.started[0].regions[0]
    assert (r.host_virt_addr, r.fd_index, r.guest_phys_addr) == (0x7F0000000000, 1, 0)
