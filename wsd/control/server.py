"""The control socket: operators' requests (``wsd status``, ``wsd vm ...``) on the daemon's loop.

It is a UNIX socket of its own, apart from the VMMs' hand-off socket, under
the same :class:`~wsd.access.AccessPolicy`: mode 0600 by default, and only
peers the policy allows (root and wsd's own uid by default) get an answer;
others get a ``forbidden`` reply before anything is read from them.  Of the
allowed peers, root and wsd's own user may address any VM (``pause``,
``resume``, ``evict``); the other users and groups ``[access]`` allows are
VMMs' users, and one may address only the VMs whose VMM runs as its uid: a
VMM must not pause or force eviction of another VMM's guest.
``limits.max_pending_connections`` bounds the connections served at once.
One task per connection, in the server's own TaskGroup; nothing here blocks
the loop, so fault service never waits for an operator.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import structlog

from wsd.access import AccessPolicy, PeerCred, peer_cred
from wsd.connections import LineTooLong, ReadError, read_line, serve_connections
from wsd.vmm.limits import HandoffLimits

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

__all__ = ["IDLE_TIMEOUT", "ControlServer", "Handler", "OwnerOf"]

log = structlog.get_logger("wsd.control")

# A connection that sends no complete request for this long is closed, and a
# reply its peer does not read within it ends the connection too.
IDLE_TIMEOUT: Final = 30.0

Handler = Callable[[Request], Awaitable[dict[str, Any]]]
"""Carries out one request; its result is the reply's ``result``; raises ControlError."""

OwnerOf = Callable[[str], int | None]
"""The effective uid the VMM of a tracked VM runs as; None for no such VM."""


class ControlServer:
    """Listens on a UNIX socket and answers each request line with one reply line."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        access: AccessPolicy | None = None,
        limits: HandoffLimits | None = None,
        timeout: float = IDLE_TIMEOUT,
        owner_of: OwnerOf | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.owner_of = owner_of
        self.access = access if access is not None else AccessPolicy()
        self.limits = limits if limits is not None else HandoffLimits()
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.connections = 0
        """Connections being served."""
        self.refused: Counter[str] = Counter()
        """Refusals by error code: connections and requests wsd would not serve."""

    def listen(self) -> None:
        """Create the socket (replacing a stale one); OSError names the path."""
        try:
            # A burst of clients waits in the backlog rather than failing
            # to connect (EAGAIN) while the server is busy accepting.
            sock = self.access.listen(self.path, backlog=self.limits.max_pending_connections)
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
        await serve_connections(self.sock, self.path, self._connection, what="control", log=log)

    async def _connection(self, conn: socket.socket) -> None:
        peer = peer_cred(conn)
        refusal = self.access.refusal(peer)
        if refusal is None and self.connections >= self.limits.max_pending_connections:
            refusal = (
                f"wsd is already serving {self.connections} control connections "
                "(limits.max_pending_connections); try again later"
            )
            code = ErrorCode.BUSY
        else:
            code = ErrorCode.FORBIDDEN
        if refusal is not None:
            self.refused[code] += 1
            log.warning(
                "control connection refused",
                code=str(code),
                peer_pid=peer.pid,
                peer_uid=peer.uid,
                peer_gid=peer.gid,
            )
            await self._send(conn, error_reply(code, refusal))
            return
        self.connections += 1
        try:
            await self._serve(conn, peer)
        finally:
            self.connections -= 1

    async def _serve(self, conn: socket.socket, peer: PeerCred) -> None:
        buffer = bytearray()
        while True:
            try:
                line, _ = await read_line(
                    conn, buffer, timeout=self.timeout, max_bytes=MAX_LINE_BYTES
                )
            except LineTooLong:
                self.refused[ErrorCode.TOO_LARGE] += 1
                await self._send(conn, _too_large())
                return
            except ReadError:  # silent for too long, or gone
                return
            if not await self._send(conn, await self.reply(line, peer)):
                return

    async def reply(self, line: bytes, peer: PeerCred) -> dict[str, Any]:
        """The reply to one request line from ``peer``: a result or one error."""
        try:
            request = parse_request(line)
            self._check_may_address(request, peer)
            return ok_reply(await self.handler(request))
        except ControlError as e:
            self.refused[str(e.code)] += 1
            return e.reply()
        except Exception as e:
            log.exception("control request failed")
            return error_reply(ErrorCode.INTERNAL, f"wsd failed to carry out the request: {e}")

    def _check_may_address(self, request: Request, peer: PeerCred) -> None:
        if request.vm_id is None or self.access.is_privileged(peer):
            return
        if self.owner_of is not None and self.owner_of(request.vm_id) == peer.uid:
            return
        log.warning(
            "control request refused",
            command=str(request.command),
            vm_id=request.vm_id,
            peer_pid=peer.pid,
            peer_uid=peer.uid,
            peer_gid=peer.gid,
        )
        raise ControlError(
            ErrorCode.FORBIDDEN,
            # The same words whether the VM exists or not: no probing for VMs.
            f"{request.command} of 'vm_id' {request.vm_id!r}: peer pid {peer.pid} "
            f"(uid {peer.uid}) may not address it; only root, wsd's own user "
            f"(uid {self.access.own_uid}) and the user its VMM runs as may pause, "
            "resume or evict a VM",
            "vm_id",
        )

    async def _send(self, conn: socket.socket, reply: dict[str, Any]) -> bool:
        """Send one reply; False if the peer went away or did not read it in time."""
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.get_running_loop().sock_sendall(conn, encode(reply))
        except (OSError, TimeoutError):
            return False
        return True


def _too_large() -> dict[str, Any]:
    return error_reply(ErrorCode.TOO_LARGE, f"a request line exceeds {MAX_LINE_BYTES} bytes")
