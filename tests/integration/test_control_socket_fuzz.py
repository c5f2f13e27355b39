"""Hostile clients against the control socket of a real ``wsd run``.

One daemon for the module (no storage, so ``evict`` answers at once), with a
puppet VMM handed off as ``fuzz-vm``.  Fuzzed requests go in whole, cut
short or in two writes, with stray fds attached (``SCM_RIGHTS``): each gets
at most one reply (one for a line, none for a line cut short), never
``internal``; afterwards ``status`` works and the daemon holds as many fds
as before (``/proc/<pid>/fd``).  Then: who may address a VM, clients that
never finish, and more clients than the server serves at once.

Other users' clients run in forked children that drop to their uid (we run
as root); the control socket is loosened to ``0666`` so the peer check, not
the file mode, is what stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd.control.client import request
from wsd.control.protocol import Command, ControlError, ErrorCode, Request
from wsd.control.server import IDLE_TIMEOUT
from wsd.kernel import memfd_create, send_with_fds
from wsd.testing.daemon_process import WsdProcess
from wsd.testing.other_user import run_as
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.vmm.limits import HandoffLimits

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root"),
]

CASES = 1200
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
VM = "fuzz-vm"
NOBODY = 65534  # allowed by the config: a VMM's user
STRANGER = 65533  # not allowed
MAX_CONNECTIONS = HandoffLimits().max_pending_connections

CONFIG = """
[daemon]
socket = "{d}/wsd.sock"
control_socket = "{d}/control.sock"
interval_seconds = 0.5

[access]
allowed_users = [{nobody}]

[metrics]
enabled = false
"""


class Daemon(WsdProcess):
    def __init__(self, d: Path) -> None:
        self.control = d / "control.sock"
        super().__init__(d / "wsd.toml", d / "wsd.log", self.control)

    def ask(self, command: Command, vm_id: str | None = None) -> dict[str, Any]:
        return request(self.control, Request(command, vm_id), timeout=10)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def idle_fds(self) -> int:
        """The daemon's fd count with no transient fd open (a connection closing, a /proc read)."""
        samples = []
        for _ in range(10):
            samples.append(self.fds())
            time.sleep(0.05)
        return min(samples)

    def settled_fds(self, expected: int, timeout: float = 10) -> int:
        """The daemon's fd count once it is back to ``expected`` (or the deadline passed)."""
        deadline = time.monotonic() + timeout
        while (n := self.fds()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return n


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # Under /tmp with 0711, so the other users' children can reach the socket.
    d = Path(tempfile.mkdtemp(prefix="wsd-control-fuzz-"))
    d.chmod(0o711)
    wsd = Daemon(d)
    wsd.config.write_text(CONFIG.format(d=d, nobody=NOBODY))
    puppet = None
    try:
        wsd.start()
        wsd.control.chmod(0o666)
        puppet = PuppetVMM.spawn(1 << 20, handoff=d / "wsd.sock", vm_id=VM, fill=False)
        wsd.wait_for(lambda: any(v["vm_id"] == VM for v in wsd.ask(Command.STATUS)["vms"]), VM)
        yield wsd
    finally:
        if puppet is not None:
            puppet.close()
        code = wsd.stop()
        text = wsd.log_text()
        shutil.rmtree(d, ignore_errors=True)
        assert code == 0, text
        assert "control connection failed" not in text, text
        assert "control request failed" not in text, text


def check_reply(line: bytes) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(line)
    assert reply["version"] == 1 and isinstance(reply["ok"], bool), reply
    if not reply["ok"]:
        code = ErrorCode(reply["error"]["code"])
        assert code is not ErrorCode.INTERNAL, reply
        assert 0 < len(reply["error"]["message"]) <= 400, reply
    return reply


# -- the fuzz ------------------------------------------------------------------------

LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**63, 2**64, 10**300]),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
FD_KINDS = ["pipe", "devnull", "eventfd", "memfd", "socket"]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from(["status", "pause", "resume", "evict", "stop"]))
    msg: dict[str, Any] = {"version": 1, "command": command}
    if command != "status" or draw(st.booleans()):
        msg["vm_id"] = draw(st.sampled_from([VM, "other-vm", "", "a b"]))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["version", "command", "vm_id", "max_bytes", "extra"]))
        if draw(st.booleans()):
            msg[key] = draw(LEAF | st.lists(LEAF, max_size=3))
        else:
            msg.pop(key, None)
    raw = json.dumps(msg).encode()
    kind = draw(st.integers(0, 9))
    if kind == 0:
        raw = draw(st.binary(max_size=64))
    elif kind == 1 and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    # One line: each line is a request of its own.
    return raw.replace(b"\n", b" ")


@dataclass
class Case:
    data: bytes
    fds: list[str]
    how: str  # "whole", "split" (two writes) or "cut" (no newline, then EOF)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    how = draw(st.sampled_from(["whole", "whole", "split", "cut"]))
    data = draw(payloads())
    if how != "cut":
        data += b"\n"
    fds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))
    return Case(data, fds, how)


class FdZoo:
    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.sock_a, self.sock_b = socket.socketpair()
        self.by_kind = {
            "pipe": self.read_end,
            "devnull": os.open("/dev/null", os.O_RDWR),
            "eventfd": os.eventfd(0),
            "memfd": memfd_create("stray", size=4096),
            "socket": self.sock_a.fileno(),
        }

    def close(self) -> None:
        for kind, fd in self.by_kind.items():
            if kind != "socket":
                os.close(fd)
        os.close(self.write_end)
        self.sock_a.close()
        self.sock_b.close()


def run_case(path: Path, case: Case, zoo: FdZoo) -> list[bytes]:
    """Send ``case``; the reply lines that came back."""
    fds = [zoo.by_kind[k] for k in case.fds]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        if case.how == "split" and len(case.data) > 1:
            half = len(case.data) // 2
            send_with_fds(s, case.data[:half], fds[:1])
            time.sleep(0.001)
            send_with_fds(s, case.data[half:], fds[1:])
        elif case.data or fds:
            send_with_fds(s, case.data or b" ", fds)
        if case.how == "cut":
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got.splitlines()
        got = b""
        while b"\n" not in got:
            chunk = s.recv(65536)
            assert chunk, f"closed without a reply: {case}"
            got += chunk
        # Anything more would be a second reply: give it a moment to show.
        s.settimeout(0.002)
        with contextlib.suppress(TimeoutError):
            got += s.recv(65536)
        return got.splitlines()


def test_the_daemon_answers_every_fuzzed_request_once(daemon: Daemon) -> None:
    zoo = FdZoo()
    daemon.ask(Command.STATUS)
    before = daemon.idle_fds()
    seen: dict[str, int] = {}

    @FUZZ
    @given(case=cases())
    def one(case: Case) -> None:
        lines = run_case(daemon.control, case, zoo)
        if case.how == "cut":
            assert lines == [], (case, lines)
            seen["cut"] = seen.get("cut", 0) + 1
            return
        assert len(lines) == 1, (case, lines)
        reply = check_reply(lines[0])
        key = "ok" if reply["ok"] else reply["error"]["code"]
        seen[key] = seen.get(key, 0) + 1

    started = time.monotonic()
    try:
        one()
    finally:
        zoo.close()
    print(f"{CASES} control socket cases in {time.monotonic() - started:.1f} s: {seen}")
    assert {"ok", "bad_json", "invalid_request", "unknown_vm", "cannot_evict"} <= seen.keys()

    daemon.alive()
    assert any(v["vm_id"] == VM for v in daemon.ask(Command.STATUS)["vms"])
    assert daemon.settled_fds(before) == before, "the daemon kept fds from fuzzed clients"


# -- other users ------------------------------------------------------------------------


def as_user(uid: int, path: Path, req: Request) -> dict[str, Any]:
    """``req`` sent by a process running as ``uid``; what it got back."""

    def body() -> dict[str, Any]:
        try:
            return {"result": request(path, req, timeout=10)}
        except ControlError as e:
            return {"error": {"code": str(e.code), "message": e.message}}

    return run_as(uid, uid, body)  # type: ignore[no-any-return]


def test_a_peer_not_allowed_is_refused(daemon: Daemon) -> None:
    out = as_user(STRANGER, daemon.control, Request(Command.STATUS))
    assert out["error"]["code"] == "forbidden"
    assert f"(uid {STRANGER}, gid {STRANGER}) is not allowed to connect" in out["error"]["message"]


@pytest.mark.parametrize("command", [Command.PAUSE, Command.RESUME, Command.EVICT])
def test_an_allowed_vmm_user_reads_the_status_but_may_not_address_another_users_vm(
    daemon: Daemon, command: Command
) -> None:
    """The puppet VMM runs as root: another VMM user must not pause or evict its guest."""
    daemon.ask(Command.RESUME, VM)
    status = as_user(NOBODY, daemon.control, Request(Command.STATUS))
    assert any(v["vm_id"] == VM for v in status["result"]["vms"])
    out = as_user(NOBODY, daemon.control, Request(command, VM))
    assert out["error"]["code"] == "forbidden", out
    assert "may not address it; only root, wsd's own user" in out["error"]["message"]
    assert next(v for v in daemon.ask(Command.STATUS)["vms"] if v["vm_id"] == VM)["paused"] is False
    # Root may.
    assert daemon.ask(Command.PAUSE, VM)["paused"] is True
    daemon.ask(Command.RESUME, VM)


# -- slow and many clients ----------------------------------------------------------------


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking: a full backlog makes a non-blocking connect fail with EAGAIN.
    s.connect(str(path))
    s.settimeout(10)
    return s


def test_silent_and_dribbling_clients_time_out_and_connections_are_bounded(
    daemon: Daemon,
) -> None:
    daemon.ask(Command.STATUS)
    before = daemon.idle_fds()
    started = time.monotonic()
    held = [connect(daemon.control) for _ in range(MAX_CONNECTIONS - 1)]
    dribbler = connect(daemon.control)
    dribbler.send(b'{"version":')
    try:
        # One more than the server serves at once: told so at once.
        with connect(daemon.control) as extra:
            reply = check_reply(extra.makefile("rb").readline())
        assert reply["error"]["code"] == "busy", reply
        assert "limits.max_pending_connections" in reply["error"]["message"]

        # A byte a second does not extend the deadline: closed with the silent ones.
        payload = b' 1, "command": "status"' + b" " * 60
        dribbler.settimeout(1)
        ended = None
        for byte in payload:
            try:
                dribbler.send(bytes([byte]))
                if dribbler.recv(1) == b"":
                    ended = time.monotonic()
                    break
            except TimeoutError:
                continue
            except OSError:
                ended = time.monotonic()
                break
        assert ended is not None, "the dribbling client was never closed"
        assert ended - started < IDLE_TIMEOUT + 10
        for s in held:
            s.settimeout(IDLE_TIMEOUT + 10 - (time.monotonic() - started))
            assert s.recv(1) == b"", "a silent client got a reply"
        assert time.monotonic() - started >= IDLE_TIMEOUT - 1
    finally:
        for s in [*held, dribbler]:
            s.close()
    daemon.alive()
    daemon.ask(Command.STATUS)
    assert daemon.settled_fds(before) == before
