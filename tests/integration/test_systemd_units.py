"""systemd/wsd.service against the installed systemd: ``systemd-analyze verify`` and ``security``.

``verify`` only warns about an unknown key or a value it cannot parse (and
still exits 0), so a unit counts as clean only when it exits 0 *and* prints
nothing; the mutation tests show that this check catches such mistakes.
``verify`` also checks that ExecStart's binary exists, so the unit is copied
with ExecStart pointing at this venv's ``wsd``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from wsd.config import DaemonSection
from wsd.kernel.sysno import NR

pytestmark = pytest.mark.integration

UNIT = Path(__file__).parents[2] / "systemd" / "wsd.service"
ANALYZE = shutil.which("systemd-analyze")
if ANALYZE is None:
    pytest.skip("systemd-analyze is not installed", allow_module_level=True)


def venv_wsd() -> Path:
    wsd = Path(sys.executable).parent / "wsd"
    if not wsd.exists():
        pytest.skip(f"no wsd console script next to {sys.executable} (pip install -e .)")
    return wsd


def installable(tmp_path: Path, text: str | None = None) -> Path:
    """The unit (or ``text``) as tmp_path/wsd.service, with ExecStart on the venv's wsd."""
    text = UNIT.read_text() if text is None else text
    text, n = re.subn(
        r"^ExecStart=/usr/bin/wsd ", f"ExecStart={venv_wsd()} ", text, flags=re.MULTILINE
    )
    assert n == 1, "the unit should have exactly one ExecStart=/usr/bin/wsd line"
    unit = tmp_path / "wsd.service"
    unit.write_text(text)
    return unit


def verify(unit: Path) -> tuple[int, str]:
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return r.returncode, (r.stdout + r.stderr).strip()


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, in order (keys may repeat, as SystemCallFilter= does)."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out[key.strip()].append(value.strip())
    return out


def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    rc, output = verify(installable(tmp_path))
    assert (rc, output) == (0, "")


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("WatchdogSecs=30s", "Unknown key"),
        ("WatchdogSec=soon", "Failed to parse"),
        ("ProtectSystem=strictly", "Failed to parse"),
        ("SystemCallFilter=@system-servce", "Unknown system call group"),
        ("RestrictAddressFamilies=AF_UNIX AF_VSOCKET", "Failed to parse"),
    ],
)
def test_verify_catches_a_bad_directive(tmp_path: Path, line: str, complaint: str) -> None:
    text, n = re.subn(r"^\[Service\]$", f"[Service]\n{line}", UNIT.read_text(), flags=re.M)
    assert n == 1
    rc, output = verify(installable(tmp_path, text))
    assert (rc, output) != (0, "")  # what test_the_unit_verifies_clean asks would fail
    assert complaint in output, output


def test_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    unit = installable(tmp_path)
    unit.write_text(unit.read_text().replace(str(venv_wsd()), str(tmp_path / "no-such-wsd")))
    rc, output = verify(unit)
    assert rc != 0
    assert "no-such-wsd" in output


def test_the_unit_matches_what_the_daemon_expects() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/usr/bin/wsd run --config /etc/wsd/wsd.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["WatchdogSec"] and d["FileDescriptorStoreMax"]
    # The config's defaults live in the directories systemd creates for the service.
    defaults = DaemonSection()
    assert defaults.socket.parent == Path("/run") / d["RuntimeDirectory"][0]
    assert defaults.state_dir == Path("/var/lib") / d["StateDirectory"][0]
    # verify does not check capability names, so the exact set is spelled out here.
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SYS_NICE"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def _expand(group: str, seen: set[str]) -> set[str]:
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "syscall-filter", group], capture_output=True, text=True, check=True
    )
    names: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                names |= _expand(name, seen)
        else:
            names.add(name)
    return names


def test_the_syscall_filter_allows_what_wsd_calls() -> None:
    allow: set[str] = set()
    deny: set[str] = set()
    for value in directives(UNIT.read_text())["SystemCallFilter"]:
        target, items = (deny, value[1:]) if value.startswith("~") else (allow, value)
        for item in items.split():
            target.update(_expand(item, set()) if item.startswith("@") else {item})
    # The raw syscalls wsd.kernel issues by number, and the ones the daemon
    # depends on through libc (uffd and pagemap ioctls, memfds, hole punching).
    # OpenBLAS, bundled with numpy, calls mbind at import.
    needed = set(vars(NR)) | {
        "ioctl",
        "memfd_create",
        "fallocate",
        "mbind",
        "sendmsg",
        "setpriority",
        "sched_setscheduler",
    }
    assert needed <= allow - deny, sorted(needed - (allow - deny))


def test_security_review_offline(tmp_path: Path) -> None:
    """Runs the offline review; the score is reported in docs/systemd.md, not asserted."""
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--json=short", str(installable(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c["set"] for c in json.loads(r.stdout)}
    for name in (
        "NoNewPrivileges=",
        "ProtectSystem=",
        "PrivateDevices=",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
        "SystemCallFilter=~@privileged",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "RestrictNamespaces=~user",
    ):
        assert checks[name], name
    # The loop thread takes SCHED_FIFO (wsd.priority): seccomp must let it.
    assert not checks["RestrictRealtime="]
