"""Passing file descriptors over UNIX sockets (``SCM_RIGHTS``)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from .errors import oserror

__all__ = ["recv_with_fds", "send_with_fds"]

# The kernel caps one SCM_RIGHTS message at SCM_MAX_FD (253) descriptors.
SCM_MAX_FD = 253


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` with ``fds`` attached to its first byte; all of it or an error."""
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"{len(fds)} fds exceed the kernel's limit of {SCM_MAX_FD} per message")
    try:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    except OSError as e:
        raise oserror("sendmsg(SCM_RIGHTS)", e.errno or errno.EIO, fd=sock.fileno()) from e


def recv_with_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """Receive one message and the fds attached to it.

    Truncation is an error, never a silent loss: if the sender attached more
    than ``maxfds`` descriptors (``MSG_CTRUNC``) or the data did not fit
    (``MSG_TRUNC`` on a datagram socket), every received fd is closed and an
    ``OSError`` (EMSGSIZE) says which limit was hit.
    """
    try:
        data, fds, flags, _addr = socket.recv_fds(sock, bufsize, maxfds, socket.MSG_CMSG_CLOEXEC)
    except OSError as e:
        raise oserror("recvmsg(SCM_RIGHTS)", e.errno or errno.EIO, fd=sock.fileno()) from e
    problem = None
    if flags & socket.MSG_CTRUNC:
        problem = f"more than {maxfds} file descriptors attached"
    elif flags & socket.MSG_TRUNC:
        problem = f"message longer than {bufsize} bytes"
    if problem:
        for fd in fds:
            os.close(fd)
        raise oserror("recvmsg(SCM_RIGHTS)", errno.EMSGSIZE, fd=sock.fileno(), detail=problem)
    return data, list(fds)
