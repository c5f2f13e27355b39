"""``python -m vmtest``: run commands, or wsd's kernel tests, inside the Linux 7.3+ test VM.

    python -m vmtest ensure [--refresh]       host packages, kernel fetch (cached), install
    python -m vmtest info                     kernel, cache, KVM verdict; no network
    python -m vmtest run [VM OPTIONS] [--] CMD [ARG...]
    python -m vmtest pytest [VM OPTIONS] [--] [PYTEST ARG...]
    python -m vmtest shell [--memory M] [--cpus N]

VM options (run, pytest) must come before the command or the pytest arguments.  The exit
status is the guest command's, or 125 when the VM machinery fails (see docs/vmtest.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vmtest import EXIT_INFRA, EXIT_INTERRUPTED, InfraError
from vmtest.kernel import Layout, cached_kernel, installed_version, kernel_image
from vmtest.qemu import VmConfig, run_interactive, vng_command, vng_environment
from vmtest.session import (
    DEFAULT_TIMEOUT,
    Prepared,
    VmOptions,
    boot,
    kvm_verdict,
    log,
    prepare,
)

#: Options taking a value that belong to vmtest when they lead the run/pytest arguments.
VM_VALUE_OPTIONS = ("--memory", "--cpus", "--timeout", "--rwdir")


# --- subcommands --------------------------------------------------------------------------


def cmd_ensure(layout: Layout, ns: argparse.Namespace) -> int:
    prepare(layout, refresh=ns.refresh)
    return 0


def cmd_info(layout: Layout, _ns: argparse.Namespace) -> int:
    kernel = cached_kernel(layout)
    if kernel is None:
        print("kernel:  not fetched yet (python -m vmtest ensure)")
    else:
        image = kernel_image(layout, kernel.abi)
        installed = installed_version(layout, kernel.abi)
        if not image.exists():
            state = "not installed (python -m vmtest ensure)"
        elif installed in (None, kernel.version):
            state = "installed"
        else:
            state = f"holds {installed} (python -m vmtest ensure replaces it)"
        print(f"kernel:  {kernel.abi} ({kernel.version}), {image} {state}")
    print(f"cache:   {layout.cache}")
    kvm = kvm_verdict(layout)
    print(f"accel:   {'KVM' if kvm.use_kvm else 'TCG (--disable-kvm)'}: {kvm.reason}")
    vng = layout.venv_bin / "vng"
    print(f"vng:     {vng if vng.exists() else f'missing ({vng}); run tools/bootstrap.sh'}")
    print(f"repo:    {layout.repo} (shared read-write, guest cwd)")
    print(f"python:  {layout.python}")
    return 0


def _options(ns: argparse.Namespace) -> VmOptions:
    return VmOptions(
        memory=ns.memory,
        cpus=ns.cpus,
        timeout=ns.timeout,
        rwdirs=tuple(Path(d).absolute() for d in ns.rwdir),
    )


def cmd_run(layout: Layout, ns: argparse.Namespace) -> int:
    if not ns.command:
        raise SystemExit("vmtest run: no command given (python -m vmtest run -- CMD ARGS...)")
    prep = prepare(layout)
    return boot(layout, prep, ns.command, _options(ns))


def junit_path(pytest_args: Sequence[str], cwd: Path) -> Path | None:
    """The report path of ``--junitxml=PATH`` / ``--junitxml PATH`` (or --junit-xml)."""
    found: str | None = None
    for i, arg in enumerate(pytest_args):
        for name in ("--junitxml", "--junit-xml"):
            if arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
            elif arg == name and i + 1 < len(pytest_args):
                found = pytest_args[i + 1]
    return None if found is None else cwd / found


def cmd_pytest(layout: Layout, ns: argparse.Namespace) -> int:
    argv = [str(layout.python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernel"]
    argv += ns.command
    opts = _options(ns)
    junit = junit_path(ns.command, layout.repo)
    if junit is not None:
        # pytest writes it in the guest: its directory must exist and be shared read-write.
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.unlink(missing_ok=True)
        if not junit.resolve().is_relative_to(layout.repo):
            opts = VmOptions(opts.memory, opts.cpus, opts.timeout, (*opts.rwdirs, junit.parent))
    prep = prepare(layout)
    status = boot(layout, prep, argv, opts)
    if junit is not None:
        if junit.exists():
            log(f"junit report: {junit}")
        else:
            log(f"junit report {junit} was not written")
            if status == 0:
                return EXIT_INFRA
    return status


def cmd_shell(layout: Layout, ns: argparse.Namespace) -> int:
    prep = prepare(layout)
    if prep.kvm.use_kvm and not prep.kvm.confirmed:
        # An interactive QEMU cannot be watched for "KVM internal error": probe once first.
        boot(layout, prep, ["true"], VmOptions(memory=ns.memory, cpus=ns.cpus, timeout=300))
        prep = Prepared(prep.vng, prep.kernel, prep.image, kvm_verdict(layout))
    cfg = VmConfig(
        kernel=prep.image,
        repo=layout.repo,
        use_kvm=prep.kvm.use_kvm,
        memory=ns.memory,
        cpus=ns.cpus,
    )
    log(f"shell on {prep.kernel.abi} ({'KVM' if prep.kvm.use_kvm else 'TCG'}); exit to leave")
    return run_interactive(vng_command(prep.vng, cfg), env=vng_environment(layout.venv_bin))


# --- argument parsing ---------------------------------------------------------------------


def split_vm_options(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``run``/``pytest`` arguments into leading vmtest options and the rest.

    The first token that is not a vmtest option ends them; a ``--`` there is dropped.  So
    ``pytest --junitxml=x -k foo`` passes everything to pytest, and a pytest option that
    shares a name with ours (``--timeout``) can still be given after ``--``.
    """
    vm: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            return vm, list(tokens[i + 1 :])
        name = tok.split("=", 1)[0]
        if name not in VM_VALUE_OPTIONS and tok not in ("-h", "--help"):
            break
        takes_next = "=" not in tok and tok not in ("-h", "--help")
        vm += tokens[i : i + 2] if takes_next else [tok]
        i += 2 if takes_next else 1
    return vm, list(tokens[i:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmtest",
        description="Run commands or wsd's kernel tests in a Linux 7.3+ VM (virtme-ng).",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    ensure = sub.add_parser("ensure", help="install prerequisites, fetch and install the kernel")
    ensure.add_argument(
        "--refresh", action="store_true", help="look for a newer kernel in the archive"
    )
    ensure.set_defaults(func=cmd_ensure)
    sub.add_parser("info", help="show kernel, cache and KVM verdict").set_defaults(func=cmd_info)

    def vm_options(p: argparse.ArgumentParser, *, timeout: bool = True) -> None:
        p.add_argument("--memory", default="3G", help="guest RAM (default: %(default)s)")
        p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default: %(default)s)")
        if timeout:
            p.add_argument(
                "--timeout",
                type=float,
                default=DEFAULT_TIMEOUT,
                help="wall-clock limit in seconds, boot included (default: %(default).0f)",
            )
            p.add_argument(
                "--rwdir",
                action="append",
                default=[],
                help="extra host directory shared read-write (repeatable)",
            )

    run = sub.add_parser("run", help="boot, run CMD in the guest, exit with its status")
    vm_options(run)
    run.add_argument("command", nargs="*", metavar="CMD", help="command and arguments")
    run.set_defaults(func=cmd_run)
    pytest = sub.add_parser("pytest", help="run pytest on tests/kernel in the guest")
    vm_options(pytest)
    pytest.add_argument("command", nargs="*", metavar="PYTEST_ARG", help="extra pytest args")
    pytest.set_defaults(func=cmd_pytest)
    shell = sub.add_parser("shell", help="interactive shell in the guest")
    vm_options(shell, timeout=False)
    shell.set_defaults(func=cmd_shell)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    if argv and argv[0] in ("run", "pytest"):
        vm, rest = split_vm_options(argv[1:])
        ns = parser.parse_args([argv[0], *vm])
        ns.command = rest
        return ns
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    layout = Layout.from_env()
    try:
        status: int = ns.func(layout, ns)
    except InfraError as err:
        log(f"VM infrastructure failure: {err}")
        return EXIT_INFRA
    except KeyboardInterrupt:
        log("interrupted")
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
