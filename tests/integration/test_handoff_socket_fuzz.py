"""Fuzzing the hand-off server through a real socket, with real fds of every kind.

Each case connects, sends a valid or broken message (whole, cut short, or in
two writes) with a drawn set of fds attached (a uffd, memfds large and
small, a pipe, a socket, /dev/null, a regular file, an eventfd) and reads the
reply.  Every case must get exactly one JSON reply, an error must name what
was wrong, and afterwards the server must still accept a good hand-off with
every received fd closed (counted in /proc/self/fd, as server and client
share this process).

The server runs on uvloop in a thread of its own, as in the daemon, so the
cases are plain blocking clients and cost a round trip each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd.kernel import Userfaultfd, memfd_create, send_with_fds
from wsd.vmm.client import hand_off, read_reply
from wsd.vmm.limits import HandoffLimits
from wsd.vmm.protocol import ErrorCode, HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

pytestmark = pytest.mark.integration
MIB = 1 << 20
HOST = 0x7F0000000000
CASES = 1500
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class StubSessions:
    """Accepts whatever the server lets through; a session ends when the client hangs up."""

    def __init__(self) -> None:
        self.accepted = 0

    async def __call__(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        for fd in fds:
            os.close(fd)
        self.accepted += 1

        async def close() -> None:
            pass

        return Accepted(accepted_reply(req, "stub"), close)


@dataclass
class ServerThread:
    server: HandoffServer
    sessions: StubSessions
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[None]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    sessions = StubSessions()
    srv = HandoffServer(
        tmp_path / "wsd.sock", sessions, limits=HandoffLimits(message_timeout_seconds=2)
    )
    srv.listen()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["task"] = asyncio.current_task()
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await srv.serve()

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())

    thread = threading.Thread(target=run, name="handoff-server", daemon=True)
    thread.start()
    assert started.wait(10)
    st_ = ServerThread(srv, sessions, thread, box["loop"], box["task"])
    yield st_
    st_.stop()


class FdZoo:
    """One fd of each kind a client might attach, right or wrong."""

    def __init__(self, tmp_path: Path) -> None:
        self.uffd = Userfaultfd.create()
        self.read_end, self.write_end = os.pipe()
        self.sock_a, self.sock_b = socket.socketpair()
        regular = tmp_path / "regular"
        regular.write_bytes(b"x" * 4096)
        self.by_kind = {
            "uffd": self.uffd.fd,
            "memfd": memfd_create("guest", size=4 * MIB),
            "small-memfd": memfd_create("small", size=4096),
            "pipe": self.read_end,
            "socket": self.sock_a.fileno(),
            "devnull": os.open("/dev/null", os.O_RDWR),
            "regular": os.open(regular, os.O_RDWR),
            "eventfd": os.eventfd(0),
        }

    def close(self) -> None:
        self.uffd.close()
        self.sock_a.close()
        self.sock_b.close()
        for kind, fd in self.by_kind.items():
            if kind not in ("uffd", "socket"):
                os.close(fd)
        os.close(self.write_end)


@pytest.fixture
def zoo(tmp_path: Path) -> Iterator[FdZoo]:
    z = FdZoo(tmp_path)
    yield z
    z.close()


FD_KINDS = ["uffd", "memfd", "small-memfd", "pipe", "socket", "devnull", "regular", "eventfd"]
INTS = st.one_of(
    st.integers(-5, 70),
    st.integers(),
    st.sampled_from([4096, 2 << 20, 1 << 30, 2**63, 2**64]),
)
LEAF = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(max_size=8))


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    size = 4 * MIB // n
    regions: list[dict[str, Any]] = [
        {
            "guest_phys_addr": i * size,
            "host_virt_addr": HOST + i * size,
            "size": size,
            "fd_index": 1,
            "offset": i * size,
        }
        for i in range(n)
    ]
    msg: dict[str, Any] = {
        "type": "handoff",
        "version": 1,
        "vm_id": f"vm-{draw(st.integers(0, 10**6))}",
        "vmm_pid": os.getpid(),
        "regions": regions,
    }
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["top", "region", "drop"]))
        if where == "top":
            key = draw(st.sampled_from(["type", "version", "vm_id", "vmm_pid", "uffd", "extra"]))
            msg[key] = draw(LEAF | st.lists(LEAF, max_size=3))
        elif where == "region":
            region = regions[draw(st.integers(0, n - 1))]
            key = draw(
                st.sampled_from(["guest_phys_addr", "host_virt_addr", "size", "fd_index", "offset"])
            )
            region[key] = draw(INTS)
        else:
            msg.pop(draw(st.sampled_from(["type", "version", "vm_id", "vmm_pid", "regions"])), None)
    return msg


@dataclass
class Case:
    data: bytes
    fds: list[str]
    how: str  # "whole", "cut" (then shut down the write side) or "split"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    msg = draw(message())
    raw = json.dumps(msg).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.binary(max_size=64))
    fds = draw(
        st.one_of(
            st.just(["uffd", "memfd"]),
            st.lists(st.sampled_from(FD_KINDS), max_size=6),
            st.permutations(["uffd", "memfd"]),
            st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=2).map(lambda k: ["uffd", *k]),
        )
    )
    how = draw(st.sampled_from(["whole", "whole", "cut", "split"]))
    if how == "cut":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    else:
        raw += b"\n"
    return Case(raw, fds, how)


def run_case(path: Path, case: Case, zoo: FdZoo) -> dict[str, Any]:
    fds = [zoo.by_kind[k] for k in case.fds]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if case.how == "split" and len(case.data) > 1:
                half = len(case.data) // 2
                send_with_fds(s, case.data[:half], fds[: len(fds) // 2])
                send_with_fds(s, case.data[half:], fds[len(fds) // 2 :])
            else:
                send_with_fds(s, case.data, fds)
            if case.how == "cut":
                s.shutdown(socket.SHUT_WR)
        return read_reply(s)


def test_the_server_answers_every_fuzzed_hand_off(server: ServerThread, zoo: FdZoo) -> None:
    path = server.server.path
    before = open_fds()
    seen: dict[str, int] = {}

    @FUZZ
    @given(case=cases())
    def one(case: Case) -> None:
        reply = run_case(path, case, zoo)
        if reply["type"] == "accepted":
            # Only a well-formed message with a uffd and a large enough memfd gets in.
            assert case.fds == ["uffd", "memfd"], case
            seen["accepted"] = seen.get("accepted", 0) + 1
            return
        assert reply["type"] == "error", reply
        err = reply["error"]
        code = ErrorCode(err["code"])
        assert code is not ErrorCode.INTERNAL, err
        assert err["message"], err
        seen[code.value] = seen.get(code.value, 0) + 1
        if case.fds and case.fds[0] != "uffd" and code is ErrorCode.BAD_FDS:
            assert "not a userfaultfd" in err["message"] or "attached" in err["message"], err

    started = time.monotonic()
    one()
    elapsed = time.monotonic() - started
    print(f"{CASES} socket cases in {elapsed:.1f} s: {seen}")
    # The fuzz reached the interesting outcomes, not only bad JSON.
    assert {"accepted", "bad_fds", "invalid_message"} <= seen.keys(), seen

    # Still healthy: a good hand-off gets in.
    reply, conn = hand_off(
        path,
        {
            "type": "handoff",
            "version": 1,
            "vm_id": "after-fuzz",
            "vmm_pid": os.getpid(),
            "regions": [
                {"guest_phys_addr": 0, "host_virt_addr": HOST, "size": 4 * MIB, "fd_index": 1}
            ],
        },
        [zoo.by_kind["uffd"], zoo.by_kind["memfd"]],
    )
    assert reply["type"] == "accepted"
    conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        open_fds() != before or server.server.sessions or server.server.pending
    ):
        time.sleep(0.01)
    assert open_fds() == before, "the server kept fds from fuzzed hand-offs"
    assert (server.server.sessions, server.server.pending) == (0, 0)
