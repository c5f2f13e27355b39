"""The owner rule with a real non-root VMM: its user may pause its VM, and no other.

A real ``wsd run`` (root), and VMMs in forked children that map a memfd,
create a uffd and hand both off, one after dropping to ``nobody``.  wsd
records the VMM's effective uid from ``/proc`` as the VM's owner
(``Session.owner_uid``); control requests then come from children that drop
to ``nobody`` or to another uid, so the kernel's ``SO_PEERCRED`` says who
they are (``wsd.testing.other_user``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsd.control.client import request
from wsd.control.protocol import Command, ControlError, Request
from wsd.kernel import Userfaultfd, memfd_create
from wsd.testing.daemon_process import WsdProcess
from wsd.testing.other_user import AsUser, run_as
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


def vmm(socket_path: Path, vm_id: str, uid: int | None) -> AsUser:
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

    return AsUser(uid, NOBODY, body, setup)


def control_as(uid: int, path: Path, command: Command, vm_id: str) -> dict[str, Any]:
    """``command`` of ``vm_id`` from a process running as ``uid`` (primary group nogroup)."""

    def body() -> dict[str, Any]:
        try:
            return {"ok": request(path, Request(command, vm_id), timeout=30)}
        except ControlError as e:
            return {"code": str(e.code), "message": str(e)}

    return run_as(uid, NOBODY, body)  # type: ignore[no-any-return]


@pytest.fixture
def wsd(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes], Path]]:
    # pytest's tmp_path is mode 0700: the VMM's user could not reach the sockets.
    socks = Path(tempfile.mkdtemp(prefix="wsd-owner-"))
    socks.chmod(0o711)
    wsd = WsdProcess(tmp_path / "wsd.toml", tmp_path / "wsd.log", socks / "control.sock")
    wsd.config.write_text(CONFIG.format(socks=socks, tmp=tmp_path, group=NOBODY))
    try:
        wsd.start(timeout=60)
        yield socks / "wsd.sock", socks / "control.sock", wsd.proc, wsd.log
    finally:
        code = wsd.stop(60)
        shutil.rmtree(socks, ignore_errors=True)
        assert code == 0, wsd.log_text()


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
