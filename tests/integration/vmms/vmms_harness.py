"""Harness for the tests with real VMMs: ``wsd run``, ``wsd attach``, a stand-in for QEMU."""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from wsd.control.client import request
from wsd.control.protocol import Command, Request
from wsd.kernel import data_ranges, pidfd_getfd, pidfd_open
from wsd.kernel.procfs import read_maps
from wsd.testing.daemon_process import WsdProcess, wait_for
from wsd.testing.slowness import patient

HERE = Path(__file__).parent
INTERVAL = 0.2
PAGE = mmap.PAGESIZE

CONFIG = """
[daemon]
socket = "{tmp}/wsd.sock"
control_socket = "{tmp}/control.sock"
interval_seconds = {interval}
state_dir = "{tmp}/state"

[storage]
kind = "file"
root = "{tmp}/pages"

[evictor]
min_idle_cycles = {idle}
max_idle_cycles = 255

[metrics]
enabled = false
"""


class Wsd(WsdProcess):
    """``wsd run --config`` in a child process."""

    def __init__(self, tmp: Path, *, idle: int = 2) -> None:
        self.tmp = tmp
        self.socket = tmp / "wsd.sock"
        self.control = tmp / "control.sock"
        super().__init__(tmp / "wsd.toml", tmp / "wsd.log", self.control)
        self.config.write_text(CONFIG.format(tmp=tmp, interval=INTERVAL, idle=idle))
        self.start()

    def crash(self) -> None:
        """SIGKILL: what a wsd crash leaves behind (its sockets stay as files)."""
        self.kill()
        self.control.unlink()

    def vm(self, vm_id: str) -> dict[str, Any] | None:
        vms = request(self.control, Request(Command.STATUS), timeout=patient(10))["vms"]
        return next((v for v in vms if v["vm_id"] == vm_id), None)

    def wait_session_closed(self, vm_id: str, n: int = 1) -> None:
        """Until wsd has logged the end of ``vm_id``'s ``n``-th session: evicted pages drained.

        (A session leaves ``wsd status`` before its drain is done.)
        """
        wait_for(
            lambda: self.log_text().count(f'"session closed", "vm_id": "{vm_id}"') >= n,
            f"session {vm_id} closed",
            timeout=300,
        )

    def stop(self, timeout: float = 60) -> int:
        return super().stop(timeout)


class Attach:
    """``wsd attach`` in a child process, as an operator runs it."""

    def __init__(self, pid: int, socket: Path, *args: str, **popen: Any) -> None:
        argv = [sys.executable, "-m", "wsd", "attach", "--pid", str(pid), "--socket", str(socket)]
        self.proc = subprocess.Popen(
            [*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
        )

    def first_line(self, timeout: float = 30) -> str:
        """What it prints once attached (or its error, if it exits)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], patient(timeout))
        line = self.proc.stdout.readline() if ready else ""
        if not line and self.proc.poll() is not None:
            assert self.proc.stderr is not None
            return self.proc.stderr.read()
        return line

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            # Stopped, it waits for wsd to put the pages back (--detach-wait).
            _, err = self.proc.communicate(timeout=patient(300))
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never left running after the test
            self.proc.communicate()
            raise
        return self.proc.returncode, err


class StandIn:
    """``standin.c``: guest RAM in a shared memfd, a hot part rewritten, checked on demand."""

    def __init__(self, binary: Path, size_mib: int, hot_pages: int) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(size_mib), str(hot_pages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.size = size_mib << 20
        assert self.readline(10).startswith("ready"), "the stand-in did not start"
        self.lines: list[str] = []

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], patient(timeout))
        return self.proc.stdout.readline() if ready else ""

    def check(self, timeout: float = 120) -> str:
        """Have it re-read every page: "ok PAGES" or "bad PAGE WORD" (or "eintr" first)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        line = self.readline(timeout).strip()
        while line == "eintr":
            self.lines.append(line)
            line = self.readline(timeout).strip()
        return line

    @property
    def ok(self) -> str:
        """What :meth:`check` answers when every page is intact."""
        return f"ok {self.size // PAGE}"

    def running(self) -> bool:
        return self.proc.poll() is None and not self.zombie()

    def zombie(self) -> bool:
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"

    def resident(self) -> int:
        """Bytes of its memfd that hold data: what wsd has not punched out."""
        return memfd_resident(self.pid, "/memfd:wsd-standin")

    def userfaultfds(self) -> int:
        d = f"/proc/{self.pid}/fd"
        return sum(os.readlink(f"{d}/{n}") == "anon_inode:[userfaultfd]" for n in os.listdir(d))

    def stop(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(patient(30))
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        code = self.proc.wait(patient(30))
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
        return code


def memfd_resident(pid: int, name: str) -> int:
    """Bytes of ``pid``'s memfd called ``name`` (``/memfd:...``) that hold data."""
    ram = next(m for m in read_maps(pid) if m.path.startswith(name))
    fd_no = next(
        int(n)
        for n in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{n}").startswith(name)
    )
    pidfd = pidfd_open(pid)
    try:
        fd = pidfd_getfd(pidfd, fd_no)
    finally:
        os.close(pidfd)
    try:
        return sum(end - start for start, end in data_ranges(fd, 0, ram.size))
    finally:
        os.close(fd)
