"""Accepting and reading connections on wsd's UNIX sockets.

The hand-off server (:mod:`wsd.vmm.server`) and the control server
(:mod:`wsd.control.server`) take clients the same way: one task per accepted
connection in a TaskGroup of the server's own, a connection that fails is
logged and closed without touching the others, and each message is a line
that must arrive whole before a deadline.  What a server answers to a line
that is too long, too slow or cut short is its own protocol's business, so
:func:`read_line` raises and the caller replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from structlog.typing import FilteringBoundLogger

from wsd.kernel import KernelError, close_fds, recv_with_fds

__all__ = [
    "ACCEPT_RETRY_SECONDS",
    "CHUNK_BYTES",
    "ClosedEarly",
    "FdsRefused",
    "LineTimeout",
    "LineTooLong",
    "ReadError",
    "read_line",
    "serve_connections",
]

# accept() failing for lack of fds or memory must not end the server; it
# retries after this pause, by which time some connection has usually ended.
ACCEPT_RETRY_SECONDS: Final = 0.1
CHUNK_BYTES: Final = 65536

Serve = Callable[[socket.socket], Awaitable[None]]


async def serve_connections(
    sock: socket.socket,
    path: Path,
    serve: Serve,
    *,
    what: str,
    log: FilteringBoundLogger,
) -> None:
    """Accept on ``sock`` until cancelled; then close it and remove ``path``.

    Each connection is non-blocking and served by ``serve`` in a task of its
    own, and closed when that returns; an exception it raises is logged as
    ``"<what> connection failed"`` and ends that connection only.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ECONNABORTED...
                    log.warning(f"accepting a {what} connection failed", error=str(e))
                    await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                conn.setblocking(False)
                tg.create_task(_guarded(conn, serve, what, log))
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _guarded(conn: socket.socket, serve: Serve, what: str, log: FilteringBoundLogger) -> None:
    # One misbehaving connection must never take the server (and with it
    # every other client, or the daemon) down.
    try:
        with conn:
            await serve(conn)
    except Exception:
        log.exception(f"{what} connection failed")


class ReadError(Exception):
    """The line could not be read; ``received`` bytes of it had arrived."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class LineTooLong(ReadError):
    """No newline within the allowed length."""


class LineTimeout(ReadError):
    """The deadline passed before the newline arrived."""


class ClosedEarly(ReadError):
    """The peer closed (or reset) the connection before the newline."""


class FdsRefused(ReadError):
    """More fds were attached than allowed, or receiving them failed; ``why`` says which."""

    def __init__(self, received: int, why: str) -> None:
        super().__init__(received)
        self.why = why


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


async def read_line(
    sock: socket.socket,
    buffer: bytearray,
    *,
    timeout: float,
    max_bytes: int,
    max_fds: int = 0,
) -> tuple[bytes, list[int]]:
    """The next ``\\n``-terminated line (without it) and the fds attached to its bytes.

    ``buffer`` holds what was read beyond earlier lines and keeps what is read
    beyond this one.  The whole line must arrive within ``timeout`` seconds,
    so a peer dribbling a byte at a time does not extend it.  At most
    ``max_bytes + CHUNK_BYTES`` bytes are read for a line longer than
    ``max_bytes``.

    With ``max_fds`` 0 the data is read with plain ``recv()``, so the kernel
    drops whatever fds a peer attached and they never enter wsd's fd table.
    Otherwise every fd received is returned, or closed when a ReadError is
    raised.
    """
    fds: list[int] = []
    # Search only the new bytes: a client dribbling a byte at a time must not
    # cost a scan of the whole buffer each time.
    end = buffer.find(b"\n")
    try:
        async with asyncio.timeout(timeout):
            while end < 0:
                if len(buffer) > max_bytes:
                    raise LineTooLong(len(buffer))
                await _readable(sock)
                try:
                    if max_fds > 0:
                        chunk, got = recv_with_fds(sock, CHUNK_BYTES, max_fds - len(fds))
                    else:
                        chunk, got = sock.recv(CHUNK_BYTES), []
                except BlockingIOError:
                    continue
                except KernelError as e:
                    # EMSGSIZE: the kernel truncated the fds (and closed the
                    # ones that did not fit); recv_with_fds closed the rest.
                    why = (
                        f"more than {max_fds} file descriptors attached"
                        if e.errno == errno.EMSGSIZE
                        else f"receiving the message: {e}"
                    )
                    raise FdsRefused(len(buffer), why) from e
                except ConnectionError:
                    raise ClosedEarly(len(buffer)) from None
                fds += got
                if not chunk:
                    raise ClosedEarly(len(buffer))
                at = chunk.find(b"\n")
                if at >= 0:
                    end = len(buffer) + at
                buffer += chunk
    except TimeoutError:
        close_fds(fds)
        raise LineTimeout(len(buffer)) from None
    except BaseException:
        close_fds(fds)
        raise
    if end > max_bytes:
        close_fds(fds)
        raise LineTooLong(len(buffer))
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line, fds
