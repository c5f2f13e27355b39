"""wsd attach against stand-ins for QEMU, in the mode this kernel gets.

The integration tier runs it on the host (wp-async on 6.18).  The kernel tier
runs the two tests whose outcome depends on the mode again in the 7.3 VM (rwp;
``make test-kernel`` passes them to the VM's pytest): eviction and fetch-back
of an adopted process, and its session given to a restarted wsd.  The others
exercise ptrace and preflight checks, the same in both modes, and would take
minutes of Python start-ups under TCG.

The stand-in (``standin.c``) keeps guest RAM in a shared memfd and waits in
``poll()`` between rewrites of its hot pages, as QEMU's main loop waits in
``ppoll()``: the injection interrupts a syscall the kernel must restart.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmms_harness import Attach, StandIn, Wsd, wait_for

from wsd.attach.inject import syscall_instruction
from wsd.kernel import probe_kernel
from wsd.kernel.procfs import read_maps
from wsd.kernel.ptrace import Tracee
from wsd.kernel.sysno import NR
from wsd.testing.slowness import in_test_vm, patient
from wsd.tracker.mode import choose_mode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and pidfd_getfd of another process"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="wsd attach is x86_64 only"),
]
NR_GETPID = 39
# Under TCG every fetch-back takes milliseconds: smaller guests in the VM.
LARGE_MIB, MEDIUM_MIB = (8, 4) if in_test_vm() else (64, 32)


def test_injected_syscalls_run_in_the_tracee_and_it_carries_on(standin) -> None:
    s: StandIn = standin(8, 16)
    addr = syscall_instruction(s.pid, read_maps(s.pid))
    for _ in range(50):
        with Tracee(s.pid) as tracee:
            rip = tracee.register("rip")
            assert tracee.syscall(addr, NR_GETPID) == s.pid
            assert tracee.syscall(addr, NR_GETPID) == s.pid
            assert tracee.register("rip") == rip  # what will be restored
        time.sleep(0.002)
    with Tracee(s.pid) as tracee:
        fd = tracee.syscall(addr, NR.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0
    assert os.readlink(f"/proc/{s.pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    assert s.check() == s.ok
    assert s.lines == [], "poll() returned EINTR: an interrupted syscall was not restarted"
    assert s.running()


def test_a_failing_injected_syscall_returns_its_errno(standin) -> None:
    s: StandIn = standin(8, 16)
    addr = syscall_instruction(s.pid, read_maps(s.pid))
    with Tracee(s.pid) as tracee:
        assert tracee.syscall(addr, NR.userfaultfd, 0xDEAD0000) == -22  # EINVAL: bad flags
    assert s.check() == s.ok and s.running()


def test_wsd_attach_evicts_and_fetches_back_the_standin_memory(standin, wsd: Wsd) -> None:
    s: StandIn = standin(LARGE_MIB, 64)
    detach_wait = ("--detach-wait", str(patient(240)))
    attach = Attach(s.pid, wsd.socket, "--vm-id", "standin", *detach_wait)
    line = attach.first_line()
    assert f"standin: wsd tracks {LARGE_MIB}.0 MiB of pid" in line, line
    assert f"mode {choose_mode(probe_kernel()).mode}" in line, line
    assert s.userfaultfds() == 1  # the stand-in keeps its copy of the uffd
    uffd_fd = int(line.rsplit("userfaultfd is fd ", 1)[1].split()[0])
    wait_for(lambda: s.resident() <= s.size // 2, "half the memory evicted", timeout=60)
    vm = wsd.vm("standin")
    assert vm is not None and vm["evicted_bytes"] >= s.size // 2
    evicted_at_least = vm["evicted_bytes"]
    assert s.check() == s.ok  # every evicted page comes back on touch
    fetched = wsd.vm("standin")
    assert fetched is not None and fetched["fetched_bytes_total"] > 0
    code, err = attach.stop()
    assert code == 130 and "detached; wsd puts the evicted pages back" in err
    # It waited for wsd to let go of the RAM, then closed the uffd it injected.
    assert f"closed the userfaultfd (fd {uffd_fd}) in the VMM" in err, err
    assert s.userfaultfds() == 0
    wsd.wait_session_closed("standin")
    assert s.resident() == s.size  # every page is back in the memfd
    assert s.check() == s.ok
    assert s.lines == [] and s.running()
    print(
        f"stand-in: {s.size >> 20} MiB, {evicted_at_least >> 20} MiB evicted, "
        f"{fetched['fetched_bytes_total'] >> 20} MiB fetched back, data intact"
    )
    # A second attach after the first session injects a new uffd.
    again = Attach(s.pid, wsd.socket, "--vm-id", "standin", *detach_wait)
    assert "standin: wsd tracks" in again.first_line()
    assert s.userfaultfds() == 1
    assert again.stop()[0] == 130
    assert s.userfaultfds() == 0
    assert s.check() == s.ok and s.running()


def test_attach_gives_the_session_to_a_restarted_wsd(standin, wsd: Wsd) -> None:
    s: StandIn = standin(MEDIUM_MIB, 32)
    attach = Attach(s.pid, wsd.socket, "--vm-id", "phoenix")
    assert "phoenix: wsd tracks" in attach.first_line()
    wait_for(lambda: s.resident() <= s.size // 2, "half the memory evicted", timeout=60)
    wsd.crash()
    # Without wsd, the stand-in still runs; its next touch of an evicted page
    # waits (its copy of the uffd keeps the pages registered: no zeros).
    assert s.running()
    wsd.start()
    wait_for(lambda: wsd.vm("phoenix") is not None, "the session reattached", timeout=60)
    assert s.check() == s.ok
    code, err = attach.stop()
    assert code == 130, err
    assert "wsd closed the session of phoenix: reattaching to the next wsd" in err
    assert "phoenix: reattached" in err
    assert s.check() == s.ok and s.running() and s.lines == []


def test_attach_ends_when_the_vmm_exits(standin, wsd: Wsd) -> None:
    s: StandIn = standin(8, 16)
    attach = Attach(s.pid, wsd.socket, "--vm-id", "short")
    assert "short: wsd tracks" in attach.first_line()
    assert s.stop() == 0
    out, _ = attach.proc.communicate(timeout=patient(30))
    assert attach.proc.returncode == 0
    assert f"short: pid {s.pid} exited; session over" in out
    wait_for(lambda: wsd.vm("short") is None, "the session to end", timeout=30)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def run_attach(
    pid: int, socket: Path, *args: str, wrap: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "wsd", "attach", "--pid", str(pid), "--socket", str(socket)]
    return subprocess.run(
        [*(wrap or []), *argv, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_refusals_are_clear_and_leave_the_process_running(
    standin, wsd: Wsd, tmp_path: Path
) -> None:
    s: StandIn = standin(8, 16)
    # No such process.
    out = run_attach(4_000_000, wsd.socket)
    assert out.returncode == 1 and "no process with pid 4000000" in out.stderr, out.stderr
    # RAM that is not memfd-backed.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        out = run_attach(sleeper.pid, wsd.socket)
        assert out.returncode == 1
        assert "maps no memfd: its guest RAM is not memfd-backed" in out.stderr, out.stderr
        assert "memory-backend-memfd,id=mem,size=SIZE,share=on" in out.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    # A memfd name that is not there.
    out = run_attach(s.pid, wsd.socket, "--memfd-name", "memory-backend-memfd")
    assert "maps no memfd named 'memory-backend-memfd'" in out.stderr, out.stderr
    # wsd not running: refused before anything is injected.
    out = run_attach(s.pid, tmp_path / "nowhere.sock")
    assert out.returncode == 2 and "wsd is not running: no hand-off socket" in out.stderr
    assert s.userfaultfds() == 0
    # Root without CAP_SYS_PTRACE (another uid could not even run the venv's python).
    if shutil.which("setpriv"):
        out = run_attach(s.pid, wsd.socket, wrap=["setpriv", "--bounding-set", "-sys_ptrace"])
        assert out.returncode == 1 and "needs root (precisely CAP_SYS_PTRACE)" in out.stderr, out
    # Already registered: a second attach while the first session runs.
    first = Attach(s.pid, wsd.socket, "--vm-id", "first")
    assert "first: wsd tracks" in first.first_line()
    out = run_attach(s.pid, wsd.socket, "--vm-id", "second")
    assert out.returncode == 1
    assert "is already registered with a userfaultfd (VmFlags" in out.stderr, out.stderr
    # wsd refuses the hand-off (the vm_id is taken): the injected uffd is closed again.
    other = standin(8, 16)
    out = run_attach(other.pid, wsd.socket, "--vm-id", "first")
    assert out.returncode == 1 and "duplicate_vm: vm_id 'first' has a session" in out.stderr, out
    assert other.userfaultfds() == 0
    assert other.check() == other.ok and other.running()
    assert first.stop()[0] == 130
    # A stopped process.
    os.kill(s.pid, 19)  # SIGSTOP
    try:
        wait_for(lambda: state(s.pid) == "T", "the stop")
        out = run_attach(s.pid, wsd.socket)
        assert "is stopped (T (stopped)); continue it first" in out.stderr, out.stderr
    finally:
        os.kill(s.pid, 18)  # SIGCONT
    assert s.check() == s.ok and s.running() and s.lines == []
