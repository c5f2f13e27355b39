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
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from wsd.kernel import KernelError, close_fds, recv_with_fds

from .fdcheck import check_fds
from .protocol import (
    MAX_FDS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    HandoffError,
    HandoffRequest,
    parse_request,
)

log = structlog.get_logger("wsd.vmm")

MESSAGE_TIMEOUT = 5.0


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass
class Accepted:
    """What a handler returns: the reply body and how to end the session."""

    reply: dict[str, Any]
    close: Callable[[], Awaitable[None]]


# The handler owns the fds from the moment it is called, on success and failure.
Handler = Callable[[HandoffRequest, list[int], PeerCred], Awaitable[Accepted]]


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def receive_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read one ``\\n``-terminated message and every fd attached to its bytes.

    Raises HandoffError (after closing what was received) when the message is
    too large, too slow, cut short, or carries more fds than allowed.
    """
    data = bytearray()
    fds: list[int] = []
    try:
        async with asyncio.timeout(MESSAGE_TIMEOUT):
            while b"\n" not in data:
                await _readable(sock)
                try:
                    chunk, got = recv_with_fds(sock, 65536, MAX_FDS - len(fds))
                except BlockingIOError:
                    continue
                except KernelError as e:
                    raise HandoffError(
                        ErrorCode.BAD_FDS, f"receiving the message: {e}", "fds"
                    ) from e
                fds += got
                if not chunk:
                    raise HandoffError(
                        ErrorCode.INVALID,
                        "connection closed before the end "
                        "of the message (a message ends with a newline)",
                    )
                data += chunk
                if len(data) > MAX_MESSAGE_BYTES:
                    raise HandoffError(
                        ErrorCode.TOO_LARGE, f"message exceeds {MAX_MESSAGE_BYTES} bytes"
                    )
    except TimeoutError:
        close_fds(fds)
        raise HandoffError(
            ErrorCode.INVALID, f"no complete message within {MESSAGE_TIMEOUT:g} s"
        ) from None
    except BaseException:
        close_fds(fds)
        raise
    line, _, rest = bytes(data).partition(b"\n")
    if rest.strip():
        close_fds(fds)
        raise HandoffError(ErrorCode.INVALID, "data after the end of the message")
    return line, fds


async def _send(sock: socket.socket, reply: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        await loop.sock_sendall(sock, json.dumps(reply).encode() + b"\n")


class HandoffServer:
    """Listens on a UNIX socket; one task per connection."""

    def __init__(self, path: Path, handler: Handler, *, mode: int = 0o600) -> None:
        self.path = path
        self.handler = handler
        self.mode = mode
        self.sock: socket.socket | None = None
        self.sessions = 0

    def listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind under a restrictive umask so the socket is never briefly world-usable.
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(64)
        sock.setblocking(False)
        self.sock = sock

    async def serve(self) -> None:
        """Accept until cancelled; connection tasks live in a TaskGroup of our own."""
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
        # One misbehaving connection or session must never take the server
        # (and with it every other session) down.
        try:
            await self._serve_connection(conn)
        except Exception:
            log.exception("hand-off connection failed")

    async def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            peer = peer_cred(conn)
            bound = log.bind(peer_pid=peer.pid, peer_uid=peer.uid)
            try:
                raw, fds = await receive_message(conn)
                accepted = await self._accept(raw, fds, peer)
            except HandoffError as e:
                bound.warning("handoff refused", code=e.code.value, error=e.message)
                await _send(conn, e.reply())
                return
            await _send(conn, accepted.reply)
            self.sessions += 1
            bound.info(
                "session started",
                **{k: v for k, v in accepted.reply.items() if k in ("vm_id", "mode")},
            )
            try:
                await self._wait_closed(conn)
            finally:
                self.sessions -= 1
                await accepted.close()
                bound.info("session ended", vm_id=accepted.reply.get("vm_id"))

    async def _accept(self, raw: bytes, fds: list[int], peer: PeerCred) -> Accepted:
        try:
            req = parse_request(raw)
            if req.vmm_pid != peer.pid:
                raise HandoffError(
                    ErrorCode.INVALID,
                    f"vmm_pid {req.vmm_pid} is not the connecting process (pid {peer.pid});"
                    " a VMM may only hand off its own memory",
                    "vmm_pid",
                )
            check_fds(req, fds)
        except BaseException:
            close_fds(fds)
            raise
        try:
            return await self.handler(req, fds, peer)
        except HandoffError:
            raise
        except Exception as e:
            log.exception("handoff handler failed")
            raise HandoffError(ErrorCode.INTERNAL, f"wsd could not start the session: {e}") from e

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
