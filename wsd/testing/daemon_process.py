"""``wsd run --config`` as a child process, as the integration tests start it.

Tests that drive a real daemon need the same few things: start it with its
output in a log file, wait until it has created a socket, poll for what it
does next, and stop it for its exit code.  When it dies or a deadline passes,
the failure carries the log, which is where wsd says why.

Every timeout here is what a host needs; in vmtest's VM each is longer
(:func:`wsd.testing.slowness.patient`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from wsd.testing.slowness import patient

__all__ = ["WsdProcess", "wait_for"]

POLL_SECONDS = 0.05


def wait_for(
    cond: Callable[[], object], what: str, timeout: float = 30, *, wsd: WsdProcess | None = None
) -> None:
    """Poll until ``cond()`` holds; fail after ``timeout`` seconds, or as soon as
    ``wsd`` (if given) has exited, with its log in the message."""
    timeout = patient(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wsd is not None:
            wsd.alive()
        if cond():
            return
        time.sleep(POLL_SECONDS)
    log = "" if wsd is None else f": {wsd.log_text()}"
    raise AssertionError(f"no {what} within {timeout} s{log}")


class WsdProcess:
    """``python -m wsd run --config CONFIG`` in a child process, its output in ``log``.

    :meth:`start` runs it until it has created ``ready`` (a socket of the
    config); it may be started again after :meth:`kill`, and the log then
    goes on in the same file.
    """

    proc: subprocess.Popen[bytes]

    def __init__(
        self,
        config: Path,
        log: Path,
        ready: Path,
        *,
        env: Mapping[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        """``wrap``: a command that runs wsd, such as ``setpriv`` dropping a capability."""
        self.config = config
        self.log = log
        self.ready = ready
        self.env = env
        self.wrap = list(wrap)

    def start(self, timeout: float = 30) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "wsd", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.wait_for(self.ready.exists, str(self.ready), timeout)

    def log_text(self) -> str:
        return self.log.read_text()

    def alive(self) -> None:
        assert self.proc.poll() is None, f"wsd exited: {self.log_text()}"

    def wait_for(self, cond: Callable[[], object], what: str, timeout: float = 30) -> None:
        """:func:`wait_for` that fails as soon as wsd exits."""
        wait_for(cond, what, timeout, wsd=self)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (unless it has exited already); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(patient(timeout))

    def kill(self) -> None:
        """SIGKILL: what a crash of wsd leaves behind (its sockets stay as files)."""
        self.proc.kill()
        self.proc.wait(patient(30))
