"""Run ``wsd guest`` in a child process and read what it did (for tests and benchmarks).

::

    with GuestProcess.start(["--no-handoff", "--size", "32M", "--duration", "2"]) as g:
        g.ready.base, g.truth()[0].hot    # once running: its mapping, its hot set
        assert g.wait() == 0
        g.report()["ops_per_s"]
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

__all__ = ["GuestError", "GuestProcess", "GuestReady", "TruthRecord", "read_truth"]


class GuestError(RuntimeError):
    """The guest exited (or hung) before it was running; carries its status and stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(f"{message} (exit status {returncode}): {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class GuestReady:
    """What the guest announces once its workload runs."""

    pid: int
    vm_id: str
    base: int
    size: int
    page_size: int
    pages: int
    hot_pages: int
    seed: int
    memfd: int  # fd numbers in the guest, e.g. for pidfd_getfd
    uffd: int | None
    handoff: dict[str, Any] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TruthRecord:
    """One phase of the guest: from ``t`` (CLOCK_MONOTONIC) on, exactly ``hot`` is touched."""

    phase: int
    t: float
    page_size: int
    hot: npt.NDArray[np.int64]


def read_truth(path: Path) -> list[TruthRecord]:
    out = []
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # being written
            rec = json.loads(line)
            out.append(
                TruthRecord(
                    rec["phase"], rec["t"], rec["page_size"], np.array(rec["hot"], dtype=np.int64)
                )
            )
    return out


class GuestProcess:
    """A running ``python -m wsd.guest``; its report and truth go to ``workdir``."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, owns_workdir: bool) -> None:
        self.proc = proc
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self.report_path = workdir / "report.json"
        self.truth_path = workdir / "truth.jsonl"
        self.stderr_path = workdir / "stderr.txt"
        self.ready: GuestReady | None = None
        # What close() read before removing a temporary workdir.
        self._kept: tuple[dict[str, Any] | None, list[TruthRecord], str] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        workdir: Path | None = None,
        ready_timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> Self:
        """Start a guest with ``args`` (the CLI options) and wait until it runs.

        ``--report``, ``--truth`` and ``--ready-fd`` are added here.  Raises
        GuestError if it exits first (a refused hand-off, say).
        """
        for own in ("--report", "--truth", "--ready-fd"):
            if any(a == own or a.startswith(own + "=") for a in args):
                raise ValueError(f"GuestProcess sets {own} itself")
        owns = workdir is None
        wd = Path(tempfile.mkdtemp(prefix="wsd-guest-")) if workdir is None else workdir
        wd.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe2(os.O_CLOEXEC)
        # Nice values are per thread and inherited: started from wsd's raised loop
        # thread (in-process tests), a guest would run at -10, level with fault
        # service.  A VMM beside wsd runs at 0.
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        cmd = [
            *(["nice", "-n", str(-own_nice)] if own_nice < 0 else []),
            sys.executable,
            "-m",
            "wsd.guest",
            *args,
            "--report",
            str(wd / "report.json"),
            "--truth",
            str(wd / "truth.jsonl"),
            "--ready-fd",
            str(w),
        ]
        try:
            with (wd / "stdout.txt").open("wb") as out, (wd / "stderr.txt").open("wb") as err:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, pass_fds=[w], env=env)
        finally:
            os.close(w)
        guest = cls(proc, wd, owns)
        try:
            guest._wait_ready(r, ready_timeout)
        except BaseException:
            guest.kill()
            if owns:
                shutil.rmtree(wd, ignore_errors=True)
            raise
        finally:
            os.close(r)
        return guest

    def _wait_ready(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise GuestError(f"guest not running after {timeout:g} s", None, self.stderr())
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait(timeout=30)
                raise GuestError("guest exited before it was running", code, self.stderr())
            buf += chunk
        self.ready = GuestReady.from_json(json.loads(buf))

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the report to be written."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """SIGSTOP the guest for the block, SIGCONT after: its pages go cold meanwhile.

        What a test waits for under a running guest's writers (pages that stay
        evicted, a tier that fills) otherwise depends on how fast they run.
        """
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if self.proc.poll() is None:
                os.kill(self.pid, signal.SIGCONT)

    def report(self) -> dict[str, Any]:
        """The report the guest wrote at exit (FileNotFoundError while it runs)."""
        if self._kept is not None:
            if self._kept[0] is None:
                raise FileNotFoundError(f"guest {self.pid} wrote no report")
            return self._kept[0]
        data: dict[str, Any] = json.loads(self.report_path.read_text())
        return data

    def truth(self) -> list[TruthRecord]:
        if self._kept is not None:
            return self._kept[1]
        return read_truth(self.truth_path)

    def stderr(self) -> str:
        if self._kept is not None:
            return self._kept[2]
        with contextlib.suppress(FileNotFoundError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def close(self) -> None:
        """Kill the guest if it still runs; report(), truth() and stderr() keep working."""
        self.kill()
        if self._owns_workdir and self._kept is None:
            report = None
            with contextlib.suppress(FileNotFoundError):
                report = self.report()
            truth = self.truth() if self.truth_path.exists() else []
            self._kept = (report, truth, self.stderr())
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
