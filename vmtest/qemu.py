"""KVM or TCG, the vng command line, and running one VM under a wall-clock timeout.

vng (virtme-ng) boots the kernel with the host's root filesystem shared read-only over 9p and
overlays on /etc, /usr, /var, /tmp...; ``--rwdir`` directories are shared read-write.  The
guest command runs as root; its exit status comes back as vng's.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmtest import InfraError

ENV_KVM = "WSD_VMTEST_KVM"

#: What QEMU prints when KVM cannot run the guest, e.g. a PVM-flavoured /dev/kvm hitting an
#: "emulation failure".  QEMU then pauses the VM rather than exiting, so we must kill it.
KVM_INTERNAL_ERROR = b"KVM internal error"

#: Seconds between SIGTERM and SIGKILL when tearing a VM down.
KILL_GRACE = 5.0


# --- KVM or TCG ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmVerdict:
    """Whether to boot with KVM, and why.

    ``confirmed``: learnt from an actual boot on this host.  ``forced``: set by the user, so
    a failing KVM boot is reported rather than retried under TCG.
    """

    use_kvm: bool
    reason: str
    confirmed: bool = False
    forced: bool = False


def _cpu_flags(root: Path) -> set[str] | None:
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return None


def detect_kvm(
    root: Path = Path("/"),
    env: Mapping[str, str] = os.environ,
    learnt: KvmVerdict | None = None,
    access: Callable[[Path, int], bool] = os.access,
) -> KvmVerdict:
    """Decide between KVM and TCG from the host (``root`` is "/" except in tests).

    Order: $WSD_VMTEST_KVM=0/1 forces it; a verdict learnt from an earlier boot on this host
    kernel; then /dev/kvm must exist and be read-writable, must not be the PVM flavour
    (``/sys/module/kvm_pvm``: it cannot boot a stock kernel) and the CPU must show vmx/svm.
    """
    forced = env.get(ENV_KVM, "").strip()
    if forced in ("0", "1"):
        return KvmVerdict(forced == "1", f"forced by {ENV_KVM}={forced}", forced=True)
    if learnt is not None and not learnt.use_kvm:
        return learnt
    dev = root / "dev/kvm"
    if not dev.exists():
        return KvmVerdict(False, "no /dev/kvm")
    if not access(dev, os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is not read-writable by this user (kvm group?)")
    if (root / "sys/module/kvm_pvm").exists():
        return KvmVerdict(
            False, "/dev/kvm is PVM-flavoured (kvm_pvm loaded); it cannot boot a stock kernel"
        )
    flags = _cpu_flags(root)
    if flags is not None and not flags & {"vmx", "svm"}:
        return KvmVerdict(False, "the CPU shows neither vmx nor svm")
    if learnt is not None and learnt.use_kvm:
        return learnt
    return KvmVerdict(True, "/dev/kvm usable and the CPU has hardware virtualisation")


def load_learnt(path: Path, host_release: str) -> KvmVerdict | None:
    """A verdict saved by :func:`save_learnt` for this host kernel release, if any."""
    try:
        data = json.loads(path.read_text())
        if data["host_release"] != host_release:
            return None
        return KvmVerdict(bool(data["use_kvm"]), str(data["reason"]), confirmed=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_learnt(path: Path, host_release: str, verdict: KvmVerdict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"host_release": host_release, "use_kvm": verdict.use_kvm, "reason": verdict.reason}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# --- the vng command line -----------------------------------------------------------------


@dataclass(frozen=True)
class VmConfig:
    """What to boot and with which resources."""

    kernel: Path
    repo: Path
    use_kvm: bool
    memory: str = "3G"
    cpus: int = 2
    extra_rwdirs: tuple[Path, ...] = ()


def _shell_safe(path: Path) -> str:
    # vng pastes --run, --rwdir and --cwd unquoted into a `sh -c` line for virtme-run.
    text = str(path)
    if shlex.quote(text) != text:
        raise InfraError("vng command line", f"path {text!r} is not shell-safe; vng cannot use it")
    return text


#: The CPU under TCG: vng's ``max`` without AVX and AVX2.  QEMU 7.2 (Debian 12) was the
#: first to emulate them, and gets some of it wrong: in the guest, numpy's AVX2 kernels
#: made ``np.isin`` answer wrongly for 85 of 3,000 random integer arrays, so a restarted
#: wsd read a valid page map as listing pages twice.  Hidden, every program in the
#: guest (numpy, glibc's string functions, zstd) takes its SSE paths.  KVM runs the
#: host's own CPU, which executes AVX2 correctly.
TCG_CPU = "max,-avx,-avx2"


def vng_command(vng: Path, cfg: VmConfig, exec_script: str | None = None) -> list[str]:
    """The vng argv: ``exec_script`` runs under ``sh`` in the guest; None gives a shell."""
    cmd = [
        str(vng),
        f"--run={_shell_safe(cfg.kernel)}",
        f"--memory={cfg.memory}",
        f"--cpus={cfg.cpus}",
        f"--cwd={_shell_safe(cfg.repo)}",
        f"--rwdir={_shell_safe(cfg.repo)}",
        # The guest ends up on 9p either way; without this, virtme-run first tries each
        # virtiofsd it can find (Debian 12 ships one in /usr/lib/qemu that fails to start)
        # and waits about 3 s per export before falling back: 6-9 s of every boot.
        "--force-9p",
    ]
    cmd += [f"--rwdir={_shell_safe(d)}" for d in cfg.extra_rwdirs]
    if not cfg.use_kvm:
        cmd += ["--disable-kvm", f"--qemu-opts=-cpu {TCG_CPU}"]
    if exec_script is not None:
        cmd += ["--exec", exec_script]
    return cmd


#: Files the guest script writes into its run directory (shared read-write with the host).
STARTED_FILE = "started"
STATUS_FILE = "status"


def guest_script(
    argv: Sequence[str], *, venv_bin: Path, env: Mapping[str, str], run_dir: Path
) -> str:
    """A one-line ``sh`` script: set the environment, run ``argv``, record its exit status.

    ``run_dir`` is shared read-write, so the host can tell "the VM never reached the command"
    (no ``started``), "the guest died during it" (no ``status``) and "it exited N" apart;
    vng alone reports 255 for a crashed guest and for a command that exits 255 alike.  The
    venv's bin goes first in PATH, since the guest otherwise finds Debian's /usr/bin/python3.
    """
    exports = [f"PATH={shlex.quote(str(venv_bin))}:$PATH"]
    exports += [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    started = shlex.quote(str(run_dir / STARTED_FILE))
    status = shlex.quote(str(run_dir / STATUS_FILE))
    return (
        f"export {' '.join(exports)}; : > {started}; {shlex.join(argv)}; "
        f'rc=$?; echo "$rc" > {status}; exit "$rc"'
    )


def vng_environment(venv_bin: Path, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Host environment for vng: it runs ``virtme-run`` by name, so the venv must be on PATH."""
    env = dict(base)
    env["PATH"] = f"{venv_bin}{os.pathsep}{base.get('PATH', os.defpath)}"
    return env


# --- running a VM -------------------------------------------------------------------------


@dataclass(frozen=True)
class VmResult:
    returncode: int | None
    elapsed: float
    timed_out: bool = False
    interrupted: bool = False
    kvm_internal_error: bool = False
    tail: str = ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the VM's whole process group (vng, virtme-run, qemu), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            # The leader is gone; make sure no child (qemu) outlived it in the group.
            os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        return


def run_vm(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str],
    stdout: BinaryIO,
    stderr: BinaryIO,
    watch_kvm: bool = False,
) -> VmResult:
    """Run vng non-interactively, streaming its output, within ``timeout`` seconds.

    vng runs in its own session, so Ctrl-C reaches only us and we tear down the whole group;
    nothing is left running on any exit path.  With ``watch_kvm`` a "KVM internal error"
    kills the VM at once (QEMU would otherwise sit paused until the timeout).
    """
    started = time.monotonic()
    deadline = started + timeout
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    sinks: dict[int, BinaryIO | None] = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
    tail = b""
    timed_out = interrupted = kvm_error = False
    sel = selectors.DefaultSelector()
    try:
        for fd in sinks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(remaining, 1.0)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                tail = (tail + data)[-16384:]
                sink = sinks.get(key.fd)
                try:
                    if sink is not None:
                        sink.write(data)
                        sink.flush()
                except BrokenPipeError:
                    # Our reader went away (`| head`): keep the VM going for its status.
                    sinks[key.fd] = None
            if watch_kvm and KVM_INTERNAL_ERROR in tail:
                kvm_error = True
                break
        if not (timed_out or kvm_error):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sel.close()
        if proc.returncode is None:
            _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()
    return VmResult(
        returncode=None if (timed_out or interrupted or kvm_error) else proc.returncode,
        elapsed=time.monotonic() - started,
        timed_out=timed_out,
        interrupted=interrupted,
        kvm_internal_error=kvm_error,
        tail=tail.decode(errors="replace"),
    )


def run_interactive(cmd: Sequence[str], *, env: Mapping[str, str]) -> int:
    """Run vng attached to the terminal (a guest shell); Ctrl-C belongs to the guest."""
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: None)
    try:
        return subprocess.call(list(cmd), env=dict(env))
    finally:
        signal.signal(signal.SIGINT, previous)
