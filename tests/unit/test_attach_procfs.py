"""wsd attach's reading of /proc: maps and smaps lines, which mappings are guest RAM, preflight."""

from __future__ import annotations

import errno
import json
import os
import platform
from pathlib import Path

import pytest

from wsd.attach.adopt import handoff_message, preflight
from wsd.attach.discover import (
    NotAttachable,
    find_guest_ram,
    memfd_name,
)
from wsd.attach.inject import why_ptrace_failed, why_userfaultfd_failed
from wsd.kernel import FileId, oserror
from wsd.kernel.procfs import SmapsInfo, parse_maps, parse_smaps
from wsd.vmm.protocol import parse_request

# What QEMU 8.2 with -object memory-backend-memfd,id=mem,size=64M,share=on maps
# (abridged), plus a path with spaces.
MAPS = (
    b"55d0c5a00000-55d0c5e00000 r--p 00000000 fd:01 1835012   /usr/bin/qemu-system-x86_64\n"
    # Anonymous mappings end in a space.
    b"7fe783ffe000-7fe783fff000 ---p 00000000 00:00 0 \n"
    b"7fe783fff000-7fe787fff000 rw-s 00000000 00:01 5640   /memfd:memory-backend-memfd (deleted)\n"
    b"7fe788000000-7fe788021000 rw-p 00000000 00:00 0 \n"
    b"7fe790000000-7fe790200000 rw-s 00000000 00:01 7777   /memfd:qemu-ramfb (deleted)\n"
    b"7fe7a0000000-7fe7a0001000 r--p 00000000 fd:01 42     /opt/a dir/with spaces.so\n"
    b"7ffd5c3e4000-7ffd5c3e6000 r-xp 00000000 00:00 0      [vdso]\n"
)

SMAPS = (
    b"7fe783fff000-7fe787fff000 rw-s 00000000 00:01 5640   /memfd:memory-backend-memfd (deleted)\n"
    b"Size:              65536 kB\n"
    b"KernelPageSize:        4 kB\n"
    b"MMUPageSize:           4 kB\n"
    b"Rss:                1024 kB\n"
    b"VmFlags: rd wr sh mr mw me ms dc hg \n"
    b"7fe790000000-7fe790200000 rw-s 00000000 00:01 7777   /memfd:qemu-ramfb (deleted)\n"
    b"Size:               2048 kB\n"
    b"KernelPageSize:     2048 kB\n"
    b"VmFlags: rd wr sh mr mw me ms \n"
)

RAM_START = 0x7FE783FFF000
RAM_END = 0x7FE787FFF000


def test_maps_lines_parse_with_anonymous_and_spaced_paths() -> None:
    maps = parse_maps(MAPS)
    assert len(maps) == 7
    ram = maps[2]
    assert (ram.start, ram.size, ram.offset) == (RAM_START, 64 << 20, 0)
    assert ram.shared and ram.perms == "rw-s"
    assert ram.file == FileId(os.makedev(0, 1), 5640)
    assert ram.path == "/memfd:memory-backend-memfd (deleted)"
    assert maps[1].path == "" and not maps[1].shared
    assert maps[5].path == "/opt/a dir/with spaces.so"
    assert maps[6].path == "[vdso]"
    assert ram.covers(RAM_START + 4096, 8192) and not ram.covers(RAM_START - 4096, 8192)


def test_a_line_that_is_not_a_maps_line_is_an_error_quoting_it() -> None:
    with pytest.raises(ValueError, match="not a line of /proc/<pid>/maps: 'garbage'"):
        parse_maps(b"garbage\n")


def test_memfd_names() -> None:
    assert memfd_name("/memfd:memory-backend-memfd (deleted)") == "memory-backend-memfd"
    assert memfd_name("/memfd:mem") == "mem"
    assert memfd_name("/dev/shm/x") is None and memfd_name("") is None


def test_smaps_gives_page_size_and_flags_per_mapping() -> None:
    smaps = parse_smaps(SMAPS)
    assert smaps[RAM_START] == SmapsInfo(
        4096, frozenset({"rd", "wr", "sh", "mr", "mw", "me", "ms", "dc", "hg"}), RAM_END
    )
    assert smaps[0x7FE790000000].page_size == 2 << 20


def test_guest_ram_is_every_shared_writable_memfd_mapping() -> None:
    ram = find_guest_ram(1, parse_maps(MAPS), parse_smaps(SMAPS))
    assert [(r.mapping.start, r.page_size, r.name) for r in ram.regions] == [
        (RAM_START, 4096, "memory-backend-memfd"),
        (0x7FE790000000, 2 << 20, "qemu-ramfb"),
    ]
    assert ram.size == (64 << 20) + (2 << 20)
    assert len(ram.files) == 2


def test_a_memfd_name_picks_the_backend() -> None:
    ram = find_guest_ram(1, parse_maps(MAPS), parse_smaps(SMAPS), name="memory-backend-memfd")
    assert [r.mapping.start for r in ram.regions] == [RAM_START]
    with pytest.raises(NotAttachable, match=r"maps no memfd named 'ram0' \(it maps memfds named"):
        find_guest_ram(1, parse_maps(MAPS), parse_smaps(SMAPS), name="ram0")


def test_no_memfd_says_how_to_start_qemu() -> None:
    maps = parse_maps(MAPS.replace(b"/memfd:", b"/tmp/"))
    with pytest.raises(NotAttachable) as e:
        find_guest_ram(7, maps, {})
    assert "pid 7 maps no memfd: its guest RAM is not memfd-backed" in str(e.value)
    assert "memory-backend-memfd,id=mem,size=SIZE,share=on" in str(e.value)


def test_a_private_memfd_mapping_asks_for_share_on() -> None:
    maps = parse_maps(MAPS.replace(b"rw-s", b"rw-p"))
    with pytest.raises(NotAttachable, match=r"private \(copy-on-write\).*share=on"):
        find_guest_ram(7, maps, parse_smaps(SMAPS))


def test_ram_registered_with_a_uffd_already_is_refused() -> None:
    smaps = parse_smaps(SMAPS.replace(b"dc hg", b"dc hg um uw"))
    with pytest.raises(NotAttachable) as e:
        find_guest_ram(7, parse_maps(MAPS), smaps)
    assert "already registered with a userfaultfd (VmFlags um uw)" in str(e.value)
    assert "postcopy" in str(e.value)


def test_the_same_memfd_pages_mapped_twice_are_refused() -> None:
    twice = MAPS + (
        b"7fe800000000-7fe801000000 rw-s 00100000 00:01 5640 "
        b"/memfd:memory-backend-memfd (deleted)\n"
    )
    smaps = parse_smaps(SMAPS) | {
        0x7FE800000000: SmapsInfo(4096, frozenset({"rd"}), 0x7FE801000000)
    }
    with pytest.raises(NotAttachable, match=r"maps the same part of memfd .* twice"):
        find_guest_ram(7, parse_maps(twice), smaps)


def test_the_handoff_message_is_a_valid_on_behalf_handoff() -> None:
    ram = find_guest_ram(4242, parse_maps(MAPS), parse_smaps(SMAPS))
    msg = handoff_message("vm-1", ram)
    req = parse_request(json.dumps(msg).encode())
    assert req.on_behalf and req.vmm_pid == 4242
    assert [(r.host_virt_addr, r.size, r.fd_index, r.page_size) for r in req.regions] == [
        (RAM_START, 64 << 20, 1, 4096),
        (0x7FE790000000, 2 << 20, 2, 2 << 20),
    ]
    assert [r.guest_phys_addr for r in req.regions] == [0, 64 << 20]


def _proc(tmp_path: Path, pid: int, status: str, exe: bytes) -> Path:
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "status").write_text(status)
    (d / "exe").write_bytes(exe)
    return tmp_path


ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little")
ROOT = {"CapEff": "000001ffffffffff"}
STATUS = "Name:\tqemu-system-x86\nState:\tS (sleeping)\nTgid:\t100\nTracerPid:\t0\n"

X86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="wsd attach is x86_64 only")


@X86_64
def test_preflight_passes_a_sleeping_x86_64_process(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 100, STATUS, ELF_X86_64)
    assert preflight(100, proc=proc, self_status=ROOT) == "qemu-system-x86"


@X86_64
@pytest.mark.parametrize(
    ("status", "exe", "me", "message"),
    [
        (
            STATUS,
            ELF_X86_64,
            {"CapEff": "0000000000000000"},
            "needs root (precisely CAP_SYS_PTRACE)",
        ),
        (
            STATUS.replace("S (sleeping)", "T (stopped)"),
            ELF_X86_64,
            ROOT,
            "is stopped (T (stopped))",
        ),
        (
            STATUS.replace("TracerPid:\t0", "TracerPid:\t55"),
            ELF_X86_64,
            ROOT,
            "already traced by pid 55",
        ),
        (STATUS.replace("Tgid:\t100", "Tgid:\t99"), ELF_X86_64, ROOT, "is a thread of process 99"),
        (STATUS, ELF_X86_64[:18] + (183).to_bytes(2, "little"), ROOT, "not a 64-bit x86_64"),
        (STATUS, b"#!/bin/sh\n" + bytes(10), ROOT, "not a 64-bit x86_64"),
    ],
    ids=["no-cap", "stopped", "traced", "thread", "aarch64-binary", "script"],
)
def test_preflight_refusals_name_the_problem(
    tmp_path: Path, status: str, exe: bytes, me: dict[str, str], message: str
) -> None:
    proc = _proc(tmp_path, 100, status, exe)
    with pytest.raises(NotAttachable, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(100, proc=proc, self_status=me)


@X86_64
def test_preflight_of_a_missing_pid(tmp_path: Path) -> None:
    with pytest.raises(NotAttachable, match="no process with pid 100"):
        preflight(100, proc=tmp_path, self_status=ROOT)


@pytest.mark.parametrize(
    ("scope", "hint"),
    [
        (None, "wsd attach needs root (CAP_SYS_PTRACE)"),
        (0, "wsd attach needs root (CAP_SYS_PTRACE)"),
        (1, "kernel.yama.ptrace_scope=1 lets only ancestors and CAP_SYS_PTRACE holders"),
        (2, "kernel.yama.ptrace_scope=2 lets only CAP_SYS_PTRACE holders attach"),
        (3, "kernel.yama.ptrace_scope=3 forbids ptrace attach for everyone until reboot"),
    ],
)
def test_a_refused_seize_names_the_yama_scope(scope: int | None, hint: str) -> None:
    err = oserror("ptrace(PTRACE_SEIZE)", errno.EPERM, pid=100)
    text = why_ptrace_failed(100, err, scope)
    assert text.startswith("cannot ptrace pid 100: ") and hint in text


def test_a_vanished_tracee_and_userfaultfd_errors_are_explained() -> None:
    gone = oserror("ptrace(PTRACE_INTERRUPT)", errno.ESRCH, pid=100)
    assert why_ptrace_failed(100, gone, None) == "pid 100 exited while wsd attached to it"
    eperm = why_userfaultfd_failed(100, errno.EPERM)
    assert eperm.startswith("userfaultfd(2) failed inside pid 100: Operation not permitted")
    assert "vm.unprivileged_userfaultfd=1" in eperm
    assert "no userfaultfd (CONFIG_USERFAULTFD)" in why_userfaultfd_failed(100, errno.ENOSYS)
