"""The hand-off socket: accept VMM connections, validate, hand fds to a session.

One connection carries one hand-off and then stays open for the life of the
session: when the VMM closes it (or dies), the session is torn down.  Every
refusal is a JSON error reply naming what was wrong; the daemon and its other
sessions carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from wsd.access import AccessPolicy, PeerCred, peer_cred
from wsd.connections import (
    ClosedEarly,
    FdsRefused,
    LineTimeout,
    LineTooLong,
    read_line,
    serve_connections,
)
from wsd.kernel import close_fds
from wsd.kernel.procfs import PROC

from .fdcheck import check_fds
from .limits import HandoffLimits, check_request
from .mappings import check_mappings
from .onbehalf import check_on_behalf
from .protocol import (
    MAX_FDS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    HandoffError,
    HandoffRequest,
    parse_request,
)

__all__ = [
    "MESSAGE_TIMEOUT",
    "Accepted",
    "Handler",
    "HandoffServer",
    "PeerCred",
    "accepted_reply",
    "peer_cred",
    "receive_message",
]

log = structlog.get_logger("wsd.vmm")

MESSAGE_TIMEOUT = HandoffLimits().message_timeout_seconds


@dataclass
class Accepted:
    """What a handler returns: the reply body and how to end the session."""

    reply: dict[str, Any]
    close: Callable[[], Awaitable[None]]
    replied: Callable[[socket.socket], None] | None = None
    """Called with the connection once the reply is sent: what the session
    sends the VMM later must not get ahead of it."""


# The handler owns the fds from the moment it is called, on success and failure.
Handler = Callable[[HandoffRequest, list[int], PeerCred], Awaitable[Accepted]]


async def receive_message(
    sock: socket.socket, *, timeout: float = MESSAGE_TIMEOUT
) -> tuple[bytes, list[int]]:
    """Read one ``\\n``-terminated message and every fd attached to its bytes.

    Raises HandoffError (after closing what was received) when the message is
    too large, too slow, cut short, or carries more fds than allowed.
    """
    buffer = bytearray()
    try:
        line, fds = await read_line(
            sock, buffer, timeout=timeout, max_bytes=MAX_MESSAGE_BYTES, max_fds=MAX_FDS
        )
    except LineTooLong:
        raise HandoffError(
            ErrorCode.TOO_LARGE, f"message exceeds {MAX_MESSAGE_BYTES} bytes"
        ) from None
    except LineTimeout as e:
        raise HandoffError(
            ErrorCode.TIMEOUT,
            f"no complete message within {timeout:g} s of connecting "
            f"(limits.message_timeout_seconds); got {e.received} bytes without a newline",
        ) from None
    except ClosedEarly:
        raise HandoffError(
            ErrorCode.INVALID,
            "connection closed before the end of the message (a message ends with a newline)",
        ) from None
    except FdsRefused as e:
        raise HandoffError(ErrorCode.BAD_FDS, e.why, "fds") from e
    if len(line) + 1 + len(buffer) > MAX_MESSAGE_BYTES + 1:
        close_fds(fds)
        raise HandoffError(ErrorCode.TOO_LARGE, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
    if buffer.strip():
        close_fds(fds)
        raise HandoffError(ErrorCode.INVALID, "data after the end of the message")
    return line, fds


class HandoffServer:
    """Listens on a UNIX socket; one task per connection.

    Counts what it refused, by error code, in :attr:`refused`.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        access: AccessPolicy | None = None,
        limits: HandoffLimits | None = None,
        proc: Path = PROC,
    ) -> None:
        self.path = path
        self.proc = proc
        """Where on_behalf hand-offs are checked against the VMM's mappings."""
        self.handler = handler
        self.access = access or AccessPolicy()
        self.limits = limits or HandoffLimits()
        self.sock: socket.socket | None = None
        self.sessions = 0
        """Sessions running or being started."""
        self.pending = 0
        """Connections whose hand-off is not answered yet."""
        self.refused: Counter[ErrorCode] = Counter()

    @property
    def mode(self) -> int:
        return self.access.socket_mode

    def listen(self) -> None:
        self.sock = self.access.listen(self.path, backlog=self.limits.max_pending_connections)

    async def serve(self) -> None:
        """Accept until cancelled; connection tasks live in a TaskGroup of our own."""
        if self.sock is None:
            self.listen()
        assert self.sock is not None
        await serve_connections(
            self.sock, self.path, self._serve_connection, what="hand-off", log=log
        )

    async def _serve_connection(self, conn: socket.socket) -> None:
        peer = peer_cred(conn)
        bound = log.bind(peer_pid=peer.pid, peer_uid=peer.uid, peer_gid=peer.gid)
        try:
            accepted = await self._handoff(conn, peer)
        except HandoffError as e:
            self.refused[e.code] += 1
            bound.warning("handoff refused", code=e.code.value, error=e.message)
            await self._send(conn, e.reply())
            return
        try:
            await self._send(conn, accepted.reply)
            if accepted.replied is not None:
                accepted.replied(conn)
            bound.info(
                "session started",
                **{k: v for k, v in accepted.reply.items() if k in ("vm_id", "mode")},
            )
            await self._wait_closed(conn)
        finally:
            self.sessions -= 1
            await accepted.close()
            bound.info("session ended", vm_id=accepted.reply.get("vm_id"))

    async def _handoff(self, conn: socket.socket, peer: PeerCred) -> Accepted:
        """Check the peer, take its message and start its session; refusals raise."""
        refusal = self.access.refusal(peer)
        if refusal is not None:
            raise HandoffError(ErrorCode.FORBIDDEN, refusal)
        if self.pending >= self.limits.max_pending_connections:
            raise HandoffError(
                ErrorCode.LIMIT,
                f"wsd is already receiving {self.pending} hand-offs "
                "(limits.max_pending_connections); try again later",
            )
        self.pending += 1
        try:
            raw, fds = await receive_message(conn, timeout=self.limits.message_timeout_seconds)
            return await self._accept(raw, fds, peer)
        finally:
            self.pending -= 1

    async def _accept(self, raw: bytes, fds: list[int], peer: PeerCred) -> Accepted:
        try:
            req = parse_request(raw)
            if not req.on_behalf and req.vmm_pid != peer.pid:
                raise HandoffError(
                    ErrorCode.FORBIDDEN,
                    f"vmm_pid {req.vmm_pid} is not the connecting process (pid {peer.pid} in "
                    "wsd's pid namespace); a VMM may only hand off its own memory",
                    "vmm_pid",
                )
            check_request(req, self.limits)
            if self.sessions >= self.limits.max_sessions:
                raise HandoffError(
                    ErrorCode.LIMIT,
                    f"wsd already runs {self.sessions} sessions (limits.max_sessions)",
                )
            check_fds(req, fds)
            if req.on_behalf:
                # The daemon checks a VMM's own hand-off against its mappings.
                check_on_behalf(req, peer, self.access)
                check_mappings(req, fds, code=ErrorCode.FORBIDDEN, proc=self.proc)
        except BaseException:
            close_fds(fds)
            raise
        # Counted from here, so hand-offs starting side by side cannot
        # together pass max_sessions.
        self.sessions += 1
        try:
            return await self.handler(req, fds, peer)
        except HandoffError:
            self.sessions -= 1
            raise
        except Exception as e:
            self.sessions -= 1
            log.exception("handoff handler failed")
            raise HandoffError(ErrorCode.INTERNAL, f"wsd could not start the session: {e}") from e
        except BaseException:
            self.sessions -= 1
            raise

    async def _send(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        # A peer that never reads cannot hold the connection open by filling
        # the socket buffer.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.limits.message_timeout_seconds):
                await loop.sock_sendall(conn, json.dumps(reply).encode() + b"\n")

    @staticmethod
    async def _wait_closed(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not await loop.sock_recv(conn, 4096):
                    return
            except OSError:
                return


def accepted_reply(req: HandoffRequest, mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "accepted",
        "version": PROTOCOL_VERSION,
        "vm_id": req.vm_id,
        "mode": mode,
        **extra,
    }
