"""Pipes a VMM keeps for wsd when there is no systemd fd store (``keep`` messages).

In wp-async mode a write that races a page's eviction lives only in wsd's
pipes from the punch until the put-back (:mod:`wsd.evictor.held`).  Under
systemd those pipes wait out a crash in the fd store.  Without it the one
process that outlives wsd and gives a session back is the VMM, which keeps
its uffd for that already (docs/protocol.md, requirement 1).  So wsd sends
it the pipes on the session's connection, one ``keep`` line per batch with
the read ends attached, each before any punch that uses them, and a VMM that
reattaches gives them back (``"held"``).  The VMM never reads them.

The lines follow the ``accepted`` reply, so a VMM must read that reply no
further than its newline (:func:`wsd.vmm.client.read_reply`): a read past it
would take a ``keep`` line's pipes with it, and a plain ``recv`` closes them.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Sequence
from typing import Any

from wsd.kernel import KernelError, close_fds, recv_with_fds, send_with_fds
from wsd.kernel.scm import SCM_MAX_FD

KEEP = "keep"
VERSION = 1  # the hand-off protocol's; not imported, to keep a VMM's import light


def keep_line(vm_id: str, first: int) -> bytes:
    msg = {"type": KEEP, "version": VERSION, "vm_id": vm_id, "first": first}
    return json.dumps(msg).encode() + b"\n"


class VmmKeeper:
    """wsd's side: the VMM's connection, as the place a session's pipes outlive wsd.

    Owns a duplicate of the connection, so that the server closing its own at
    the session's end cannot leave a punch thread sending into a reused fd.
    """

    def __init__(self, vm_id: str, conn: socket.socket) -> None:
        self.vm_id = vm_id
        self._sock: socket.socket | None = conn.dup()
        self._sock.setblocking(False)  # as the event loop has it already
        self._lock = threading.Lock()

    def keep(self, pipes: Sequence[int], first: int) -> None:
        """Send pipes ``first``, ``first + 1``... to the VMM; raises KernelError.

        A VMM whose receive queue is full gets nothing, and the punch that
        needed the pipes does not happen: the punch thread never waits here.
        """
        with self._lock:
            if self._sock is None:
                raise KernelError(errno.EPIPE, "sendmsg(SCM_RIGHTS)", detail="session over")
            send_with_fds(self._sock, keep_line(self.vm_id, first), pipes)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class KeptPipes:
    """The VMM's side: what wsd asked it to keep on one session's connection.

    Call :meth:`receive` wherever the connection is read (instead of
    ``recv``, which would close the pipes); pass :attr:`parts` in order with
    a ``reattach`` (:meth:`reattach`); :meth:`close` once a wsd took the
    session back, or it is over.
    """

    def __init__(self) -> None:
        self.parts: list[int] = []
        self._buffer = b""

    def receive(self, sock: socket.socket) -> bool:
        """Read what wsd sent; False once wsd has closed the connection."""
        try:
            data, fds = recv_with_fds(sock, 65536, SCM_MAX_FD)
        except KernelError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                return False
            raise
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if fds and (not lines or self._buffer):
            close_fds(fds)  # not a line sent whole with its pipes, as wsd sends them
            fds = []
        # recvmsg(2) stops after the bytes that carried fds: they are the last line's.
        for k, line in enumerate(lines):
            self._take(line, fds if k == len(lines) - 1 else [])
        return bool(data)

    def _take(self, line: bytes, fds: list[int]) -> None:
        try:
            msg = json.loads(line)
            first = msg["first"] if msg.get("type") == KEEP else None
        except (ValueError, TypeError, KeyError, AttributeError):
            first = None
        if fds and first == len(self.parts):
            self.parts += fds
        else:  # not a keep line, or one out of order
            close_fds(fds)

    def reattach(
        self, message: dict[str, Any], fds: Sequence[int]
    ) -> tuple[dict[str, Any], list[int]]:
        """``message`` and ``fds`` (a ``reattach``) with the kept pipes given back."""
        held = list(range(len(fds), len(fds) + len(self.parts)))
        return {**message, "held": held} if held else message, [*fds, *self.parts]

    def close(self) -> None:
        close_fds(self.parts)
        self.parts, self._buffer = [], b""
