"""A minimal stand-in for systemd: one ``Type=notify`` service with an fd store.

It speaks the part of the protocol wsd uses, so that crash-and-restart tests
run where systemd is not PID 1 (the test VM, CI containers):

* ``$NOTIFY_SOCKET`` datagrams: ``READY=1``, ``STATUS=``, ``FDSTORE=1`` with
  ``FDNAME=`` and the fds attached (``SCM_RIGHTS``), ``FDSTOREREMOVE=1`` with
  ``FDNAME=``;
* each (re)started process gets the stored fds from fd 3 on, with
  ``$LISTEN_FDS``, ``$LISTEN_FDNAMES`` and ``$LISTEN_PID`` set as
  sd_listen_fds(3) expects.  ``$LISTEN_PID`` must be the service's own pid, so
  the service is started through this module's ``exec`` mode, which moves the
  fds into place, sets the variables and ``exec``\\ s the service.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

LISTEN_FDS_START = 3


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        notify: bool = True,
    ) -> None:
        """``notify=False`` runs the service without ``$NOTIFY_SOCKET`` (no fd store, no READY)."""
        self.notify = notify
        self.argv = list(argv)
        self.workdir = workdir
        self.env = dict(os.environ if env is None else env)
        self.notify_path = workdir / "notify.sock"
        self.notify_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self.notify_path))
        self._lock = threading.Lock()
        self.stored: list[tuple[str, int]] = []
        self.statuses: list[str] = []
        self._ready = threading.Event()
        self._synced = threading.Condition(self._lock)
        self._syncs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="notify", daemon=True)
        self._reader.start()

    # -- the notify socket ---------------------------------------------------------

    def _read(self) -> None:
        while not self._closing:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self._sock, 65536, 253, socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                if "WSD_SUPERVISOR_SYNC" in fields:
                    self._syncs = int(fields["WSD_SUPERVISOR_SYNC"])
                    self._synced.notify_all()
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    # systemd keeps one copy of an open file it has already
                    # (service_add_fd_store: "Suppressing duplicate fd").
                    for fd in fds:
                        if not self._has(fd):
                            self.stored.append((name, fd))
                    fds = [fd for fd in fds if (name, fd) not in self.stored]
                if fields.get("FDSTOREREMOVE") == "1":
                    name = fields.get("FDNAME", "")
                    for n, fd in [x for x in self.stored if x[0] == name]:
                        os.close(fd)
                        self.stored.remove((n, fd))
                if "STATUS" in fields:
                    self.statuses.append(fields["STATUS"])
            for fd in fds:  # attached to anything but FDSTORE: systemd closes them too
                os.close(fd)
            if fields.get("READY") == "1":
                self._ready.set()

    def _has(self, fd: int) -> bool:
        """Whether the store has this open file (systemd's ``same_fd()`` without
        kcmp(2): the same inode, opened with the same flags)."""
        st, flags = os.fstat(fd), fcntl.fcntl(fd, fcntl.F_GETFL)
        return any(
            os.path.samestat(st, os.fstat(kept)) and fcntl.fcntl(kept, fcntl.F_GETFL) == flags
            for _, kept in self.stored
        )

    def _drain(self, timeout: float = 30.0) -> None:
        """Handle every message already sent, as systemd does before it acts on a
        service's death: the notify socket is read before SIGCHLD is.  A dead
        service's last ``FDSTORE=1`` may still sit in the socket's queue."""
        with self._lock:
            want = self._syncs + 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(f"WSD_SUPERVISOR_SYNC={want}".encode(), str(self.notify_path))
        with self._lock:
            if not self._synced.wait_for(lambda: self._syncs >= want, timeout):
                raise RuntimeError("the notify socket was not drained")

    def stored_names(self) -> list[str]:
        with self._lock:
            return [n for n, _ in self.stored]

    # -- the service -----------------------------------------------------------------

    def start(self, ready_timeout: float = 120.0, log: Path | None = None) -> None:
        """Start the service with the stored fds; wait for ``READY=1`` (if ``notify``)."""
        self._ready.clear()
        with self._lock:
            names = [n for n, _ in self.stored]
            fds = [fd for _, fd in self.stored]
        env = dict(self.env, NOTIFY_SOCKET=str(self.notify_path))
        if not self.notify:
            del env["NOTIFY_SOCKET"]
        argv = [
            sys.executable,
            "-m",
            "wsd.testing.supervisor",
            "exec",
            ",".join(map(str, fds)),
            ":".join(names),
            "--",
            *self.argv,
        ]
        out = (log or self.workdir / "service.log").open("ab")
        try:
            self.proc = subprocess.Popen(argv, env=env, pass_fds=fds, stdout=out, stderr=out)
        finally:
            out.close()
        self.starts += 1
        if self.notify and not self._ready.wait(ready_timeout):
            code = self.proc.poll()
            raise RuntimeError(f"service not ready after {ready_timeout:g} s (exit {code})")

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the service can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._drain()

    def stop(self, timeout: float = 300.0) -> int:
        """SIGTERM and wait: a clean stop."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.kill()
        self._closing = True
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(5)
        with self._lock:
            for _, fd in self.stored:
                os.close(fd)
            self.stored.clear()
        self.notify_path.unlink(missing_ok=True)


def _exec(fd_list: str, names: str, argv: list[str]) -> None:
    """Move the inherited fds to 3, 4, ... and exec ``argv`` as sd_listen_fds(3) wants."""
    fds = [int(x) for x in fd_list.split(",") if x]
    # Out of the way first: a source may sit where another one must go.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if fds:
        env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
    os.execvpe(argv[0], argv, env)


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "exec" or args[3] != "--":
        sys.exit("usage: python -m wsd.testing.supervisor exec FDS NAMES -- ARGV...")
    _exec(args[1], args[2], args[4:])


if __name__ == "__main__":
    main()
