"""Fixtures for the tests with real VMMs: a running ``wsd run``, stand-ins for QEMU."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmms_harness import HERE, StandIn, Wsd


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
