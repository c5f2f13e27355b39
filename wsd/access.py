"""Who may use wsd's UNIX sockets: their mode and group, and a check of every peer.

Two layers, both needed:

- the socket file's mode (``0600``, or ``0660`` with a configured group)
  keeps other users from connecting at all;
- every accepted connection's ``SO_PEERCRED`` (the peer's pid, uid and gid
  when it connected, filled in by the kernel, so it cannot be forged) is
  checked against the allowed uids and gids, so a process that got hold of
  the socket anyway (a shared group, an fd passed on) is still refused.

Root and wsd's own uid are always allowed: they can open the socket file
whatever its mode.  ``SO_PEERCRED`` carries the peer's effective gid only, not
its supplementary groups, so an allowed group admits processes whose primary
group it is.

Shared by the hand-off socket and the control socket: :meth:`AccessPolicy.listen`
creates a listening socket, :meth:`AccessPolicy.refusal` judges one peer.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _uid(value: object) -> object:
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ValueError(f"no user named {value!r} on this host") from None
    return value


def _gid(value: object) -> object:
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"no group named {value!r} on this host") from None
    return value


# A user or group given by name (resolved when the file is loaded) or number.
Uid = Annotated[int, BeforeValidator(_uid), Field(ge=0, lt=1 << 32)]
Gid = Annotated[int, BeforeValidator(_gid), Field(ge=0, lt=1 << 32)]


class AccessConfig(BaseModel):
    """The ``[access]`` table of the configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_users: list[Uid] = Field(default_factory=list)
    """Users (names or uids) allowed to connect, besides root and wsd's own user."""
    allowed_groups: list[Gid] = Field(default_factory=list)
    """Groups (names or gids) whose members, by primary group, may connect."""
    socket_group: Gid | None = None
    """Group of the sockets, which are then mode 0660 (unset: 0600); it is allowed too."""


@dataclass(frozen=True)
class PeerCred:
    """The connecting process as the kernel saw it at ``connect()``."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """``SO_PEERCRED`` of a connected UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


@dataclass(frozen=True)
class AccessPolicy:
    """Which peers may connect, and how the listening sockets are created."""

    uids: frozenset[int] = field(default_factory=lambda: frozenset({0, os.getuid()}))
    gids: frozenset[int] = frozenset()
    socket_group: int | None = None
    """The sockets' group (mode 0660); None: wsd's group, mode 0600."""
    own_uid: int = field(default_factory=os.getuid)
    """wsd's own user, allowed whatever the configuration says."""

    @classmethod
    def from_config(cls, config: AccessConfig, *, own_uid: int | None = None) -> AccessPolicy:
        me = os.getuid() if own_uid is None else own_uid
        gids = set(config.allowed_groups)
        if config.socket_group is not None:
            gids.add(config.socket_group)
        return cls(
            uids=frozenset({0, me, *config.allowed_users}),
            gids=frozenset(gids),
            socket_group=config.socket_group,
            own_uid=me,
        )

    @property
    def socket_mode(self) -> int:
        return 0o660 if self.socket_group is not None else 0o600

    def refusal(self, peer: PeerCred) -> str | None:
        """None if ``peer`` may connect, else why not (for its error reply and the log)."""
        if peer.uid in self.uids or peer.gid in self.gids:
            return None
        return (
            f"peer pid {peer.pid} (uid {peer.uid}, gid {peer.gid}) is not allowed to connect: "
            f"allowed uids {_ids(self.uids)}, allowed gids {_ids(self.gids)} "
            "(access.allowed_users, access.allowed_groups)"
        )

    def is_privileged(self, peer: PeerCred) -> bool:
        """Root or wsd's own user: may act for other processes (``wsd attach``).

        ``allowed_users`` and ``allowed_groups`` do not count: they may hand
        off their own memory only.
        """
        return peer.uid in (0, self.own_uid)

    def listen(self, path: Path, *, backlog: int = 64) -> socket.socket:
        """A non-blocking UNIX stream socket listening at ``path`` with this policy's mode.

        A stale socket file at ``path`` is replaced.  The socket is bound
        owner-only (umask 0177) and gets its group bits only after the chown:
        neither other users nor wsd's own group ever get a window on it.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            if self.socket_group is not None:
                os.chown(path, -1, self.socket_group)
            os.chmod(path, self.socket_mode)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock


def _ids(ids: frozenset[int]) -> str:
    return "[" + ", ".join(map(str, sorted(ids))) + "]"
