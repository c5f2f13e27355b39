"""wsd.sdnotify against a fake systemd: a datagram socket standing in for $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wsd import sdnotify
from wsd.sdnotify import Notifier, watchdog_interval


class FakeSystemd:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        """What $NOTIFY_SOCKET says: a path, or @name for the abstract namespace."""

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


def _listener(bind_to: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(bind_to)
    s.setblocking(False)
    return s


@pytest.fixture
def path_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = str(tmp_path / "notify")
    with _listener(path) as s:
        yield FakeSystemd(s, path)


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"wsd-test-notify-{uuid.uuid4().hex}"
    with _listener("\0" + name) as s:
        yield FakeSystemd(s, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> FakeSystemd:
    fixture = "path_systemd" if request.param == "path" else "abstract_systemd"
    fake: FakeSystemd = request.getfixturevalue(fixture)
    return fake


def test_each_call_sends_its_exact_datagram(systemd: FakeSystemd) -> None:
    n = Notifier({"NOTIFY_SOCKET": systemd.address}, clock_ns=lambda: 12_345_678_901)
    assert n.ready()
    assert n.ready("listening on /run/wsd/wsd.sock")
    assert n.status("3 VMs, 1.5 GiB evicted")
    assert n.watchdog()
    assert n.reloading()
    assert n.extend_timeout(2.5)
    assert n.stopping()
    assert n.stopping("draining 2 VMs")
    assert n.notify("FDSTORE=1", "FDNAME=vm-42")
    assert systemd.received() == [
        b"READY=1",
        b"READY=1\nSTATUS=listening on /run/wsd/wsd.sock",
        b"STATUS=3 VMs, 1.5 GiB evicted",
        b"WATCHDOG=1",
        b"RELOADING=1\nMONOTONIC_USEC=12345678",
        b"EXTEND_TIMEOUT_USEC=2500000",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=draining 2 VMs",
        b"FDSTORE=1\nFDNAME=vm-42",
    ]


def test_a_newline_in_a_status_cannot_inject_a_field(path_systemd: FakeSystemd) -> None:
    n = Notifier({"NOTIFY_SOCKET": path_systemd.address})
    assert n.status("vm-1 failed\nREADY=1")
    assert path_systemd.received() == [b"STATUS=vm-1 failed READY=1"]


@pytest.mark.parametrize("fields", [(), ("READY",), ("STATUS=a\nREADY=1",)])
def test_malformed_fields_are_a_programming_error(fields: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Notifier({}).notify(*fields)


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.ready()
    assert not n.watchdog()
    assert not n.stopping("bye")


def test_a_failing_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with capture_logs() as logs:
        assert not n.ready()
        assert not n.watchdog()
        assert not n.stopping()
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert "nobody-listens" in logs[0]["socket"]


def test_an_unsupported_address_is_logged_not_raised() -> None:
    with capture_logs() as logs:
        assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).ready()
    assert "unsupported" in logs[0]["error"]


def test_module_functions_use_the_process_environment(
    path_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_systemd.address)
    assert sdnotify.ready()
    assert sdnotify.status("ok")
    assert sdnotify.watchdog()
    assert sdnotify.stopping()
    assert sdnotify.reloading()
    assert sdnotify.extend_timeout(1)
    assert sdnotify.notify("X_WSD=1")
    got = path_systemd.received()
    assert got[:4] == [b"READY=1", b"STATUS=ok", b"WATCHDOG=1", b"STOPPING=1"]
    assert got[4].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert got[5:] == [b"EXTEND_TIMEOUT_USEC=1000000", b"X_WSD=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.ready()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0
