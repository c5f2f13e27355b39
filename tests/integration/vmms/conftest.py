"""Fixtures for the tests with real VMMs: a running ``wsd run``, stand-ins for QEMU."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmms_harness import HERE, StandIn, Wsd


@pytest.fixture(scope="session", autouse=True)
def sigint_heard_by_children() -> Iterator[None]:
    """``Attach.stop()`` sends ^C (SIGINT), as an operator would.

    A test run started in the background (``cmd &`` in a shell without job
    control, as a CI script may be) ignores SIGINT; children inherit that
    through exec, and Python then never raises KeyboardInterrupt in them.  A
    handler in this process is reset to the default in each child instead.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def standin_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (tools/bootstrap.sh installs it)")
    out = tmp_path_factory.mktemp("standin") / "standin"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Werror", "-o", str(out), str(HERE / "standin.c")], check=True
    )
    return out


@pytest.fixture
def standin(standin_binary: Path) -> Iterator[Callable[[int, int], StandIn]]:
    started: list[StandIn] = []

    def start(size_mib: int = 32, hot_pages: int = 64) -> StandIn:
        s = StandIn(standin_binary, size_mib, hot_pages)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def wsd(tmp_path: Path) -> Iterator[Wsd]:
    w = Wsd(tmp_path)
    yield w
    assert w.stop() == 0, w.log.read_text()
