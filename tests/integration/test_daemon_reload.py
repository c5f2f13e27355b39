"""`wsd run --config` as a process: metrics over HTTP, and SIGHUP reloads the tunables,
rejects a bad file and keeps sessions."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from wsd.testing.daemon_process import WsdProcess
from wsd.testing.puppet_vmm import PuppetVMM

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
socket = "{socket}"
control_socket = "{socket}.control"
interval_seconds = {interval}
state_dir = "{state}"

[storage]
kind = "file"
root = "{pages}"

[evictor]
min_idle_cycles = {idle}

[metrics]
address = "127.0.0.1:0"
"""


class Wsd(WsdProcess):
    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp_path
        self.socket = tmp_path / "wsd.sock"
        super().__init__(tmp_path / "wsd.toml", tmp_path / "wsd.log", self.socket, env=env)
        self.write(interval=0.2, idle=8)
        self.start(timeout=20)

    def write(self, **values: object) -> None:
        self.config.write_text(
            CONFIG.format(
                socket=self.socket, state=self.tmp / "state", pages=self.tmp / "pages", **values
            )
        )

    def events(self) -> list[str]:
        return self.log_text().splitlines()

    def wait_for(self, cond: Callable[[], object], what: str, timeout: float = 20) -> None:
        super().wait_for(cond, what, timeout)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.events())


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def test_sighup_reloads_tunables_and_rejects_a_bad_file(tmp_path: Path) -> None:
    wsd = Wsd(tmp_path)
    try:
        with PuppetVMM.spawn(4 << 20, handoff=wsd.socket, vm_id="reload-vm"):
            wsd.wait_for(lambda: wsd.logged("session started"), "session")
            wsd.wait_for(lambda: wsd.logged("serving metrics"), "metrics")
            line = next(x for x in wsd.events() if "serving metrics" in x)
            address = json.loads(line)["address"]
            wsd.wait_for(lambda: "wsd_tracker_cycles_total" in scrape(address), "a cycle")
            text = scrape(address)
            for metric in (
                "wsd_sessions 1.0",
                'wsd_vm_info{mode="wp-async",vm_id="reload-vm"} 1.0',
                'wsd_guest_memory_bytes{region="0",vm_id="reload-vm"} 4.194304e+06',
                "process_resident_memory_bytes",
                'wsd_store_pages{backend="file",tier=""} 0.0',
            ):
                assert metric in text, metric
            wsd.write(interval=0.5, idle=20)
            wsd.proc.send_signal(signal.SIGHUP)
            wsd.wait_for(lambda: wsd.logged("configuration reloaded"), "reload")
            assert any(json.loads(line).get("interval") == 0.5 for line in wsd.events())

            wsd.config.write_text("[evictor]\nmin_idle_cycles = 0\n")
            wsd.proc.send_signal(signal.SIGHUP)
            wsd.wait_for(lambda: wsd.logged("reload rejected"), "rejection")
            rejected = next(line for line in wsd.events() if "reload rejected" in line)
            assert "evictor.min_idle_cycles" in rejected and str(wsd.config) in rejected

            # A restart-only key changes: it is named and kept.
            wsd.config.write_text(
                CONFIG.format(
                    socket=tmp_path / "other.sock",
                    interval=0.5,
                    state=tmp_path / "state",
                    pages=tmp_path / "pages",
                    idle=20,
                )
            )
            wsd.proc.send_signal(signal.SIGHUP)
            wsd.wait_for(lambda: wsd.logged("need a restart"), "restart warning")
            assert wsd.proc.poll() is None
            assert not wsd.logged("session closed"), "a reload must not end sessions"
            # stderr is no terminal here: every line is one JSON event.
            for record in map(json.loads, wsd.events()):
                assert {"timestamp", "level", "logger", "event"} <= record.keys(), record
    finally:
        assert wsd.stop() == 0, wsd.log_text()


def test_systemd_hears_ready_status_watchdog_reloading_and_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(5)
    env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
    # A ping a second: a datagram socket queues only net.unix.max_dgram_qlen
    # (10) messages, and wsd drops what does not fit (it never blocks), so
    # faster pings could crowd out the STATUS line while the test is busy.
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="2000000")
    wsd = Wsd(tmp_path, env=env)
    heard: list[str] = []

    def hear(field: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = notify.recv(4096).decode()
            heard.append(message)
            if field in message.split("\n"):
                return message
        raise AssertionError(f"no {field} within 60 s; heard {heard}")

    try:
        assert "listening on" in hear("READY=1")
        hear("WATCHDOG=1")
        with PuppetVMM.spawn(4 << 20, handoff=wsd.socket, vm_id="notified"):
            assert hear("STATUS=1 VMs, mode wp-async, 0 MiB evicted"), heard
            wsd.proc.send_signal(signal.SIGHUP)
            hear("RELOADING=1")
            assert "reloaded" in hear("READY=1")
        wsd.proc.send_signal(signal.SIGTERM)
        hear("STOPPING=1")
        assert wsd.proc.wait(30) == 0
    finally:
        if wsd.proc.poll() is None:
            wsd.stop()
        notify.close()
