"""ptrace(2): run one syscall inside another process (x86_64 only).

A userfaultfd is bound to the mm that created it, so to track an unmodified
VMM wsd must have the VMM itself call ``userfaultfd(2)``.  :class:`Tracee`
does what CRIU's compel does for its parasite code, reduced to one syscall:

1. ``PTRACE_SEIZE`` (no ``SIGSTOP`` is sent, unlike ``PTRACE_ATTACH``) and
   ``PTRACE_INTERRUPT`` stop only the thread given; the VMM's other threads
   (vCPUs, I/O) keep running.
2. Save every register.
3. Point ``rip`` at a ``syscall`` instruction already in the tracee's text (the
   caller finds one, e.g. in the vDSO), load the syscall number and
   arguments, and run to the syscall-exit stop (``PTRACE_SYSCALL`` twice).
   No code is written into the tracee and no single-step ``SIGTRAP`` is left
   pending that could kill it after we detach.
4. Restore the registers and ``PTRACE_DETACH``.

Written by hand rather than with python-ptrace: that library attaches with
``PTRACE_ATTACH`` and ``SIGSTOP`` (a stop the VMM could observe), and wsd's
cffi bindings already cover what the few requests here need.

Nothing here decides *what* to inject or where; that is ``wsd.attach``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import signal
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi, libc
from .errors import oserror

__all__ = [
    "SyscallInjectionUnsupported",
    "Tracee",
    "find_instruction",
    "read_memory",
]

# include/uapi/linux/ptrace.h
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SYSCALL = 24
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 1
PTRACE_EVENT_STOP = 128
__WALL = 0x40000000

# include/linux/errno.h: a syscall interrupted by a signal (or by
# PTRACE_INTERRUPT) returns one of these; the kernel restarts it on the way
# back to user space, unless a signal handler says otherwise.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
NR_RESTART_SYSCALL = 219  # x86_64 __NR_restart_syscall
# x86_64 syscall ABI: arguments in rdi, rsi, rdx, r10, r8, r9.
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_SYSCALL_INSN = b"\x0f\x05"


class SyscallInjectionUnsupported(NotImplementedError):
    """This machine is not x86_64: the register layout and ABI here are x86_64's."""


def _check_machine() -> None:
    machine = platform.machine()
    if machine != "x86_64":
        raise SyscallInjectionUnsupported(
            f"injecting a syscall with ptrace is implemented for x86_64 only (this machine is "
            f"{machine}): the register layout and syscall ABI differ per architecture"
        )


def _ptrace(request: int, pid: int, addr: int = 0, data: Any = 0, *, what: str) -> None:
    data_arg = data if isinstance(data, ffi.CData) else ffi.cast("void *", data)
    rc = libc.ptrace(
        ffi.cast("int", request), ffi.cast("int", pid), ffi.cast("void *", addr), data_arg
    )
    if rc < 0:
        raise oserror(f"ptrace({what})", ffi.errno, pid=pid)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class Stop:
    """One ``waitpid`` report of a ptrace-stopped tracee."""

    signal: int
    event: int  # PTRACE_EVENT_* or 0
    syscall: bool  # a syscall-enter/exit stop (SIGTRAP | 0x80)


def _wait(pid: int) -> Stop:
    try:
        _, status = os.waitpid(pid, __WALL)
    except ChildProcessError as e:
        raise oserror("waitpid", errno.ECHILD, pid=pid) from e
    if not os.WIFSTOPPED(status):
        why = (
            f"killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exited with status {os.WEXITSTATUS(status)}"
        )
        raise oserror("waitpid", errno.ESRCH, pid=pid, detail=f"the tracee {why}")
    sig = os.WSTOPSIG(status)
    return Stop(signal=sig & 0x7F, event=status >> 16, syscall=sig == (signal.SIGTRAP | 0x80))


def read_memory(pid: int, address: int, length: int) -> bytes:
    """``length`` bytes of ``pid``'s memory at ``address`` (needs ptrace access to it)."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(address)
            return f.read(length)
    except OSError as e:
        raise oserror(
            "read(/proc/<pid>/mem)", e.errno or errno.EIO, pid=pid, detail=f"at {address:#x}"
        ) from e


class Tracee:
    """One thread of another process, seized and stopped; a context manager.

    On entry the thread is stopped at an interrupt stop with its registers
    saved; :meth:`syscall` runs syscalls in it; on exit its registers are
    restored and it is detached, and it carries on as if nothing happened
    (an interrupted blocking syscall is restarted).  Signals that arrive
    while it runs injected code are held back and sent again after the
    detach.  Block SIGINT/SIGTERM around the ``with`` block: if this process
    died between setting and restoring registers, the tracee would resume
    with the injected ones.
    """

    def __init__(self, pid: int) -> None:
        _check_machine()
        self.pid = pid
        self._saved: Any = None
        self._held: list[int] = []
        self._seized = False

    def __enter__(self) -> Tracee:
        # No PTRACE_O_EXITKILL: if we die, the tracee must live on.
        _ptrace(PTRACE_SEIZE, self.pid, 0, PTRACE_O_TRACESYSGOOD, what="PTRACE_SEIZE")
        self._seized = True
        try:
            _ptrace(PTRACE_INTERRUPT, self.pid, what="PTRACE_INTERRUPT")
            while True:
                stop = _wait(self.pid)
                if stop.event == PTRACE_EVENT_STOP:
                    break
                # A signal-delivery stop that came first: deliver the signal
                # as if we were not here (registers untouched); the interrupt
                # stays pending and is reported next.
                _ptrace(PTRACE_CONT, self.pid, 0, stop.signal, what="PTRACE_CONT")
            regs = self._getregs()
            self._saved = ffi.new("struct user_regs_struct *", regs[0])
            _rewind_interrupted_syscall(self._saved)
        except BaseException:
            self._detach_quietly()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._saved is not None:
                _ptrace(PTRACE_SETREGS, self.pid, 0, self._saved, what="PTRACE_SETREGS")
        finally:
            self._detach_quietly()
            # Held back signals go to the process again: its thread-group
            # delivery picks a thread that does not block them.
            for sig in self._held:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def _detach_quietly(self) -> None:
        if self._seized:
            self._seized = False
            with contextlib.suppress(ProcessLookupError):
                _ptrace(PTRACE_DETACH, self.pid, 0, 0, what="PTRACE_DETACH")

    def _getregs(self) -> Any:
        regs = ffi.new("struct user_regs_struct *")
        _ptrace(PTRACE_GETREGS, self.pid, 0, regs, what="PTRACE_GETREGS")
        return regs

    def register(self, name: str) -> int:
        """A saved register (as it will be restored), e.g. ``rip``."""
        if self._saved is None:
            raise RuntimeError("the tracee is not stopped (use Tracee as a context manager)")
        return int(getattr(self._saved, name))

    def syscall(self, insn_address: int, nr: int, *args: int) -> int:
        """Run syscall ``nr`` in the tracee with the ``syscall`` instruction at ``insn_address``.

        Returns the raw result (``-errno`` on failure), like the kernel's ``rax``.
        """
        if self._saved is None:
            raise RuntimeError("the tracee is not stopped (use Tracee as a context manager)")
        if len(args) > len(_ARG_REGS):
            raise ValueError(f"a syscall takes at most {len(_ARG_REGS)} arguments")
        regs = ffi.new("struct user_regs_struct *", self._saved[0])
        regs.rip = insn_address
        regs.rax = nr
        # orig_rax -1: no syscall in progress, so the kernel's restart logic
        # leaves rip and rax alone when the thread resumes.
        regs.orig_rax = (1 << 64) - 1
        for name, value in zip(_ARG_REGS, args, strict=False):
            setattr(regs, name, value & ((1 << 64) - 1))
        _ptrace(PTRACE_SETREGS, self.pid, 0, regs, what="PTRACE_SETREGS")
        exits = 0
        entered = False
        while exits == 0:
            _ptrace(PTRACE_SYSCALL, self.pid, 0, 0, what="PTRACE_SYSCALL")
            stop = _wait(self.pid)
            if stop.syscall:
                if entered:
                    exits += 1
                entered = True
            elif stop.event == 0:
                # A signal arrived: delivering it now would run its handler on
                # our injected registers.  Hold it back; __exit__ sends it again.
                self._held.append(stop.signal)
        done = self._getregs()
        if int(done.rip) != insn_address + len(_SYSCALL_INSN):
            raise oserror(
                "ptrace(PTRACE_SYSCALL)",
                errno.EFAULT,
                pid=self.pid,
                detail=f"the syscall stopped at {int(done.rip):#x}, not after {insn_address:#x}",
            )
        return _signed(int(done.rax))


def _rewind_interrupted_syscall(regs: Any) -> None:
    """Make the saved registers re-issue a syscall the interrupt broke off.

    A thread stopped inside a blocking syscall (QEMU's main loop sits in
    ``ppoll``) reports ``rax = -ERESTART*`` with ``orig_rax`` the syscall.
    The kernel would restart it when the thread resumes from that very stop,
    but we resume it elsewhere first, so the restart is ours to arrange: back
    ``rip`` up over the 2-byte ``syscall`` instruction and reload ``rax``, as
    compel does (criu/compel/arch/x86/src/lib/infect.c, get_task_regs).
    """
    if _signed(int(regs.orig_rax)) < 0:
        return
    ret = -_signed(int(regs.rax))
    if ret in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        regs.rax = regs.orig_rax
        regs.rip -= len(_SYSCALL_INSN)
    elif ret == ERESTART_RESTARTBLOCK:
        regs.rax = NR_RESTART_SYSCALL
        regs.rip -= len(_SYSCALL_INSN)


def find_instruction(data: bytes, base: int) -> int | None:
    """The address of the first ``syscall`` instruction's bytes in ``data`` mapped at ``base``.

    Its place inside the surrounding code does not matter: the CPU decodes
    from wherever ``rip`` points.
    """
    at = data.find(_SYSCALL_INSN)
    return None if at < 0 else base + at
