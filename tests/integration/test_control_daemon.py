"""`wsd status` and `wsd vm pause|resume|evict` against a real `wsd run` and `wsd guest`.

The guest writes its hot set (``--write-ratio 1``): on kernels without RWP
wsd runs in wp-async mode, which sees writes only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from wsd.control.client import request
from wsd.control.protocol import Command, ControlError, Request
from wsd.guest.process import GuestProcess
from wsd.testing.daemon_process import WsdProcess

pytestmark = pytest.mark.integration

INTERVAL = 0.2
GUEST = 16 << 20

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
    """``wsd run --config`` in a child process, and its control socket."""

    def __init__(self, tmp: Path, *, idle: int, wrap: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.control = tmp / "control.sock"
        super().__init__(tmp / "wsd.toml", tmp / "wsd.log", self.control, wrap=wrap)
        self.config.write_text(CONFIG.format(tmp=tmp, interval=INTERVAL, idle=idle))
        self.start()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``wsd ARGS --socket <control socket>`` as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "wsd", *args, "--socket", str(self.control)],
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )

    def ask(self, command: Command, vm_id: str | None = None) -> dict[str, Any]:
        """The same request without starting a process: for polling."""
        return request(self.control, Request(command, vm_id), timeout=10)

    def vm(self, vm_id: str) -> dict[str, Any]:
        return next(v for v in self.ask(Command.STATUS)["vms"] if v["vm_id"] == vm_id)

    def wait_cycles(self, vm_id: str, n: int) -> dict[str, Any]:
        target = self.vm(vm_id)["cycles"] + n
        self.wait_for(lambda: self.vm(vm_id)["cycles"] >= target, f"{n} cycles")
        return self.vm(vm_id)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., tuple[Wsd, GuestProcess]]]:
    """Start wsd (min_idle_cycles = ``idle``) and a guest handed off to it as ``vm_id``."""
    started: list[Wsd | GuestProcess] = []

    def go(vm_id: str, *, idle: int, wrap: Sequence[str] = ()) -> tuple[Wsd, GuestProcess]:
        wsd = Wsd(tmp_path, idle=idle, wrap=wrap)
        started.append(wsd)
        argv = ["--socket", str(tmp_path / "wsd.sock"), "--vm-id", vm_id, "--size", "16M"]
        argv += ["--hot", "0.25", "--write-ratio", "1", "--seed", "1"]
        guest = GuestProcess.start(argv)
        started.append(guest)
        wsd.wait_for(
            lambda: any(v["vm_id"] == vm_id for v in wsd.ask(Command.STATUS)["vms"]), vm_id
        )
        return wsd, guest

    yield go
    problems = []
    for thing in reversed(started):
        if isinstance(thing, GuestProcess):
            code = thing.stop()
            thing.close()
            if code != 0:
                problems.append(f"guest exited {code}: {thing.stderr()}")
            elif thing.report()["verify_errors"]:
                problems.append(f"guest saw corrupt pages: {thing.report()['verify_errors']}")
        elif (code := thing.stop()) != 0:
            problems.append(f"wsd exited {code}: {thing.log_text()}")
    assert not problems, problems


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to drop CAP_SYS_NICE",
)
def test_without_cap_sys_nice_wsd_says_so_and_serves_at_nice_values(
    start: Callable[..., tuple[Wsd, GuestProcess]],
) -> None:
    """Real-time scheduling refused (wsd.priority): one warning naming the
    capability, the status says what the loop runs at, and the guest is served
    (the fixture checks every page it re-reads at exit)."""
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_nice"]
    wsd, _ = start("no-nice", idle=2, wrap=drop)
    wsd.wait_cycles("no-nice", 4)
    assert wsd.ask(Command.STATUS)["daemon"]["fault_service"] == "nice 0"
    log = wsd.log_text()
    assert "fault service is not real-time" in log and "CAP_SYS_NICE" in log, log


def skip_unless_evicting(wsd: Wsd, vm_id: str) -> None:
    vm = wsd.vm(vm_id)
    if vm["eviction"] == "off":
        pytest.skip(
            f"eviction does not happen in {vm['mode']} mode on this kernel: "
            f"{vm['eviction_off_because']}"
        )


def test_status_shows_the_guest(start: Callable[..., tuple[Wsd, GuestProcess]]) -> None:
    wsd, _ = start("status-vm", idle=200)
    wsd.wait_cycles("status-vm", 2)

    out = wsd.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    daemon = status["daemon"]
    assert daemon["config"] == str(wsd.config)
    assert daemon["kernel"] and daemon["mode"] in ("rwp", "wp-async")
    # Root holds CAP_SYS_NICE (wsd.priority).
    assert daemon["fault_service"] == "SCHED_FIFO 1" or os.geteuid() != 0
    assert daemon["uptime_seconds"] > 0
    assert status["store"]["backend"] == "file"
    [vm] = status["vms"]
    assert vm["vm_id"] == "status-vm"
    assert vm["mode"] == daemon["mode"]
    assert vm["guest_bytes"] == GUEST
    assert 0 < vm["resident_bytes"] <= GUEST
    # A quarter of the guest is written every interval.
    assert vm["hot_bytes"] == GUEST // 4
    assert [w["horizon_intervals"] for w in vm["working_set"]] == [1, 4, 16, 64]
    assert vm["working_set"][0]["bytes"] == GUEST // 4
    assert vm["regions"][0]["granularity"] == "4k"
    assert vm["paused"] is False

    table = wsd.cli("status")
    assert table.returncode == 0, table.stderr
    assert "status-vm" in table.stdout and "16.0 MiB" in table.stdout

    out = wsd.cli("vm", "pause", "status-vm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "status-vm: eviction paused"
    assert wsd.vm("status-vm")["paused"] is True
    again = wsd.cli("vm", "pause", "status-vm")
    assert again.stdout.strip() == "status-vm: eviction paused (it was already paused)"

    unknown = wsd.cli("vm", "pause", "no-such-vm")
    assert unknown.returncode == 1
    assert "no VM 'no-such-vm' is tracked (tracked VMs: status-vm)" in unknown.stderr


def test_status_without_a_daemon_says_it_is_not_running(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wsd", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"wsd is not running: no control socket at {tmp_path / 'none.sock'}" in out.stderr


def test_pause_stops_evictions_and_resume_restarts_them(
    start: Callable[..., tuple[Wsd, GuestProcess]],
) -> None:
    wsd, _ = start("paused-vm", idle=15)
    # Paused at once (no process to start): 15 idle intervals (3 s) before
    # any page could be evicted.
    assert wsd.ask(Command.PAUSE, "paused-vm") == {
        "vm_id": "paused-vm",
        "paused": True,
        "changed": True,
    }
    skip_unless_evicting(wsd, "paused-vm")
    before = wsd.vm("paused-vm")
    assert before["paused"] and before["eviction"] == "paused"
    after = wsd.wait_cycles("paused-vm", 30)  # twice min_idle_cycles
    assert after["evicted_bytes_total"] == before["evicted_bytes_total"] == 0
    assert after["evicted_bytes"] == 0

    out = wsd.cli("vm", "resume", "paused-vm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "paused-vm: eviction resumed"
    wsd.wait_for(
        lambda: wsd.vm("paused-vm")["evicted_bytes_total"] > after["evicted_bytes_total"],
        "eviction after resume",
    )
    assert wsd.vm("paused-vm")["eviction"] == "active"


def test_evict_evicts_idle_pages_now(start: Callable[..., tuple[Wsd, GuestProcess]]) -> None:
    # Never evicted by the policy within the test: only by asking.
    wsd, _ = start("evict-vm", idle=200)
    skip_unless_evicting(wsd, "evict-vm")
    wsd.wait_cycles("evict-vm", 2)
    assert wsd.vm("evict-vm")["evicted_bytes"] == 0

    out = wsd.cli("vm", "evict", "evict-vm", "--bytes", "1MiB", "--json")
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    assert first["max_bytes"] == 1 << 20
    assert first["prepared_bytes"] == 1 << 20
    assert 0 < first["evicted_bytes"] <= 1 << 20

    out = wsd.cli("vm", "evict", "evict-vm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("evict-vm: evicted ")
    vm = wsd.vm("evict-vm")
    cold = GUEST - GUEST // 4
    # Everything cold is out but pages written meanwhile (none, if the guest
    # keeps to its hot set).
    assert first["evicted_bytes"] < vm["evicted_bytes"] <= cold
    assert vm["evicted_bytes"] > cold // 2
    assert vm["resident_bytes"] + vm["evicted_bytes"] <= GUEST

    with pytest.raises(ControlError, match="no VM 'gone' is tracked"):
        wsd.ask(Command.EVICT, "gone")
