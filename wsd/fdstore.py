"""systemd's file descriptor store: where a session's uffd and memfds outlive wsd.

If nobody else holds a uffd when wsd dies, the kernel tears it down and every
evicted page reads back as zeros (RWP-FACTS fact 9); if the VMM holds its copy,
its vCPUs block on those pages forever.  So as soon as a hand-off is accepted,
wsd parks the session's fds with systemd (``FDSTORE=1``, one ``FDNAME=`` per
fd, ``FDPOLL=0`` so that systemd never drops a uffd for being readable).  A
restarted wsd gets them back as ``$LISTEN_FDS`` / ``$LISTEN_FDNAMES`` and
resumes the session from its persisted description and page map.

Names are ``wsd.<vm_id>.uffd`` and ``wsd.<vm_id>.mem<k>``; a ``:`` in a vm_id
(the separator of ``$LISTEN_FDNAMES``) is written ``%3A``.

In wp-async mode a session also parks the pipes its verified punches use
(``wsd.<vm_id>.held<k>``), once: for the 0.6 ms of a punch they hold the
only copy of writes that raced it (:mod:`wsd.evictor.held`).  systemd reads
its notify socket before it handles a service's death (src/core/manager.c
gives the notify event source a higher priority than SIGCHLD "so that we can
still identify to which service an exit message belongs"), so an
``FDSTORE=1`` sent before a SIGKILL counts.  Without systemd the VMM keeps
those pipes instead (:mod:`wsd.vmm.kept`).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field

import structlog

from wsd import sdnotify

log = structlog.get_logger("wsd.fdstore")

PREFIX = "wsd."
SD_LISTEN_FDS_START = 3


def _quote(vm_id: str) -> str:
    return vm_id.replace("%", "%25").replace(":", "%3A")


def _unquote(text: str) -> str:
    return text.replace("%3A", ":").replace("%25", "%")


def names(vm_id: str, memfds: int) -> list[str]:
    """The store names of a session's fds: the uffd first, then each memfd."""
    base = PREFIX + _quote(vm_id)
    return [f"{base}.uffd", *(f"{base}.mem{k}" for k in range(memfds))]


def store(vm_id: str, uffd: int, memfds: Sequence[int]) -> bool:
    """Park a session's fds with systemd; False when there is no store (not under systemd)."""
    ok = True
    for name, fd in zip(names(vm_id, len(memfds)), [uffd, *memfds], strict=True):
        ok &= sdnotify.notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=[fd])
    return ok


def held_names(vm_id: str, count: int, first: int = 0) -> list[str]:
    """The store names of verified-punch pipes ``first`` to ``first + count - 1``."""
    base = PREFIX + _quote(vm_id)
    return [f"{base}.held{k}" for k in range(first, first + count)]


def store_held(vm_id: str, pipes: Sequence[int], first: int = 0) -> int:
    """Park read ends of verified-punch pipes as parts ``first``, ``first + 1``...;
    how many went out (fewer than all: no store, or the send failed).

    ``FDPOLL=0`` matters more here than for the session's fds: a pipe whose
    writer died polls as hung up, and systemd would drop it.
    """
    for k, (name, fd) in enumerate(zip(held_names(vm_id, len(pipes), first), pipes, strict=True)):
        if not sdnotify.notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=[fd]):
            return k
    return len(pipes)


def remove_held(vm_id: str, count: int, first: int = 0) -> None:
    for name in held_names(vm_id, count, first):
        sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def remove(vm_id: str, memfds: int, *, held: int = 0) -> None:
    """Take a session's fds out of the store (its session ended for good)."""
    for name in names(vm_id, memfds) + held_names(vm_id, held):
        sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")


@dataclass
class StoredSession:
    vm_id: str
    uffd: int | None = None
    memfds: dict[int, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)  # a verified punch's pipes, by part
    extra: list[int] = field(default_factory=list)  # every fd received for it

    def complete(self) -> bool:
        return self.uffd is not None and sorted(self.memfds) == list(range(len(self.memfds)))


def take_listen_fds(environ: MutableMapping[str, str] = os.environ) -> dict[str, StoredSession]:
    """The sessions systemd handed back at start, by vm_id; unsets the variables.

    Fds that are not wsd's (or whose ``$LISTEN_PID`` is another process) are
    closed and logged, never leaked to a VMM.
    """
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        log.error("ignoring malformed LISTEN_FDS/LISTEN_PID", listen_fds=environ.get("LISTEN_FDS"))
        return {}
    fdnames = environ.get("LISTEN_FDNAMES", "").split(":") if count else []
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    if count <= 0:
        return {}
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    if pid != os.getpid():
        log.warning("LISTEN_FDS meant for another process (LISTEN_PID), ignored", pid=pid)
        return {}
    for fd in fds:
        os.set_inheritable(fd, False)
    padded = fdnames + [""] * (count - len(fdnames))
    return parse(list(zip(padded, fds, strict=False)))


def parse(named: Sequence[tuple[str, int]]) -> dict[str, StoredSession]:
    """Group ``(name, fd)`` pairs into sessions; anything unexpected is closed."""
    sessions: dict[str, StoredSession] = {}
    broken: set[str] = set()
    for name, fd in named:
        vm_id, kind = _split(name)
        if vm_id is None:
            log.warning("closing a stored fd wsd does not know", name=name, fd=fd)
            os.close(fd)
            continue
        s = sessions.setdefault(vm_id, StoredSession(vm_id))
        s.extra.append(fd)
        if kind == "uffd":
            if s.uffd is not None:
                broken.add(vm_id)
            s.uffd = fd
        elif kind.startswith("held"):
            k = int(kind[4:])
            if k in s.held:
                broken.add(vm_id)
            s.held[k] = fd
        else:
            k = int(kind[3:])
            if k in s.memfds:
                broken.add(vm_id)
            s.memfds[k] = fd
    for s in list(sessions.values()):
        if s.vm_id in broken or not s.complete():
            # A stored session must be exactly one uffd and memfds 0..n-1.
            log.error("stored session is incomplete or doubled, fds closed", vm_id=s.vm_id)
            for fd in s.extra:
                os.close(fd)
            remove(s.vm_id, max(s.memfds, default=-1) + 1, held=max(s.held, default=-1) + 1)
            del sessions[s.vm_id]
    return sessions


def _split(name: str) -> tuple[str | None, str]:
    if not name.startswith(PREFIX):
        return None, ""
    base, _, kind = name[len(PREFIX) :].rpartition(".")
    numbered = any(kind.startswith(k) and kind[len(k) :].isdecimal() for k in ("mem", "held"))
    if not base or not (kind == "uffd" or numbered):
        return None, ""
    return _unquote(base), kind
