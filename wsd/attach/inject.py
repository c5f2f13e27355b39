"""Have the VMM create a userfaultfd: one ``userfaultfd(2)`` run in it with ptrace.

A userfaultfd is bound to the mm of the process that creates it, so wsd
cannot make one for QEMU's memory itself.  The syscall is run in QEMU's main
thread (its vCPU threads keep running) with the ``syscall`` instruction of
QEMU's own vDSO, and the new fd stays open in QEMU: QEMU then keeps a copy of
the uffd, so a wsd crash makes faulting vCPUs wait instead of reading zeros
(RWP-FACTS fact 9).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from wsd.kernel import KernelError
from wsd.kernel.procfs import Mapping, read_maps
from wsd.kernel.ptrace import Tracee, find_instruction, read_memory
from wsd.kernel.sysno import NR

from .discover import NotAttachable

__all__ = ["USERFAULTFD_FLAGS", "close_in_vmm", "inject_userfaultfd", "syscall_instruction"]

# Raw (no UFFDIO_API: wsd negotiates), and without UFFD_USER_MODE_ONLY: QEMU
# touches guest RAM from the kernel too (KVM, read/write of I/O buffers),
# and such faults on a user-mode-only uffd get SIGBUS.
USERFAULTFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
NR_CLOSE = 3  # x86_64
# Executable text searched for a syscall instruction when the vDSO has none.
MAX_TEXT_SCAN = 4 << 20


def syscall_instruction(pid: int, mappings: list[Mapping]) -> int:
    """An address in ``pid``'s executable memory holding the bytes of a ``syscall``."""
    candidates = [m for m in mappings if m.path == "[vdso]"]
    candidates += [m for m in mappings if m.perms[2:3] == "x" and m.path.startswith("/")]
    for m in candidates:
        addr = find_instruction(read_memory(pid, m.start, min(m.size, MAX_TEXT_SCAN)), m.start)
        if addr is not None:
            return addr
    raise NotAttachable(f"pid {pid}: no syscall instruction found in its vDSO or text")


@contextmanager
def _signals_blocked() -> Iterator[None]:
    # If wsd attach died while the VMM's thread runs on injected registers,
    # the kernel would detach it there: hold ^C and kill until it is restored.
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def inject_userfaultfd(pid: int, mappings: list[Mapping]) -> int:
    """Create a userfaultfd in ``pid``; return its fd number there."""
    with _signals_blocked():
        try:
            with Tracee(pid) as tracee:
                addr = syscall_instruction(pid, mappings)
                rc = tracee.syscall(addr, NR.userfaultfd, USERFAULTFD_FLAGS)
        except KernelError as e:
            raise NotAttachable(why_ptrace_failed(pid, e, ptrace_scope())) from e
    if rc < 0:
        raise NotAttachable(why_userfaultfd_failed(pid, -rc))
    return rc


def close_in_vmm(pid: int, fd: int) -> None:
    """Close ``fd`` in ``pid`` (the uffd of a hand-off wsd refused): leave it as found.

    Only for a uffd no wsd holds or registered: closing the VMM's copy of a
    uffd in use would let a wsd crash turn evicted pages into zeros.
    """
    with _signals_blocked(), Tracee(pid) as tracee:
        rc = tracee.syscall(syscall_instruction(pid, read_maps(pid)), NR_CLOSE, fd)
    if rc < 0:
        raise NotAttachable(f"close({fd}) failed inside pid {pid}: {os.strerror(-rc)}")


def ptrace_scope() -> int | None:
    """``kernel.yama.ptrace_scope``, or None without the Yama LSM."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def why_ptrace_failed(pid: int, e: KernelError, scope: int | None) -> str:
    """Explain a failed ptrace of ``pid``; ``scope``: ``kernel.yama.ptrace_scope``."""
    if e.errno == errno.EPERM and e.op == "ptrace(PTRACE_SEIZE)":
        hint = {
            1: "kernel.yama.ptrace_scope=1 lets only ancestors and CAP_SYS_PTRACE holders attach",
            2: "kernel.yama.ptrace_scope=2 lets only CAP_SYS_PTRACE holders attach",
            3: "kernel.yama.ptrace_scope=3 forbids ptrace attach for everyone until reboot",
        }.get(
            scope or 0,
            "wsd attach needs root (CAP_SYS_PTRACE) to attach to another user's "
            "or a non-dumpable process",
        )
        return f"cannot ptrace pid {pid}: {e.strerror}; {hint}"
    if e.errno == errno.ESRCH:
        return f"pid {pid} exited while wsd attached to it"
    return f"injecting userfaultfd(2) into pid {pid} failed: {e}"


def why_userfaultfd_failed(pid: int, err: int) -> str:
    """Explain ``userfaultfd(2)`` failing with ``err`` inside ``pid``."""
    head = f"userfaultfd(2) failed inside pid {pid}: {os.strerror(err)} (errno {err})"
    if err == errno.EPERM:
        return (
            f"{head}: a uffd that handles kernel faults needs CAP_SYS_PTRACE in the VMM "
            "or vm.unprivileged_userfaultfd=1; run QEMU as root, or set that sysctl"
        )
    if err == errno.ENOSYS:
        return f"{head}: this kernel has no userfaultfd (CONFIG_USERFAULTFD)"
    if err in (errno.EMFILE, errno.ENFILE):
        return f"{head}: the VMM is out of file descriptors"
    return head
