"""The command line: what ``wsd attach`` and ``wsd status`` / ``wsd vm`` share (the
socket, the failures), and what the parser loads."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from wsd import kernel
from wsd.cli import main
from wsd.cmdline import Exit, attempt, socket_path
from wsd.config import ConfigError
from wsd.kernel import FeatureUnavailable


def args(socket: Path | None = None, config: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(socket=socket, config=config)


def test_the_socket_comes_from_the_flag_then_the_config_then_the_default(tmp_path: Path) -> None:
    conf = tmp_path / "wsd.toml"
    conf.write_text(
        f'[daemon]\nsocket = "{tmp_path}/h.sock"\ncontrol_socket = "{tmp_path}/c.sock"\n'
    )
    assert socket_path(args(tmp_path / "x.sock", conf), "socket") == tmp_path / "x.sock"
    assert socket_path(args(config=conf), "socket") == tmp_path / "h.sock"
    assert socket_path(args(config=conf), "control_socket") == tmp_path / "c.sock"
    assert socket_path(args(), "control_socket") == Path("/run/wsd/control.sock")


def test_failures_print_one_line_and_give_their_exit_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(e: BaseException) -> object:
        raise e

    failures = [((FileNotFoundError, ConnectionRefusedError), 2), (OSError, 1)]
    assert attempt("wsd x", lambda: 7, failures) == 7
    assert attempt("wsd x", lambda: fail(ConnectionRefusedError("refused")), failures) == Exit(2)
    # The first match wins: a PermissionError is an OSError.
    assert attempt("wsd x", lambda: fail(PermissionError("no")), failures) == Exit(1)
    assert attempt("wsd x", lambda: fail(ConfigError("bad key")), ()) == Exit(2)
    assert capsys.readouterr().err.splitlines() == ["wsd x: refused", "wsd x: no", "wsd x: bad key"]
    with pytest.raises(ValueError):
        attempt("wsd x", lambda: fail(ValueError("not listed")), failures)


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["status"], "wsd: "),
        (["vm", "pause", "a"], "wsd: "),
        (["attach", "--pid", "1"], "wsd attach: "),
    ],
)
def test_a_bad_config_file_is_exit_status_2_for_every_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], prefix: str
) -> None:
    conf = tmp_path / "wsd.toml"
    conf.write_text("[daemon]\nno_such_key = 1\n")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--config", str(conf)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and "no_such_key" in err, err


# What the daemon's side loads; a client command loads none of it (wsd.cli).
HEAVY = (
    "numpy",
    "uvloop",
    "prometheus_client",
    "redis",
    "zstandard",
    "cryptography",
    "wsd.daemon",
    "wsd.kernel",
    "wsd.evictor.evictor",
    "wsd.storage.registry",
    "wsd.attach.adopt",
    "wsd.guest.process",
)


def test_the_command_line_loads_nothing_a_client_command_does_not_run() -> None:
    code = f"import sys, wsd.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def test_the_daemon_imports_what_numpy_would_import_on_the_loop_later() -> None:
    """np.unique imports numpy.ma on its first call (a 10 ms stall of fault service)."""
    code = "import sys, wsd.daemon; print('numpy.ma' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out


def test_a_missing_kernel_feature_is_exit_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable() -> None:
        raise FeatureUnavailable("userfaultfd(2)", "CONFIG_USERFAULTFD=y")

    monkeypatch.setattr(kernel, "probe_kernel", unavailable)
    with pytest.raises(SystemExit) as e:
        main(["kernel-info"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("wsd: ") and "userfaultfd(2)" in err and "CONFIG_USERFAULTFD=y" in err


def test_other_errors_of_a_command_are_not_turned_into_exit_statuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(kernel, "probe_kernel", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["kernel-info"])
