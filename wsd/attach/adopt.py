"""``wsd attach``: adopt a running, unmodified QEMU's guest RAM.

1. Check what can be checked before touching the VMM (architecture,
   privileges, process state, its guest RAM in ``/proc``).
2. Inject ``userfaultfd(2)`` into it (:mod:`wsd.attach.inject`).
3. Take that uffd and the memfds with ``pidfd_getfd`` (the same open files
   the VMM holds; a memfd the VMM closed is opened through ``map_files``).
4. Hand them to wsd with ``"on_behalf": true`` (docs/protocol.md).

Every refusal is a :class:`NotAttachable` naming what is wrong, raised before
the VMM is changed wherever possible; the VMM keeps running in every case.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsd.kernel import FdKind, KernelError, close_fds, describe_fd, pidfd_getfd, pidfd_open
from wsd.kernel.procfs import PROC, Mapping, read_maps, read_smaps, uffd_flags
from wsd.vmm.client import HandoffRefused, hand_off
from wsd.vmm.kept import KeptPipes

from .discover import (
    GuestRam,
    NotAttachable,
    find_guest_ram,
    memfd_fds,
)
from .inject import close_in_vmm, inject_userfaultfd

__all__ = ["Attached", "Sources", "Taken", "attach", "handoff_message", "preflight", "take"]

CAP_SYS_PTRACE = 19
ELF_CLASS64 = 2
EM_X86_64 = 62


def _status(pid: int, proc: Path) -> dict[str, str]:
    path = proc / str(pid) / "status"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotAttachable(f"no process with pid {pid}") from None
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def preflight(pid: int, *, proc: Path = PROC, self_status: dict[str, str] | None = None) -> str:
    """Refuse early, before ptrace touches ``pid``; return its command name."""
    machine = platform.machine()
    if machine != "x86_64":
        raise NotAttachable(
            f"wsd attach injects a syscall with ptrace, implemented for x86_64 only "
            f"(this machine is {machine})"
        )
    status = _status(pid, proc)
    me = self_status if self_status is not None else _status(os.getpid(), proc)
    caps = int(me.get("CapEff", "0"), 16)
    if not caps & (1 << CAP_SYS_PTRACE):
        raise NotAttachable(
            "wsd attach needs root (precisely CAP_SYS_PTRACE): it ptraces the VMM and takes "
            "its fds with pidfd_getfd, and wsd accepts hand-offs on behalf of another "
            "process only from root or its own user"
        )
    name = status.get("Name", "?")
    state = status.get("State", "")
    if state.startswith(("T", "t")):
        raise NotAttachable(f"pid {pid} ({name}) is stopped ({state}); continue it first")
    if state.startswith(("Z", "X")):
        raise NotAttachable(f"pid {pid} ({name}) has exited ({state})")
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise NotAttachable(f"pid {pid} ({name}) is already traced by pid {tracer} (a debugger?)")
    if status.get("Tgid") != str(pid):
        raise NotAttachable(f"pid {pid} is a thread of process {status.get('Tgid')}; give that")
    try:
        with open(proc / str(pid) / "exe", "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise NotAttachable(f"cannot read the executable of pid {pid}: {e.strerror}") from e
    if (
        head[:4] != b"\x7fELF"
        or head[4] != ELF_CLASS64
        or int.from_bytes(head[18:20], "little") != EM_X86_64
    ):
        raise NotAttachable(f"pid {pid} ({name}) is not a 64-bit x86_64 program")
    return name


def discover(
    pid: int, *, proc: Path = PROC, name: str | None = None
) -> tuple[GuestRam, list[Mapping]]:
    maps = read_maps(pid, proc=proc)
    return find_guest_ram(pid, maps, read_smaps(pid, proc=proc), name=name), maps


@dataclass
class Taken:
    """Our copies of the VMM's new uffd and its memfds (index = the hand-off's fd order)."""

    uffd: int
    memfds: list[int] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [self.uffd, *self.memfds]

    def close(self) -> None:
        close_fds(self.fds)


@dataclass(frozen=True)
class Sources:
    """Where the hand-off's fds are in the VMM: fd numbers, or a ``map_files`` path.

    Kept so that ``wsd attach`` can take them again to reattach to a
    restarted wsd: the VMM holds them for its whole life.
    """

    pid: int
    uffd: int
    memfds: tuple[int | Path, ...]

    def take(self) -> Taken:
        """Fresh copies of the fds; closes what it took if one fails."""
        pidfd = pidfd_open(self.pid)
        taken = Taken(-1)
        try:
            taken.uffd = pidfd_getfd(pidfd, self.uffd, pid=self.pid)
            if describe_fd(taken.uffd).kind is not FdKind.USERFAULTFD:
                raise NotAttachable(f"fd {self.uffd} of pid {self.pid} is not the injected uffd")
            for src in self.memfds:
                if isinstance(src, Path):
                    # The VMM closed its fd after mapping: open the mapping's file.
                    try:
                        taken.memfds.append(os.open(src, os.O_RDWR | os.O_CLOEXEC))
                    except OSError as e:
                        raise NotAttachable(f"cannot open {src}: {e.strerror}") from e
                else:
                    taken.memfds.append(pidfd_getfd(pidfd, src, pid=self.pid))
        except KernelError as e:
            close_fds([fd for fd in taken.fds if fd >= 0])
            raise NotAttachable(f"taking the fds of pid {self.pid}: {e}") from e
        except BaseException:
            close_fds([fd for fd in taken.fds if fd >= 0])
            raise
        finally:
            os.close(pidfd)
        return taken


def memfd_sources(pid: int, ram: GuestRam, *, proc: Path = PROC) -> tuple[int | Path, ...]:
    """Each memfd's fd number in the VMM, or the ``map_files`` entry of its mapping."""
    in_vmm = memfd_fds(pid, ram.files, proc=proc)
    out: list[int | Path] = []
    for fid in ram.files:
        if fid in in_vmm:
            out.append(in_vmm[fid])
        else:
            m = next(r.mapping for r in ram.regions if r.file == fid)
            out.append(PROC / str(pid) / "map_files" / f"{m.start:x}-{m.end:x}")
    return tuple(out)


def take(pid: int, ram: GuestRam, maps: list[Mapping], *, proc: Path = PROC) -> Sources:
    """Inject the uffd into the VMM; return where it and the memfds are there."""
    memfds = memfd_sources(pid, ram, proc=proc)
    return Sources(pid, inject_userfaultfd(pid, maps), memfds)


def handoff_message(vm_id: str, ram: GuestRam) -> dict[str, Any]:
    """The hand-off of ``ram`` on behalf of its VMM (docs/protocol.md).

    ``guest_phys_addr`` is not the guest's physical layout (QEMU alone knows
    that); regions are numbered in the order of QEMU's address space, which
    is all wsd uses them for.
    """
    files = ram.files
    regions = []
    guest = 0
    for r in sorted(ram.regions, key=lambda r: r.mapping.start):
        regions.append(
            {
                "guest_phys_addr": guest,
                "host_virt_addr": r.mapping.start,
                "size": r.mapping.size,
                "fd_index": 1 + files.index(r.file),
                "offset": r.mapping.offset,
                "page_size": r.page_size,
            }
        )
        guest += r.mapping.size
    return {
        "type": "handoff",
        "version": 1,
        "vm_id": vm_id,
        "vmm_pid": ram.pid,
        "on_behalf": True,
        "uffd": {"fd_index": 0, "state": "raw"},
        "regions": regions,
    }


@dataclass
class Attached:
    reply: dict[str, Any]
    conn: socket.socket
    ram: GuestRam
    sources: Sources
    message: dict[str, Any]
    name: str
    kept: KeptPipes = field(default_factory=KeptPipes)
    """The pipes wsd asks the VMM to keep, kept for it (:mod:`wsd.vmm.kept`)."""

    @property
    def uffd_in_vmm(self) -> int:
        return self.sources.uffd

    def reattach(self, socket_path: Path) -> None:
        """Give a restarted wsd the session again (``"type": "reattach"``, docs/protocol.md).

        Raises HandoffRefused or OSError; on success :attr:`conn` is the new connection.
        """
        taken = self.sources.take()
        try:
            message, fds = self.kept.reattach({**self.message, "type": "reattach"}, taken.fds)
            reply, conn = hand_off(socket_path, message, fds)
        finally:
            taken.close()
        self.conn.close()
        self.kept.close()  # the new wsd has them; it sends its own
        self.reply, self.conn = reply, conn

    def close_uffd_once_released(self, timeout: float, *, proc: Path = PROC) -> str:
        """After the session ended: close the VMM's copy of the injected uffd once no
        mapping of its guest RAM is registered any more; what happened, in words.

        wsd unregisters the RAM only when every evicted page is back.  Until then
        the VMM's copy is what keeps a wsd crash from turning evicted pages into
        zeros (RWP-FACTS fact 9), so it stays if the registration outlasts
        ``timeout`` seconds (wsd keeps pages in storage, or is slow to put them
        back).  The RAM was refused at attach if another uffd had registered it,
        so every ``u*`` flag on it is this session's.
        """
        pid, fd = self.sources.pid, self.uffd_in_vmm
        deadline = time.monotonic() + timeout
        while True:
            try:
                smaps = read_smaps(pid, proc=proc)
            except ProcessLookupError:
                return f"pid {pid} exited"
            if not any(uffd_flags(smaps, r.mapping.start, r.mapping.end) for r in self.ram.regions):
                break
            if time.monotonic() >= deadline:
                return (
                    f"the guest RAM is still registered after {timeout:g} s (wsd is still "
                    f"putting pages back, or keeps them in storage): the userfaultfd stays "
                    f"open in the VMM as fd {fd}"
                )
            time.sleep(0.1)
        try:
            close_in_vmm(pid, fd)
        except (KernelError, NotAttachable) as e:
            return f"could not close the userfaultfd (fd {fd}) in the VMM: {e}"
        return f"closed the userfaultfd (fd {fd}) in the VMM"


def attach(
    pid: int,
    socket_path: Path,
    vm_id: str,
    *,
    memfd_name: str | None = None,
    proc: Path = PROC,
) -> Attached:
    """Adopt ``pid``'s guest RAM into wsd; keep ``conn`` open for the session's life."""
    name = preflight(pid, proc=proc)
    ram, maps = discover(pid, proc=proc, name=memfd_name)
    if not socket_path.exists():
        # Before the injection: nothing in the VMM changes if wsd is not there.
        raise FileNotFoundError(f"wsd is not running: no hand-off socket at {socket_path}")
    sources = take(pid, ram, maps, proc=proc)
    message = handoff_message(vm_id, ram)
    try:
        taken = sources.take()
        try:
            reply, conn = hand_off(socket_path, message, taken.fds)
        finally:
            # wsd has its own copies now (or refused); QEMU keeps the uffd.
            taken.close()
    except (HandoffRefused, FileNotFoundError, ConnectionRefusedError, NotAttachable):
        # wsd refused it or was never reached: nothing registered the uffd and
        # no wsd holds it, so the VMM is left as it was found.  (Not after a
        # timeout: wsd may be using it.)
        with contextlib.suppress(Exception):
            close_in_vmm(pid, sources.uffd)
        raise
    return Attached(reply, conn, ram, sources, message, name)
