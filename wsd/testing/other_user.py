"""Run part of a test as another user: a forked child that drops to a uid and gid.

The kernel then reports the child's real credentials (``SO_PEERCRED``, the
uid in ``/proc``), which is what wsd's access checks read.  The child does
not exec: the venv's interpreter lives under ``/root``, which other users
cannot read.  It reports what its body returned as JSON through a pipe.
Root only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["AsUser", "run_as"]


class AsUser:
    """A forked child that runs ``setup()`` as root, drops to ``uid``/``gid``
    (``uid`` None: stays root), runs ``body(setup's result)``, reports what it
    returned and lives on until :meth:`stop` (a VMM keeps its memory and its
    connection to wsd that long)."""

    # The stop pipes of the children still running: a child forked later
    # inherits them and must close them, or a stop would never reach them.
    _running: ClassVar[set[int]] = set()

    def __init__(
        self,
        uid: int | None,
        gid: int,
        body: Callable[[Any], Any],
        setup: Callable[[], Any] = lambda: None,
    ) -> None:
        result_r, result_w = os.pipe()
        stop_r, stop_w = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a threaded process; the child
            # only sets its ids, talks to sockets and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            out: dict[str, Any] = {}
            try:
                os.close(result_r)
                os.close(stop_w)
                for fd in AsUser._running:
                    os.close(fd)
                state = setup()
                if uid is not None:
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
                out["pid"] = os.getpid()
                out["result"] = body(state)
            except BaseException as e:
                out["child_error"] = repr(e)
            finally:
                with contextlib.suppress(BaseException):
                    os.write(result_w, json.dumps(out).encode())
                    os.close(result_w)
                    os.read(stop_r, 1)  # until the parent closes it
                os._exit(0)
        os.close(result_w)
        os.close(stop_r)
        self.pid = pid
        self._stop = stop_w
        AsUser._running.add(stop_w)
        with os.fdopen(result_r, "rb") as f:
            self.out: dict[str, Any] = json.loads(f.read() or b"{}")
        if "result" not in self.out:
            self.stop()
            raise AssertionError(f"child {pid} failed: {self.out}")

    @property
    def result(self) -> Any:
        """What ``body`` returned."""
        return self.out["result"]

    def stop(self) -> None:
        """Let the child exit, and reap it."""
        if self._stop >= 0:
            AsUser._running.discard(self._stop)
            os.close(self._stop)
            self._stop = -1
            os.waitpid(self.pid, 0)


def run_as(uid: int, gid: int, body: Callable[[], Any]) -> Any:
    """``body()`` in a child running as ``uid``/``gid``; what it returned."""
    child = AsUser(uid, gid, lambda _: body())
    child.stop()
    return child.result
