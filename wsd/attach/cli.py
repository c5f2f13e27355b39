"""``wsd attach --pid PID``: the command line around :func:`wsd.attach.adopt.attach`."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

from wsd import config
from wsd.vmm.client import HandoffRefused

from .adopt import attach
from .discover import NotAttachable

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "attach",
        help="adopt a running QEMU with memfd-backed RAM (ptrace; root)",
        description=(
            "Adopt the guest RAM of a running, unmodified QEMU started with "
            "-object memory-backend-memfd,id=mem,size=SIZE,share=on -machine memory-backend=mem. "
            "Creates a userfaultfd inside QEMU with ptrace, hands it and the memfds to the "
            "running wsd, and stays in the foreground: the session lasts until QEMU exits or "
            "this command is stopped (then wsd puts every evicted page back)."
        ),
    )
    p.add_argument("--pid", type=int, required=True, help="QEMU's pid")
    p.add_argument("--vm-id", help="the VM's name in wsd (default: qemu-PID)")
    p.add_argument(
        "--socket",
        type=Path,
        help=f"wsd's hand-off socket (default: daemon.socket, {config.DaemonSection().socket})",
    )
    p.add_argument("--config", type=Path, help="take the socket from this wsd config file")
    p.add_argument(
        "--memfd-name",
        help="adopt only memfds of this name (default: every shared memfd mapping; QEMU "
        "names them memory-backend-memfd)",
    )
    p.set_defaults(func=_attach)


def _socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        return config.load(args.config).daemon.socket
    return config.DaemonSection().socket


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _attach(args: argparse.Namespace) -> int:
    vm_id = args.vm_id or f"qemu-{args.pid}"
    try:
        path = _socket(args)
        done = attach(args.pid, path, vm_id, memfd_name=args.memfd_name)
    except config.ConfigError as e:
        print(f"wsd attach: {e}", file=sys.stderr)
        return 2
    except NotAttachable as e:
        print(f"wsd attach: {e}", file=sys.stderr)
        return 1
    except HandoffRefused as e:
        print(f"wsd attach: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError) as e:
        print(f"wsd attach: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsd attach: interrupted", file=sys.stderr)
        return 130
    ram = done.ram
    banner = (
        f"{vm_id}: wsd tracks {ram.size / (1 << 20):.1f} MiB of pid {args.pid} ({done.name}) in "
        f"{len(ram.regions)} region(s), mode {done.reply.get('mode')}; userfaultfd is fd "
        f"{done.uffd_in_vmm} in the VMM"
    )
    return _hold(args.pid, done.conn, vm_id, banner)


def _hold(pid: int, conn: Any, vm_id: str, banner: str) -> int:
    """Keep the session's connection open until the VMM exits, wsd hangs up, or we are stopped."""
    try:
        signal.signal(signal.SIGTERM, _raise_exit)
        pidfd = os.pidfd_open(pid)
    except BaseException:
        conn.close()
        raise
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    try:
        # Printed once ^C and SIGTERM end the session cleanly.
        print(banner, flush=True)
        while True:
            for fd, _ in poller.poll():
                if fd == pidfd:
                    print(f"{vm_id}: pid {pid} exited; session over", flush=True)
                    return 0
                if not conn.recv(4096):
                    print(f"wsd attach: wsd closed the session of {vm_id}", file=sys.stderr)
                    return 1
    except (KeyboardInterrupt, SystemExit) as e:
        print(f"{vm_id}: detached; wsd puts the evicted pages back", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    finally:
        os.close(pidfd)
        conn.close()
