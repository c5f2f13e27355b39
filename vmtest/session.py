"""Prepare the host and boot one guest command: the steps behind ``run``, ``pytest``, ``shell``."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmtest import EXIT_INTERRUPTED, InfraError
from vmtest.kernel import (
    KernelDebs,
    Layout,
    ensure_host_packages,
    fetch_kernel,
    find_vng,
    install_kernel,
)
from vmtest.qemu import (
    STARTED_FILE,
    STATUS_FILE,
    KvmVerdict,
    VmConfig,
    detect_kvm,
    guest_script,
    load_learnt,
    run_vm,
    save_learnt,
    vng_command,
    vng_environment,
)

DEFAULT_TIMEOUT = 1200.0

#: Environment of every guest command.  tests/kernel turns "feature missing" skips into
#: failures under WSD_KERNEL_TESTS_STRICT: in the VM the kernel is known to have RWP.
#: WSD_VMTEST_GUEST makes the tests' waits longer (wsd.testing.slowness).
GUEST_ENV = {"WSD_KERNEL_TESTS_STRICT": "1", "WSD_VMTEST_GUEST": "1"}


def log(message: str) -> None:
    print(f"vmtest: {message}", file=sys.stderr, flush=True)


# --- preparing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    vng: Path
    kernel: KernelDebs
    image: Path
    kvm: KvmVerdict


def _kvm_state(layout: Layout) -> Path:
    return layout.cache / "kvm.json"


def kvm_verdict(layout: Layout) -> KvmVerdict:
    return detect_kvm(learnt=load_learnt(_kvm_state(layout), os.uname().release))


def prepare(layout: Layout, *, refresh: bool = False) -> Prepared:
    """Everything a boot needs; each step is cached and prints one line.

    Several vmtest runs may start at once on a shared machine: a lock in the cache makes
    the first one fetch and install while the others wait, then find everything done.
    """
    layout.cache.mkdir(parents=True, exist_ok=True)
    with (layout.cache / "ensure.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another vmtest to finish preparing the kernel")
            fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_host_packages(log)
        vng = find_vng(layout, log)
        kernel = fetch_kernel(layout, log, refresh=refresh)
        image = install_kernel(layout, kernel, log)
        build_guest_helper(layout)
    kvm = kvm_verdict(layout)
    log(f"accel: {'KVM' if kvm.use_kvm else 'TCG'} ({kvm.reason})")
    return Prepared(vng, kernel, image, kvm)


def build_guest_helper(layout: Layout) -> None:
    """Build ``wsd guest``'s C helper here if it is not built yet: the VM sees the
    host's cache read-only, so a guest that had to build it would fail."""
    code = "from wsd.guest.native import load_native; load_native()"
    done = subprocess.run(
        [str(layout.python), "-c", code],
        check=False,
        cwd=layout.repo,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise InfraError(
            "build the guest helper", done.stderr.strip() or f"exit status {done.returncode}"
        )
    log("wsd guest's C helper: ready")


# --- booting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmOptions:
    memory: str = "3G"
    cpus: int = 2
    timeout: float = DEFAULT_TIMEOUT
    rwdirs: tuple[Path, ...] = ()


def _describe_failure(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()][-15:]
    hint = ""
    if "Kernel panic" in tail:
        hint = " (the guest kernel panicked)"
    return f"{hint}; last output:\n  " + "\n  ".join(lines) if lines else hint


def kvm_failure_reason(tail: str) -> str:
    """The line that best explains a failed KVM boot, for the saved verdict."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for line in lines:
        if "KVM internal error" in line:
            return line
    qemu = (ln for ln in lines if ln.startswith("qemu-system"))
    return next(qemu, lines[-1] if lines else "no output")


def boot(layout: Layout, prep: Prepared, argv: Sequence[str], opts: VmOptions) -> int:
    """Run ``argv`` in the guest and return its exit status; InfraError if the VM failed.

    A KVM boot that dies before the guest reaches the command (QEMU's "KVM internal error",
    or an abort such as "failed to set MSR" on PVM hosts) is retried once under TCG; if that
    gets further, the verdict is saved so later boots on this host kernel go straight to TCG.
    """
    runs = layout.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    script = guest_script(argv, venv_bin=layout.venv_bin, env=GUEST_ENV, run_dir=rundir)
    verdict = prep.kvm
    fell_back = False
    boot_retries = 1
    budget = opts.timeout
    try:
        while True:
            cfg = VmConfig(
                kernel=prep.image,
                repo=layout.repo,
                use_kvm=verdict.use_kvm,
                memory=opts.memory,
                cpus=opts.cpus,
                extra_rwdirs=(rundir, *opts.rwdirs),
            )
            accel = "KVM" if verdict.use_kvm else "TCG"
            log(
                f"boot {prep.kernel.abi} ({accel}, {opts.memory}, {opts.cpus} cpus, "
                f"timeout {budget:.0f} s): {shlex.join(argv)}"
            )
            result = run_vm(
                vng_command(prep.vng, cfg, script),
                timeout=budget,
                env=vng_environment(layout.venv_bin),
                stdout=sys.stdout.buffer,
                stderr=sys.stderr.buffer,
                watch_kvm=verdict.use_kvm,
            )
            started = (rundir / STARTED_FILE).exists()
            if (
                not started
                and not verdict.use_kvm
                and boot_retries
                and not (result.timed_out or result.interrupted)
            ):
                # Seen once (2026-11-26): vng exited 255 after 8 s right after
                # another VM had shut down, and the same boot worked again.
                boot_retries -= 1
                log(
                    f"the VM did not boot (vng exited {result.returncode} after "
                    f"{result.elapsed:.0f} s); retrying once"
                )
                budget -= result.elapsed
                continue
            if started or not verdict.use_kvm or result.timed_out or result.interrupted:
                break
            why = kvm_failure_reason(result.tail)
            if verdict.forced:
                raise InfraError("boot", f"KVM boot failed ({verdict.reason}): {why}")
            log(f"KVM boot failed ({why}); retrying under TCG")
            verdict = KvmVerdict(False, f"a KVM boot failed on this host: {why}")
            fell_back = True
            budget -= result.elapsed
        try:
            status: int | None = int((rundir / STATUS_FILE).read_text().strip())
        except (OSError, ValueError):
            status = None
    finally:
        shutil.rmtree(rundir, ignore_errors=True)

    if started and verdict.use_kvm and not verdict.confirmed:
        save_learnt(_kvm_state(layout), os.uname().release, KvmVerdict(True, "a KVM boot worked"))
    if started and fell_back:
        save_learnt(_kvm_state(layout), os.uname().release, verdict)
        log(f"TCG from now on for this host kernel (saved in {_kvm_state(layout)})")
    if result.interrupted:
        log("interrupted; the VM was killed")
        return EXIT_INTERRUPTED
    if result.timed_out:
        raise InfraError("timeout", f"the VM did not finish within {opts.timeout:.0f} s; killed")
    if status is None:
        where = "the guest died while running the command" if started else "the VM did not boot"
        raise InfraError(
            "boot",
            f"{where} (vng exited {result.returncode} after {result.elapsed:.0f} s)"
            + _describe_failure(result.tail),
        )
    log(f"guest command exited {status} ({result.elapsed:.0f} s including boot)")
    return status
