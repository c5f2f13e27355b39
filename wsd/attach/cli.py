"""``wsd attach --pid PID``: its options; :mod:`.command` runs it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsd import config

__all__ = ["add_parser"]

DETACH_WAIT_SECONDS = 60.0


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
    p.add_argument(
        "--no-reattach",
        action="store_true",
        help="exit when wsd closes the session, instead of handing it to a restarted wsd",
    )
    p.add_argument(
        "--detach-wait",
        type=float,
        default=DETACH_WAIT_SECONDS,
        metavar="SECONDS",
        help="when stopped, wait this long for wsd to put every evicted page back, then "
        "close the userfaultfd it injected in QEMU (default: %(default)s; 0: leave it open)",
    )
    p.set_defaults(func=_attach)


def _attach(args: argparse.Namespace) -> int:
    from .command import attach_and_hold  # noqa: PLC0415 (module docstring of wsd.cli)

    return attach_and_hold(args)
