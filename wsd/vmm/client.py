"""The VMM side of the hand-off, for ``wsd guest``, tests and VMM authors to read."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsd.kernel import send_with_fds


class HandoffRefused(RuntimeError):
    def __init__(self, reply: dict[str, Any]) -> None:
        err = reply.get("error", {})
        super().__init__(f"wsd refused the hand-off: {err.get('code')}: {err.get('message')}")
        self.code: str | None = err.get("code")
        self.field: str | None = err.get("field")
        self.reply = reply


def read_reply(sock: socket.socket) -> dict[str, Any]:
    """The reply line, and not a byte more: ``keep`` lines may follow with
    pipes attached, which a ``recv`` past the newline would close (:mod:`wsd.vmm.kept`)."""
    buf = b""
    while True:
        ahead = sock.recv(65536, socket.MSG_PEEK)
        if not ahead:
            raise ConnectionError("wsd closed the connection without a reply")
        end = ahead.find(b"\n")
        buf += sock.recv(len(ahead) if end < 0 else end + 1)
        if end >= 0:
            break
    reply: dict[str, Any] = json.loads(buf)
    return reply


def hand_off(
    path: Path | str,
    message: dict[str, Any] | bytes,
    fds: Sequence[int],
    *,
    timeout: float = 30.0,
) -> tuple[dict[str, Any], socket.socket]:
    """Send a hand-off; return the ``accepted`` reply and the open connection.

    Keep the connection open for as long as wsd should manage the memory:
    closing it ends the session.  Raises HandoffRefused on an error reply.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        # If wsd stopped reading early (a message too large), its reply says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            send_with_fds(sock, data, fds)
        reply = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    if reply.get("type") != "accepted":
        sock.close()
        raise HandoffRefused(reply)
    return reply, sock
