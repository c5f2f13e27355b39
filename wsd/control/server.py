"""The control socket: operators' requests (``wsd status``, ``wsd vm ...``) on the daemon's loop.

It is a UNIX socket of its own, apart from the VMMs' hand-off socket, under
the same :class:`~wsd.access.AccessPolicy`: mode 0600 by default, and only
peers the policy allows (root and wsd's own uid by default) get an answer.
A control request can pause eviction or force it for any VM, so others get
a ``forbidden`` reply instead.  One task per connection, in the server's own
TaskGroup; nothing here blocks the loop, so fault service never waits for an
operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import structlog

from wsd.access import AccessPolicy, peer_cred

from .protocol import (
    MAX_LINE_BYTES,
    ControlError,
    ErrorCode,
    Request,
    encode,
    error_reply,
    ok_reply,
    parse_request,
)

__all__ = ["ControlServer", "Handler"]

log = structlog.get_logger("wsd.control")

# A connection that sends no complete request for this long is closed.
IDLE_TIMEOUT: Final = 30.0

Handler = Callable[[Request], Awaitable[dict[str, Any]]]
"""Carries out one request; its result is the reply's ``result``; raises ControlError."""


class ControlServer:
    """Listens on a UNIX socket and answers each request line with one reply line."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        access: AccessPolicy | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.access = access if access is not None else AccessPolicy()
        self.sock: socket.socket | None = None

    def listen(self) -> None:
        """Create the socket (replacing a stale one); OSError names the path."""
        try:
            sock = self.access.listen(self.path, backlog=16)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot create the control socket {self.path}: {e.strerror or e}"
            ) from e
        self.sock = sock

    async def serve(self) -> None:
        """Accept until cancelled, then close and remove the socket."""
        if self.sock is None:
            self.listen()
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    conn, _ = await loop.sock_accept(self.sock)
                    conn.setblocking(False)
                    tg.create_task(self._connection(conn))
        finally:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _connection(self, conn: socket.socket) -> None:
        # A misbehaving client must never take the server (or the daemon) down.
        try:
            with conn:
                await self._serve_connection(conn)
        except Exception:
            log.exception("control connection failed")

    async def _serve_connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = peer_cred(conn)
        refusal = self.access.refusal(peer)
        buffer = bytearray()
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    while b"\n" not in buffer:
                        if len(buffer) > MAX_LINE_BYTES:
                            await _send(conn, _too_large())
                            return
                        chunk = await loop.sock_recv(conn, 65536)
                        if not chunk:
                            return
                        buffer += chunk
            except (TimeoutError, ConnectionError):
                return
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer = bytearray(rest)
            if len(line) > MAX_LINE_BYTES:
                await _send(conn, _too_large())
                return
            if refusal is not None:
                log.warning("control request refused", peer_uid=peer.uid, peer_pid=peer.pid)
                await _send(conn, error_reply(ErrorCode.FORBIDDEN, refusal))
                return
            await _send(conn, await self._reply(line))

    async def _reply(self, line: bytes) -> dict[str, Any]:
        try:
            return ok_reply(await self.handler(parse_request(line)))
        except ControlError as e:
            return e.reply()
        except Exception as e:
            log.exception("control request failed")
            return error_reply(ErrorCode.INTERNAL, f"wsd failed to carry out the request: {e}")


def _too_large() -> dict[str, Any]:
    return error_reply(ErrorCode.TOO_LARGE, f"a request line exceeds {MAX_LINE_BYTES} bytes")


async def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the client went away: nothing to tell it
        await asyncio.get_running_loop().sock_sendall(conn, encode(reply))
