"""sd_notify(3) without libsystemd: tell systemd wsd is ready, alive, reloading or stopping.

The protocol is one datagram of newline-separated ``KEY=VALUE`` fields sent to
the AF_UNIX socket ``$NOTIFY_SOCKET`` names (a path, or ``@name`` in the
abstract namespace).  Without ``$NOTIFY_SOCKET`` (not under systemd, or not
``Type=notify``) every call does nothing.  A failed send is logged once and
otherwise ignored: a lost status line must never take the daemon down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from wsd.kernel import send_with_fds

log = structlog.get_logger("wsd.sdnotify")


class Notifier:
    """Sends to the socket ``environ["NOTIFY_SOCKET"]`` names (looked up at each send)."""

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        *,
        clock_ns: Callable[[], int] = time.monotonic_ns,  # CLOCK_MONOTONIC, as systemd wants
    ) -> None:
        self.environ = environ
        self.clock_ns = clock_ns
        self._warned = False

    def notify(self, *fields: str, fds: Sequence[int] = ()) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram (``fds`` attached); True if it went out."""
        if not fields or any("=" not in f or "\n" in f for f in fields):
            raise ValueError(f"notify fields must be KEY=VALUE lines, got {fields!r}")
        target = self.environ.get("NOTIFY_SOCKET", "")
        if not target:
            return False
        try:
            if target[0] not in "/@":  # e.g. vsock: (systemd 253+), not needed here
                raise OSError(f"unsupported NOTIFY_SOCKET address {target!r}")
            addr = "\0" + target[1:] if target[0] == "@" else target
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)  # never stall the event loop; systemd reads promptly
                if fds:
                    s.connect(addr)
                    send_with_fds(s, "\n".join(fields).encode(), fds)
                else:
                    s.sendto("\n".join(fields).encode(), addr)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify failed (not logged again)", socket=target, error=str(e))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self) -> bool:
        """RELOADING=1; send :meth:`ready` when the reload is done.

        systemd 253+ (``Type=notify-reload``) wants the CLOCK_MONOTONIC time
        with it; 252 ignores the extra field.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self.clock_ns() // 1000}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout (e.g. while draining)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _status(text: str | None) -> tuple[str, ...]:
    # A newline would end the field early and start a bogus one.
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, *, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` keep-alives, or None when there is no watchdog.

    Half of ``WatchdogSec=`` (``$WATCHDOG_USEC``), as sd_watchdog_enabled(3)
    advises; None too when ``$WATCHDOG_PID`` names another process.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        owner = int(environ.get("WATCHDOG_PID", "0"))
    except ValueError:
        return None
    if usec <= 0 or (owner and owner != (os.getpid() if pid is None else pid)):
        return None
    return usec / 2_000_000


_default = Notifier()
"""The process's notifier, reading ``os.environ``; the functions below use it."""


def notify(*fields: str, fds: Sequence[int] = ()) -> bool:
    return _default.notify(*fields, fds=fds)


def present() -> bool:
    """Whether there is a ``$NOTIFY_SOCKET`` to send to."""
    return bool(_default.environ.get("NOTIFY_SOCKET"))


def ready(status: str | None = None) -> bool:
    return _default.ready(status)


def status(text: str) -> bool:
    return _default.status(text)


def watchdog() -> bool:
    return _default.watchdog()


def stopping(status: str | None = None) -> bool:
    return _default.stopping(status)


def reloading() -> bool:
    return _default.reloading()


def extend_timeout(seconds: float) -> bool:
    return _default.extend_timeout(seconds)
