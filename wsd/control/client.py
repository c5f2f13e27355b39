"""A blocking client of the control socket, for the ``wsd`` command line."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any

from .protocol import MAX_LINE_BYTES, Request, encode, parse_reply

__all__ = ["ControlUnreachable", "request"]

# A status reply for many VMs can be large; it is bounded only by this.
MAX_REPLY_BYTES = 64 << 20


class ControlUnreachable(Exception):
    """No wsd answers on the control socket; the message says what was found instead."""


def request(path: Path, req: Request, *, timeout: float) -> dict[str, Any]:
    """Send ``req`` to the wsd listening at ``path`` and return the reply's result.

    Raises ControlUnreachable when nothing answers there (within ``timeout``
    seconds) and ControlError when wsd refuses the request.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlUnreachable(
                f"wsd is not running: no control socket at {path} "
                "(start it with `wsd run`, or name its socket with --socket or --config)"
            ) from None
        except ConnectionRefusedError:
            raise ControlUnreachable(
                f"wsd is not running: nothing listens on {path} (a socket left behind)"
            ) from None
        except PermissionError:
            raise ControlUnreachable(
                f"permission denied on {path}: only root and wsd's own user may use it"
            ) from None
        except OSError as e:  # e.g. not a socket, or a connect that timed out
            raise ControlUnreachable(f"cannot reach wsd at {path}: {e.strerror or e}") from None
        line = encode(req.to_json())
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"the request exceeds {MAX_LINE_BYTES} bytes")
        try:
            # wsd refuses a peer it does not allow before reading anything and
            # closes: its reply, not the broken pipe, says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line)
            return parse_reply(_read_line(sock, path, deadline, timeout))
        except TimeoutError:
            raise ControlUnreachable(f"wsd at {path} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise ControlUnreachable(f"talking to wsd at {path}: {e.strerror or e}") from None


def _read_line(sock: socket.socket, path: Path, deadline: float, timeout: float) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ControlUnreachable(f"wsd at {path} closed the connection without a reply")
        data += chunk
        if len(data) > MAX_REPLY_BYTES:
            raise ControlUnreachable(f"wsd's reply exceeds {MAX_REPLY_BYTES} bytes")
    return bytes(data).partition(b"\n")[0]
