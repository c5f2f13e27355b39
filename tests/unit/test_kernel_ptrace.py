"""wsd.kernel.ptrace without a tracee: register layout, syscall-restart rewind, search."""

from __future__ import annotations

from wsd.kernel._ffi import ffi
from wsd.kernel.ptrace import (
    ERESTART_RESTARTBLOCK,
    ERESTARTNOHAND,
    ERESTARTSYS,
    NR_RESTART_SYSCALL,
    _rewind_interrupted_syscall,
    _signed,
    find_instruction,
)

MASK = (1 << 64) - 1
NR_PPOLL = 271


def test_user_regs_struct_has_the_x86_64_layout() -> None:
    # arch/x86/include/asm/user_64.h: 27 unsigned longs, orig_rax at 15, rip at 16.
    assert ffi.sizeof("struct user_regs_struct") == 27 * 8
    assert ffi.offsetof("struct user_regs_struct", "rax") == 10 * 8
    assert ffi.offsetof("struct user_regs_struct", "orig_rax") == 15 * 8
    assert ffi.offsetof("struct user_regs_struct", "rip") == 16 * 8
    assert ffi.offsetof("struct user_regs_struct", "rsp") == 19 * 8
    assert ffi.offsetof("struct user_regs_struct", "gs") == 26 * 8


def regs(orig_rax: int, rax: int, rip: int = 0x1000) -> object:
    r = ffi.new("struct user_regs_struct *")
    r.orig_rax, r.rax, r.rip = orig_rax & MASK, rax & MASK, rip
    return r


def test_a_syscall_the_interrupt_broke_off_is_reissued() -> None:
    for err in (ERESTARTSYS, ERESTARTNOHAND):
        r = regs(NR_PPOLL, -err)
        _rewind_interrupted_syscall(r)
        assert (r.rax, r.rip) == (NR_PPOLL, 0x1000 - 2)  # type: ignore[attr-defined]


def test_a_restart_block_goes_through_restart_syscall() -> None:
    r = regs(35, -ERESTART_RESTARTBLOCK)  # nanosleep
    _rewind_interrupted_syscall(r)
    assert (r.rax, r.rip) == (NR_RESTART_SYSCALL, 0x1000 - 2)  # type: ignore[attr-defined]


def test_user_code_and_finished_syscalls_are_left_alone() -> None:
    for orig, rax in ((-1, 12345), (NR_PPOLL, 0), (NR_PPOLL, -4)):  # -EINTR stays EINTR
        r = regs(orig, rax)
        _rewind_interrupted_syscall(r)
        assert (_signed(r.rax), r.rip) == (rax, 0x1000)  # type: ignore[attr-defined]


def test_find_instruction_finds_the_bytes_wherever_they_are() -> None:
    assert find_instruction(b"\x48\x89\xc7\x0f\x05\xc3", 0x7000) == 0x7003
    assert find_instruction(b"\x90" * 64, 0x7000) is None
