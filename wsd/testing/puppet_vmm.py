"""A puppet VMM: a child process that owns guest memory and obeys commands.

It does what a VMM does at hand-off time (create a memfd, map it
``MAP_SHARED``, create a raw userfaultfd without ``UFFDIO_API``, send both over
``SCM_RIGHTS``) and keeps its own copy of the uffd, as RWP-FACTS fact 9
requires.  Then it reads, writes or touches guest pages on request, each
request on its own thread, so a thread blocked in a uffd fault does not stop
the others.  Guest accesses go through ``ctypes.memmove``, which releases the
GIL, for the same reason.

Every page holds a self-verifying pattern derived from (page index, version):
a read that finds zeros or another page's bytes is reported with the page
number.  Used by the demo and by the integration and kernel tests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from wsd.kernel import (
    RegisterMode,
    Userfaultfd,
    memfd_create,
    open_userfaultfd,
    probe_kernel,
    recv_with_fds,
    send_with_fds,
)
from wsd.kernel.uffd import OpenFlag
from wsd.tracker.mode import choose_mode
from wsd.tracker.session import REQUIRED
from wsd.vmm.client import HandoffRefused, hand_off

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

DISCARDED = -1
"""The version of a page the puppet discarded: it must read back as zeros."""

# A test puppet acting out a VMM's own syscalls (madvise, fallocate, mremap,
# io_uring): not wsd's, so not in wsd.kernel.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mmap.restype = _libc.mremap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
MAP_FAILED = ctypes.c_void_p(-1).value
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MADV_DONTNEED = 4
MADV_REMOVE = 9
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_NR_IO_URING_SETUP = 425  # the same on x86_64 and aarch64
_NR_IO_URING_REGISTER = 427
CAP_IPC_LOCK = 14
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_effective_cap(cap: int) -> None:
    """Take ``cap`` out of this process's effective set (capget/capset, v3)."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # 2 x {effective, permitted, inheritable}
    if _libc.capget(header, data) < 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[3 * (cap // 32)] &= ~(1 << (cap % 32))
    if _libc.capset(header, data) < 0:
        raise OSError(ctypes.get_errno(), "capset")


def page_pattern(index: int, version: int, page_size: int) -> bytes:
    """The bytes page ``index`` holds at ``version``: no two (index, version) collide."""
    return bytes(_patterns(np.array([index], dtype=np.uint64), version, page_size))


def _patterns(indices: npt.NDArray[np.uint64], version: int, page_size: int) -> memoryview:
    words = page_size // 8
    key = (indices << np.uint64(24)) | np.uint64(version & 0xFFFFFF)
    body = (np.arange(words, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    pages = body[None, :] ^ key[:, None]
    pages[:, 0] = key  # the first word names the page, for diagnostics
    return pages.view(np.uint8).reshape(-1).data


def decode_page(data: bytes, page_size: int) -> tuple[int, int] | None:
    """(index, version) if ``data`` is an intact pattern page, else None."""
    key = int.from_bytes(data[:8], "little")
    index, version = key >> 24, key & 0xFFFFFF
    return (index, version) if data == page_pattern(index, version, page_size) else None


class PuppetError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# child side


class _Guest:
    def __init__(self, size: int, page_size: int, fill: bool) -> None:
        self.size = size
        self.page_size = page_size
        hugetlb = page_size if page_size != mmap.PAGESIZE else None
        self.memfd = memfd_create("puppet-guest-ram", size=size, hugetlb_page_size=hugetlb)
        self.map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.versions = np.zeros(size // page_size, dtype=np.int64)
        self.pinned: list[tuple[int, mmap.mmap | None]] = []
        self.moved: list[tuple[int, int, int]] = []  # (first page, count, new address)
        self.session: socket.socket | None = None
        self.reattach: dict[str, Any] = {}  # the hand-off, as a reattach
        self.aliases: dict[int, mmap.mmap] = {}  # a second mapping of the memfd, by address
        if fill:
            npages = size // page_size
            step = max(1, (64 << 20) // page_size)
            for first in range(0, npages, step):
                idx = np.arange(first, min(npages, first + step), dtype=np.uint64)
                buf = _patterns(idx, 0, page_size)
                self.map[first * page_size : first * page_size + len(buf)] = buf

    def _addr(self, page: int) -> int:
        if not 0 <= page < len(self.versions):
            raise PuppetError(f"page {page} outside guest of {len(self.versions)} pages")
        for first, count, addr in reversed(self.moved):
            if first <= page < first + count:
                return addr + (page - first) * self.page_size
        return self.base + page * self.page_size

    def write(self, pages: Iterable[int], version: int) -> None:
        for p in pages:
            src = page_pattern(p, version, self.page_size)
            ctypes.memmove(self._addr(p), src, self.page_size)
            self.versions[p] = version

    def read(self, pages: Iterable[int]) -> list[int]:
        """Versions read (``DISCARDED`` for zeros where expected); raises naming the
        first page that is not intact."""
        out = []
        buf = ctypes.create_string_buffer(self.page_size)
        for p in pages:
            ctypes.memmove(buf, self._addr(p), self.page_size)
            data = buf.raw
            want = int(self.versions[p])
            if want == DISCARDED:
                if any(data):
                    found = decode_page(data, self.page_size)
                    what = f"page {found[0]} version {found[1]}" if found else "garbage"
                    raise PuppetError(f"page {p}: discarded, expected zeros, found {what}")
                out.append(want)
                continue
            if data != page_pattern(p, want, self.page_size):
                found = decode_page(data, self.page_size)
                what = (
                    "all zeros"
                    if not any(data)
                    else (f"page {found[0]} version {found[1]}" if found else "garbage")
                )
                raise PuppetError(f"page {p}: expected version {want}, found {what}")
            out.append(want)
        return out

    def discard(self, pages: Iterable[int], how: str) -> None:
        """Give pages back as a balloon does; their next read must find zeros.

        ``how``: ``remove`` (``MADV_REMOVE``: frees the memfd's pages too),
        ``dontneed`` (``MADV_DONTNEED``: drops this mapping's PTEs only), or
        ``punch+dontneed`` (QEMU's way for shared memory: ``fallocate``
        punch, then ``MADV_DONTNEED``).  The madvise raises a uffd REMOVE
        event and waits until the uffd's reader has read it.
        """
        for p in pages:
            addr, length = self._addr(p), self.page_size
            if how == "punch+dontneed":
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                if _libc.fallocate(self.memfd, mode, p * length, length) < 0:
                    raise OSError(ctypes.get_errno(), f"fallocate punch of page {p}")
            advice = {"remove": MADV_REMOVE, "dontneed": MADV_DONTNEED}.get(how.rsplit("+", 1)[-1])
            if advice is None:
                raise PuppetError(f"unknown discard {how!r}")
            if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) < 0:
                raise OSError(ctypes.get_errno(), f"madvise({how}) of page {p}")
            if how != "dontneed":
                self.versions[p] = DISCARDED

    def move(self, first: int, count: int) -> int:
        """``mremap`` pages [first, first + count) elsewhere, as a VMM moving guest
        memory would; returns their new address.  Later reads and writes of
        these pages go there.  The REMAP event waits for wsd's read.

        ``MREMAP_FIXED`` onto a fresh reservation, aligned to the page size (a
        hugetlb move needs that): without it a same-size ``mremap`` stays put.
        """
        old, length = self._addr(first), count * self.page_size
        if self._addr(first + count - 1) != old + length - self.page_size:
            raise PuppetError(f"pages {first}..{first + count - 1} are not contiguous")
        spare = length + self.page_size
        reserved = _libc.mmap(None, spare, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if reserved == MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap of a reservation to move onto")
        dest = -(-reserved // self.page_size) * self.page_size
        new = _libc.mremap(old, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, dest)
        if new == MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mremap of pages {first}..{first + count - 1}")
        self.moved.append((first, count, new))
        return int(new)

    def pin(
        self,
        nbytes: int,
        without_ipc_lock: bool = False,
        guest_pages: tuple[int, int] | None = None,
    ) -> None:
        """Pin memory long-term with io_uring registered buffers, as a VMM doing
        I/O straight into guest memory would: ``nbytes`` of private memory, or
        ``guest_pages`` ``(first, count)`` of the guest's.  They raise ``VmPin``
        (``mm->pinned_vm``).

        On Linux 7.3 they do only for a ring created without ``CAP_IPC_LOCK``
        (seen in the test VM: root's pins leave ``VmPin`` at 0), so
        ``without_ipc_lock`` drops it first, as an unprivileged VMM runs.
        """
        if without_ipc_lock:
            _drop_effective_cap(CAP_IPC_LOCK)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        ring = _libc.syscall(_NR_IO_URING_SETUP, ctypes.c_uint(4), params)
        if ring < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")
        buf: mmap.mmap | None = None
        if guest_pages is None:
            buf = mmap.mmap(-1, nbytes)
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        else:
            first, count = guest_pages
            address, nbytes = self._addr(first), count * self.page_size
        iov = (ctypes.c_void_p * 2)(address, nbytes)
        if _libc.syscall(_NR_IO_URING_REGISTER, ring, 0, iov, ctypes.c_uint(1)) < 0:
            err = ctypes.get_errno()
            os.close(ring)
            raise OSError(err, "io_uring_register(IORING_REGISTER_BUFFERS)")
        self.pinned.append((ring, buf))

    def unpin(self) -> None:
        for ring, _ in self.pinned:
            # IORING_UNREGISTER_BUFFERS unpins now; closing the ring alone
            # unpins later, from a kernel worker.
            _libc.syscall(_NR_IO_URING_REGISTER, ring, 1, None, ctypes.c_uint(0))
            os.close(ring)
        self.pinned.clear()

    def touch(self, pages: Iterable[int], write: bool) -> None:
        one = ctypes.create_string_buffer(1)
        for p in pages:
            if write:
                # Rewrite the byte the pattern already has: a pure write access.
                one.raw = page_pattern(p, int(self.versions[p]), self.page_size)[:1]
                ctypes.memmove(self._addr(p), one, 1)
            else:
                ctypes.memmove(one, self._addr(p), 1)


def _preregister(uffd: int, guest: _Guest, modes: str) -> dict[str, Any]:
    """Do UFFDIO_API and REGISTER ourselves, as a VMM that pre-registers would."""
    decision = choose_mode(probe_kernel())
    u = Userfaultfd(uffd)  # not closed: the fd stays ours and goes to wsd
    features = REQUIRED[decision.mode]
    u.api(features)
    mode = decision.register_mode
    if modes != "auto":
        mode = RegisterMode(0)
        for name in modes.split("|"):
            mode |= RegisterMode[name]
    u.register(guest.base, guest.size, mode)
    return {
        "fd_index": 0,
        "state": "registered",
        "features": int(features),
        "register_mode": [m.name for m in RegisterMode if m in mode],
    }


def _child(a: argparse.Namespace) -> None:
    sock_fd, size, page_size, handoff = a.sock_fd, a.size, a.page_size, a.handoff
    sock = socket.socket(fileno=sock_fd)
    guest = _Guest(size, page_size, not a.no_fill)
    uffd = open_userfaultfd(OpenFlag(a.uffd_flags))
    hello: dict[str, Any] = {
        "pid": os.getpid(),
        "base": guest.base,
        "size": size,
        "page_size": page_size,
    }
    if handoff:
        # Hand the memory to a running wsd, as a VMM would, and keep the
        # connection (the session lives as long as it does).
        uffd_spec: dict[str, Any] = {"fd_index": 0, "state": "raw"}
        if a.preregister:
            uffd_spec = _preregister(uffd, guest, a.preregister)
        msg = {
            "type": "handoff",
            "version": 1,
            "vm_id": a.vm_id,
            "vmm_pid": os.getpid(),
            "uffd": uffd_spec,
            "regions": [
                {
                    "guest_phys_addr": 0,
                    "host_virt_addr": guest.base,
                    "size": size,
                    "fd_index": 1,
                    "page_size": page_size,
                }
            ],
        }
        try:
            hello["reply"], guest.session = hand_off(handoff, msg, [uffd, guest.memfd])
        except HandoffRefused as e:
            hello["reply"] = e.reply
        guest.reattach = {**msg, "type": "reattach"}
    send_with_fds(sock, json.dumps(hello).encode() + b"\n", [uffd, guest.memfd])
    send_lock = threading.Lock()

    def reply(msg: dict[str, Any]) -> None:
        with send_lock:
            sock.sendall(json.dumps(msg).encode() + b"\n")

    def run(req: dict[str, Any]) -> None:
        try:
            op = req["op"]
            result: Any = None
            if op == "write":
                guest.write(req["pages"], req["version"])
            elif op == "read":
                result = guest.read(req["pages"])
            elif op == "touch":
                guest.touch(req["pages"], req.get("write", False))
            elif op == "discard":
                guest.discard(req["pages"], req.get("how", "remove"))
            elif op == "pin":
                pages = req.get("guest_pages")
                guest.pin(
                    req.get("bytes", 0),
                    req.get("without_ipc_lock", False),
                    None if pages is None else (pages[0], pages[1]),
                )
            elif op == "unpin":
                guest.unpin()
            elif op == "move":
                first, count = req.get("pages") or (0, len(guest.versions))
                result = guest.move(first, count)
            elif op == "map_again":
                # A second mapping of all of guest memory, which no uffd registers.
                alias = mmap.mmap(guest.memfd, guest.size, flags=mmap.MAP_SHARED)
                result = ctypes.addressof(ctypes.c_char.from_buffer(alias))
                guest.aliases[result] = alias
            elif op == "unmap_again":
                guest.aliases.pop(req["address"]).close()
            elif op == "reattach":
                # Give wsd the session back (docs/protocol.md), as after a crash.
                try:
                    result, session = hand_off(handoff, guest.reattach, [uffd, guest.memfd])
                except HandoffRefused as e:
                    result = e.reply
                else:
                    if guest.session is not None:
                        guest.session.close()
                    guest.session = session
            elif op == "hang_up":
                # The hand-off connection closed with the VMM alive: its session
                # ends, and wsd brings its evicted pages back.
                if guest.session is not None:
                    guest.session.close()
                    guest.session = None
            elif op == "unmap":
                # Guest memory unplugged (all of it, or ``pages`` [first, count]
                # of it: a DIMM or virtio-mem block): the UNMAP event waits for
                # wsd's read.  (The memfd stays open: it outlives the mapping.)
                first, count = req.get("pages") or (0, len(guest.versions))
                addr, length = guest._addr(first), count * guest.page_size
                if _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length)) < 0:
                    raise OSError(ctypes.get_errno(), "munmap of guest memory")
            else:
                raise PuppetError(f"unknown op {op!r}")
            reply({"id": req["id"], "ok": True, "result": result})
        except Exception as e:  # reported to the parent, which fails the test
            reply({"id": req["id"], "ok": False, "error": f"{type(e).__name__}: {e}"})

    for line in sock.makefile("rb"):
        req = json.loads(line)
        if req["op"] == "exit":
            break
        threading.Thread(target=run, args=(req,), daemon=True).start()
    os._exit(0)  # threads blocked in faults must not keep us alive


# ---------------------------------------------------------------------------
# parent side


@dataclass
class _Pending:
    event: threading.Event
    reply: dict[str, Any] | None = None


class PuppetVMM:
    """Handle on a running puppet; owns the received uffd and memfd fds."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        data, fds = recv_with_fds(sock, 4096, 2)
        if len(fds) != 2:
            raise PuppetError(f"puppet sent {len(fds)} fds, expected uffd and memfd")
        self.uffd_fd, self.memfd = fds
        head, _, rest = data.partition(b"\n")
        hello = json.loads(head)
        self.pid: int = hello["pid"]
        self.base: int = hello["base"]
        self.size: int = hello["size"]
        self.page_size: int = hello["page_size"]
        self.npages = self.size // self.page_size
        self.handoff_reply: dict[str, Any] | None = hello.get("reply")
        self._buf = rest
        self._next = 0
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()

    @classmethod
    def spawn(
        cls,
        size: int,
        *,
        page_size: int = mmap.PAGESIZE,
        fill: bool = True,
        uffd_flags: OpenFlag = OpenFlag.CLOEXEC | OpenFlag.NONBLOCK,
        handoff: Path | None = None,
        vm_id: str = "puppet",
        preregister: str | None = None,
    ) -> Self:
        """Start a puppet; with ``handoff`` it also hands its memory to wsd there."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [
            sys.executable,
            "-m",
            "wsd.testing.puppet_vmm",
            "--sock-fd",
            str(theirs.fileno()),
            "--size",
            str(size),
            "--page-size",
            str(page_size),
            "--uffd-flags",
            str(int(uffd_flags)),
        ]
        if not fill:
            cmd.append("--no-fill")
        if handoff:
            cmd += ["--handoff", str(handoff), "--vm-id", vm_id]
        if preregister:
            cmd += ["--preregister", preregister]
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        try:
            return cls(proc, ours)
        except BaseException:
            ours.close()
            proc.kill()
            proc.wait()
            raise

    def addr(self, page: int) -> int:
        return self.base + page * self.page_size

    def offset(self, page: int) -> int:
        return page * self.page_size

    def _read_replies(self) -> None:
        buf = self._buf
        while True:
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                msg = json.loads(line)
                with self._lock:
                    pending = self._pending.get(msg["id"])
                if pending:
                    pending.reply = msg
                    pending.event.set()
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk

    def send(self, op: str, **args: Any) -> int:
        """Start ``op`` in the puppet (on a thread of its own); returns a request id."""
        with self._lock:
            self._next += 1
            rid = self._next
            self._pending[rid] = _Pending(threading.Event())
        self.sock.sendall(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
        return rid

    def done(self, rid: int) -> bool:
        return self._pending[rid].event.is_set()

    def wait(self, rid: int, timeout: float = 30.0) -> Any:
        pending = self._pending[rid]
        if not pending.event.wait(timeout):
            raise TimeoutError(f"puppet request {rid} did not finish within {timeout}s")
        del self._pending[rid]
        assert pending.reply is not None
        if not pending.reply["ok"]:
            raise PuppetError(pending.reply["error"])
        return pending.reply["result"]

    def call(self, op: str, timeout: float = 30.0, **args: Any) -> Any:
        return self.wait(self.send(op, **args), timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.sock.sendall(b'{"op": "exit"}\n')
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        for fd in (self.uffd_fd, self.memfd):
            if fd >= 0:
                os.close(fd)
        self.uffd_fd = self.memfd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sock-fd", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--page-size", type=int, default=mmap.PAGESIZE)
    ap.add_argument("--uffd-flags", type=int, default=int(OpenFlag.CLOEXEC | OpenFlag.NONBLOCK))
    ap.add_argument("--no-fill", action="store_true")
    ap.add_argument("--handoff", help="hand the memory to the wsd listening here")
    ap.add_argument("--vm-id", default="puppet")
    ap.add_argument(
        "--preregister", help="do UFFDIO_API+REGISTER first: 'auto' or modes such as 'MISSING|WP'"
    )
    a = ap.parse_args()
    _child(a)


if __name__ == "__main__":
    main()
