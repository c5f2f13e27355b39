"""Who may hand off: the socket's mode, SO_PEERCRED uid/gid checks, and vmm_pid.

The clients run in forked children that drop to another uid (we run as root),
so the kernel reports their real credentials (``wsd.testing.other_user``).
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from wsd.access import AccessConfig, AccessPolicy
from wsd.kernel import Userfaultfd, memfd_create
from wsd.testing.other_user import run_as
from wsd.vmm.client import HandoffRefused, hand_off
from wsd.vmm.protocol import ErrorCode, HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root"),
]
MIB = 1 << 20
NOBODY = 65534
OTHER = 23456  # a uid and gid nothing on the host uses


class StubSessions:
    def __init__(self) -> None:
        self.peers: list[PeerCred] = []

    async def __call__(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        for fd in fds:
            os.close(fd)
        self.peers.append(peer)

        async def close() -> None:
            pass

        return Accepted(accepted_reply(req, "stub"), close)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path is mode 0700: another uid could not even reach the socket.
    d = Path(tempfile.mkdtemp(prefix="wsd-access-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d)


@pytest_asyncio.fixture
async def serve(sock_dir: Path) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    async def start(policy: AccessPolicy) -> tuple[HandoffServer, StubSessions]:
        stub = StubSessions()
        srv = HandoffServer(sock_dir / "wsd.sock", stub, access=policy)
        srv.listen()
        tasks.append(asyncio.create_task(srv.serve()))
        return srv, stub

    yield start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
def fds() -> Iterator[list[int]]:
    uffd = Userfaultfd.create()
    memfd = memfd_create("guest", size=4 * MIB)
    yield [uffd.fd, memfd]
    uffd.close()
    os.close(memfd)


def message(vmm_pid: int) -> dict[str, Any]:
    return {
        "type": "handoff",
        "version": 1,
        "vm_id": "vm-1",
        "vmm_pid": vmm_pid,
        "regions": [
            {"guest_phys_addr": 0, "host_virt_addr": 0x7F0000000000, "size": 4 * MIB, "fd_index": 1}
        ],
    }


def in_child(
    uid: int,
    gid: int,
    path: Path,
    fds: list[int],
    claim_pid: int | None = None,
    *,
    msg: dict[str, Any] | None = None,
) -> Any:
    """A child running as uid/gid hands off ``fds``; its pid and the reply it got.

    It sends ``msg`` if given, else :func:`message` for its own pid or ``claim_pid``.
    """

    def body() -> dict[str, Any]:
        sent = msg if msg is not None else message(os.getpid() if claim_pid is None else claim_pid)
        try:
            reply, conn = hand_off(path, sent, fds, timeout=10)
            conn.close()
        except HandoffRefused as e:
            reply = e.reply
        except PermissionError as e:
            reply = {"connect_error": e.strerror}
        return {"pid": os.getpid(), "reply": reply}

    return run_as(uid, gid, body)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_the_socket_mode_keeps_other_users_out(serve, sock_dir: Path, fds) -> None:
    srv, stub = await serve(AccessPolicy())
    assert os.stat(srv.path).st_mode & 0o777 == 0o600
    out = await asyncio.to_thread(in_child, NOBODY, NOBODY, srv.path, fds)
    assert out["reply"] == {"connect_error": "Permission denied"}
    assert not stub.peers


async def test_a_peer_not_allowed_is_refused_named_logged_and_counted(serve, fds) -> None:
    srv, stub = await serve(AccessPolicy())
    # As if the socket's mode had been loosened: SO_PEERCRED still stops it.
    os.chmod(srv.path, 0o666)
    before = open_fds()
    with capture_logs() as logs:
        out = await asyncio.to_thread(in_child, NOBODY, NOBODY, srv.path, fds)
    err = out["reply"]["error"]
    assert err["code"] == "forbidden"
    assert (
        f"peer pid {out['pid']} (uid {NOBODY}, gid {NOBODY}) is not allowed to connect"
        in err["message"]
    )
    assert "access.allowed_users" in err["message"]
    refusals = [e for e in logs if e["event"] == "handoff refused"]
    assert len(refusals) == 1
    entry = refusals[0]
    assert (entry["peer_pid"], entry["peer_uid"], entry["peer_gid"]) == (out["pid"], NOBODY, NOBODY)
    assert entry["code"] == "forbidden"
    assert srv.refused[ErrorCode.FORBIDDEN] == 1
    assert not stub.peers
    for _ in range(200):
        if open_fds() == before:
            break
        await asyncio.sleep(0.01)
    assert open_fds() == before


async def test_an_allowed_user_gets_in(serve, fds) -> None:
    srv, stub = await serve(AccessPolicy.from_config(AccessConfig(allowed_users=[NOBODY])))
    os.chmod(srv.path, 0o666)
    out = await asyncio.to_thread(in_child, NOBODY, NOBODY, srv.path, fds)
    assert out["reply"]["type"] == "accepted", out
    assert [(p.pid, p.uid, p.gid) for p in stub.peers] == [(out["pid"], NOBODY, NOBODY)]


async def test_the_socket_group_lets_its_members_in_and_no_one_else(serve, fds) -> None:
    srv, stub = await serve(AccessPolicy.from_config(AccessConfig(socket_group=OTHER)))
    st = os.stat(srv.path)
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, OTHER)
    member = await asyncio.to_thread(in_child, NOBODY, OTHER, srv.path, fds)
    assert member["reply"]["type"] == "accepted", member
    outsider = await asyncio.to_thread(in_child, NOBODY, NOBODY, srv.path, fds)
    assert outsider["reply"] == {"connect_error": "Permission denied"}
    assert len(stub.peers) == 1


async def test_a_vmm_cannot_hand_off_another_process_memory(serve, fds) -> None:
    srv, stub = await serve(AccessPolicy())
    me = os.getpid()
    before = open_fds()
    out = await asyncio.to_thread(in_child, 0, 0, srv.path, fds, me)
    err = out["reply"]["error"]
    assert err["code"] == "forbidden" and err["field"] == "vmm_pid"
    assert f"vmm_pid {me} is not the connecting process (pid {out['pid']}" in err["message"]
    assert "may only hand off its own memory" in err["message"]
    assert srv.refused[ErrorCode.FORBIDDEN] == 1
    assert not stub.peers
    for _ in range(200):
        if open_fds() == before:
            break
        await asyncio.sleep(0.01)
    assert open_fds() == before, "the fds of a refused hand-off were not closed"


# -- hand-offs on behalf of another process (wsd attach) -------------------------


@pytest.fixture
def mapped(fds) -> Iterator[tuple[list[int], int]]:
    """The fds, with the memfd mapped shared in this process (the "VMM"): (fds, address)."""
    m = mmap.mmap(fds[1], 4 * MIB, flags=mmap.MAP_SHARED)
    view = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(view)
    del view  # the mmap closes only once no buffer is exported
    yield fds, addr
    m.close()


def on_behalf(vmm_pid: int, addr: int, offset: int = 0, size: int = 4 * MIB) -> dict[str, Any]:
    msg = message(vmm_pid)
    msg["on_behalf"] = True
    msg["regions"][0].update(host_virt_addr=addr, offset=offset, size=size)
    return msg


async def test_root_may_hand_off_memory_the_vmm_maps_on_its_behalf(serve, mapped) -> None:
    srv, stub = await serve(AccessPolicy())
    fds, addr = mapped
    out = await asyncio.to_thread(in_child, 0, 0, srv.path, fds, msg=on_behalf(os.getpid(), addr))
    assert out["reply"]["type"] == "accepted", out
    assert [p.pid for p in stub.peers] == [out["pid"]]


async def test_an_allowed_user_may_not_act_on_behalf_of_another_process(serve, mapped) -> None:
    srv, stub = await serve(AccessPolicy.from_config(AccessConfig(allowed_users=[NOBODY])))
    os.chmod(srv.path, 0o666)
    fds, addr = mapped
    out = await asyncio.to_thread(
        in_child, NOBODY, NOBODY, srv.path, fds, msg=on_behalf(os.getpid(), addr)
    )
    err = out["reply"]["error"]
    assert err["code"] == "forbidden" and err["field"] == "on_behalf", err
    assert (
        f"(uid {NOBODY}) may not hand off memory on behalf of pid {os.getpid()}" in (err["message"])
    )
    assert not stub.peers


@pytest.mark.parametrize(
    ("shift", "offset", "size"),
    [(4096, 0, 4 * MIB - 4096), (0, 4096, 4 * MIB - 4096), (-4096, 0, 4 * MIB)],
    ids=["wrong-address", "wrong-offset", "outside-the-mapping"],
)
async def test_a_region_the_vmm_does_not_map_is_refused(
    serve, mapped, shift: int, offset: int, size: int
) -> None:
    srv, stub = await serve(AccessPolicy())
    fds, addr = mapped
    msg = on_behalf(os.getpid(), addr + shift, offset, size)
    out = await asyncio.to_thread(in_child, 0, 0, srv.path, fds, msg=msg)
    err = out["reply"]["error"]
    assert err["code"] == "forbidden" and err["field"] == "regions[0]", err
    assert f"pid {os.getpid()} does not map its memfd" in err["message"]
    assert not stub.peers


async def test_another_memfd_at_the_vmm_address_is_refused(serve, mapped) -> None:
    srv, stub = await serve(AccessPolicy())
    fds, addr = mapped
    other = memfd_create("other", size=4 * MIB)
    try:
        out = await asyncio.to_thread(
            in_child, 0, 0, srv.path, [fds[0], other], msg=on_behalf(os.getpid(), addr)
        )
    finally:
        os.close(other)
    assert out["reply"]["error"]["code"] == "forbidden", out
    assert not stub.peers
