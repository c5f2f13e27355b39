"""Syscall numbers for the few syscalls glibc does not wrap for us.

There is no header to compute these from in cffi's ABI mode, so they are
tabled per architecture (arch/*/entry/syscalls tables in the kernel source).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class SyscallNumbers:
    userfaultfd: int
    pidfd_open: int
    pidfd_getfd: int


_TABLE = {
    "x86_64": SyscallNumbers(userfaultfd=323, pidfd_open=434, pidfd_getfd=438),
    "aarch64": SyscallNumbers(userfaultfd=282, pidfd_open=434, pidfd_getfd=438),
}


def for_machine(machine: str | None = None) -> SyscallNumbers:
    machine = machine or platform.machine()
    try:
        return _TABLE[machine]
    except KeyError:
        raise NotImplementedError(
            f"wsd knows no syscall numbers for architecture {machine!r}"
            f" (supported: {', '.join(sorted(_TABLE))})"
        ) from None


NR = for_machine()
