"""The owner rule with a real non-root VMM: its user may pause its VM, and no other.

A real ``wsd run`` (root), and VMMs in forked children that map a memfd,
create a uffd and hand both off, one after dropping to ``nobody``.  wsd
records the VMM's effective uid from ``/proc`` as the VM's owner
(``Session.owner_uid``); control requests then come from children that drop
to ``nobody`` or to another uid, so the kernel's ``SO_PEERCRED`` says who
they are.  The children do not exec: the venv's interpreter is under
``/root``, which other users cannot read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from wsd.control.client import request
from wsd.control.protocol import Command, ControlError, Request
from wsd.kernel import Userfaultfd, memfd_create
from wsd.vmm.client import HandoffRefused, hand_off

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root"),
]
NOBODY = 65534  # nobody, and nogroup: the sockets' group
OTHER = 23456  # a uid nothing on the host uses, with nogroup as its primary group
SIZE = 4 << 20

CONFIG = """
[daemon]
socket = "{socks}/wsd.sock"
control_socket = "{socks}/control.sock"
interval_seconds = 0.2
state_dir = "{tmp}/state"

[access]
socket_group = {group}

[storage]
kind = "file"
root = "{tmp}/pages"

[metrics]
enabled = false
"""


class Child:
    """A forked child that runs ``body`` as ``uid``/``gid`` after ``setup`` (as root),
    reports its JSON result and lives until :meth:`stop`."""

    # The stop pipes of the children still running: a child forked later
    # inherits them and must close them, or a stop would never reach them.
    _running: ClassVar[set[int]] = set()

    def __init__(
        self, uid: int | None, gid: int, body: Callable[[Any], Any], setup: Callable[[], Any]
    ) -> None:
        result_r, result_w = os.pipe()
        stop_r, stop_w = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a threaded process; the child
            # only sets its ids, talks to sockets and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            out: dict[str, Any] = {}
            try:
                os.close(result_r)
                os.close(stop_w)
                for fd in Child._running:
                    os.close(fd)
                state = setup()
                if uid is not None:
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
                out["pid"] = os.getpid()
                out["result"] = body(state)
            except BaseException as e:
                out["child_error"] = repr(e)
            finally:
                with contextlib.suppress(BaseException):
                    os.write(result_w, json.dumps(out).encode())
                    os.close(result_w)
                    os.read(stop_r, 1)  # until the parent closes it
                os._exit(0)
        os.close(result_w)
        os.close(stop_r)
        self.pid = pid
        self._stop = stop_w
        Child._running.add(stop_w)
        with os.fdopen(result_r, "rb") as f:
            self.out: dict[str, Any] = json.loads(f.read() or b"{}")
        if "result" not in self.out:
            self.stop()
            raise AssertionError(f"child {pid} failed: {self.out}")

    @property
    def result(self) -> Any:
        return self.out["result"]

    def stop(self) -> None:
        if self._stop >= 0:
            Child._running.discard(self._stop)
            os.close(self._stop)
            self._stop = -1
            os.waitpid(self.pid, 0)


def vmm(socket_path: Path, vm_id: str, uid: int | None) -> Child:
    """A VMM that hands its 4 MiB of guest memory to wsd and keeps the session open."""
    conns = []

    def setup() -> tuple[int, int, mmap.mmap, int]:
        memfd = memfd_create("owner-guest", size=SIZE)
        ram = mmap.mmap(memfd, SIZE, flags=mmap.MAP_SHARED)
        base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        return Userfaultfd.create().fd, memfd, ram, base

    def body(state: tuple[int, int, mmap.mmap, int]) -> Any:
        uffd, memfd, _, base = state
        msg = {
            "type": "handoff",
            "version": 1,
            "vm_id": vm_id,
            "vmm_pid": os.getpid(),
            "regions": [
                {"guest_phys_addr": 0, "host_virt_addr": base, "size": SIZE, "fd_index": 1}
            ],
        }
        try:
            reply, conn = hand_off(socket_path, msg, [uffd, memfd], timeout=30)
        except HandoffRefused as e:
            return e.reply
        conns.append(conn)  # the session lives as long as the connection
        return reply

    return Child(uid, NOBODY, body, setup)


def control_as(uid: int, path: Path, command: Command, vm_id: str) -> dict[str, Any]:
    """``command`` of ``vm_id`` from a process running as ``uid`` (primary group nogroup)."""

    def body(_: None) -> Any:
        try:
            return {"ok": request(path, Request(command, vm_id), timeout=30)}
        except ControlError as e:
            return {"code": str(e.code), "message": str(e)}

    child = Child(uid, NOBODY, body, lambda: None)
    child.stop()
    return child.result  # type: ignore[no-any-return]


@pytest.fixture
def wsd(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes], Path]]:
    # pytest's tmp_path is mode 0700: the VMM's user could not reach the sockets.
    socks = Path(tempfile.mkdtemp(prefix="wsd-owner-"))
    socks.chmod(0o711)
    config = tmp_path / "wsd.toml"
    config.write_text(CONFIG.format(socks=socks, tmp=tmp_path, group=NOBODY))
    log = tmp_path / "wsd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsd", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (socks / "control.sock").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield socks / "wsd.sock", socks / "control.sock", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        shutil.rmtree(socks, ignore_errors=True)
        assert code == 0, log.read_text()


def test_a_non_root_vmm_user_may_pause_its_own_vm_and_no_other(
    wsd: tuple[Path, Path, subprocess.Popen[bytes], Path],
) -> None:
    handoff, control, _, log = wsd
    theirs = vmm(handoff, "nobody-vm", NOBODY)
    mine = vmm(handoff, "root-vm", None)
    try:
        assert theirs.result["type"] == "accepted", theirs.result
        assert mine.result["type"] == "accepted", mine.result
        vms = {v["vm_id"]: v for v in request(control, Request(Command.STATUS), timeout=30)["vms"]}
        assert set(vms) == {"nobody-vm", "root-vm"}, log.read_text()

        # The VMM's user: its own VM, yes.
        reply = control_as(NOBODY, control, Command.PAUSE, "nobody-vm")
        assert reply["ok"]["paused"] is True, reply
        # Not root's VM, and in the same words as for a VM that does not exist.
        refused = control_as(NOBODY, control, Command.PAUSE, "root-vm")
        assert refused["code"] == "forbidden", refused
        assert f"(uid {NOBODY}) may not address it" in refused["message"]
        unknown = control_as(NOBODY, control, Command.PAUSE, "no-such-vm")
        assert unknown["code"] == "forbidden", unknown
        # Another user whose group lets it reach the socket: not the owner.
        other = control_as(OTHER, control, Command.RESUME, "nobody-vm")
        assert other["code"] == "forbidden", other
        assert f"(uid {OTHER}) may not address it" in other["message"]

        vms = {v["vm_id"]: v for v in request(control, Request(Command.STATUS), timeout=30)["vms"]}
        assert vms["nobody-vm"]["paused"] is True
        assert vms["root-vm"]["paused"] is False
        # The owner takes its pause back.
        reply = control_as(NOBODY, control, Command.RESUME, "nobody-vm")
        assert reply["ok"]["paused"] is False, reply
    finally:
        theirs.stop()
        mine.stop()
