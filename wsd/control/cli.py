"""``wsd status`` and ``wsd vm pause|resume|evict``: the operator's commands.

Exit status: 0 done, 1 wsd refused the request (the message says why), 2 no
wsd answers on the control socket (or a bad argument).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

from wsd.cmdline import Exit, Failures, attempt, socket_path

from .client import ControlUnreachable, request
from .protocol import Command, ControlError, Request
from .render import format_bytes, format_status

__all__ = ["add_parsers"]

DEFAULT_TIMEOUT = 10.0
# An eviction answers once the next cycle committed it: up to two intervals
# plus the time to store the pages.
DEFAULT_EVICT_TIMEOUT = 120.0


def _size(text: str) -> int:
    try:
        n = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or with a unit: 64MiB, 1GB)"
        ) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be above 0")
    return n


_FAILURES: Failures = ((ControlUnreachable, 2), (ControlError, 1))


def _call(args: argparse.Namespace, req: Request, timeout: float) -> dict[str, Any] | int:
    """The result, or the exit status after printing why there is none."""
    result = attempt(
        "wsd",
        lambda: request(socket_path(args, "control_socket"), req, timeout=args.timeout or timeout),
        _FAILURES,
    )
    return result.code if isinstance(result, Exit) else result


def _status(args: argparse.Namespace) -> int:
    result = _call(args, Request(Command.STATUS), DEFAULT_TIMEOUT)
    if isinstance(result, int):
        return result
    print(json.dumps(result, indent=2) if args.json else format_status(result))
    return 0


def _vm(args: argparse.Namespace) -> int:
    command = Command(args.vm_command)
    max_bytes = getattr(args, "bytes", None)
    timeout = DEFAULT_EVICT_TIMEOUT if command is Command.EVICT else DEFAULT_TIMEOUT
    result = _call(args, Request(command, args.vm_id, max_bytes), timeout)
    if isinstance(result, int):
        return result
    if args.json:
        print(json.dumps(result, indent=2))
    elif command is Command.EVICT:
        print(
            f"{result['vm_id']}: evicted {format_bytes(result['evicted_bytes'])} "
            f"({result['evicted_pages']} pages) of {format_bytes(result['prepared_bytes'])} "
            f"idle in the last interval; {result['skipped_touched_pages']} pages "
            "touched meanwhile stayed"
        )
    else:
        state = "paused" if result["paused"] else "resumed"
        again = "" if result["changed"] else f" (it was already {state})"
        print(f"{result['vm_id']}: eviction {state}{again}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        type=Path,
        help="the control socket (default: daemon.control_socket, /run/wsd/control.sock)",
    )
    where.add_argument(
        "--config", type=Path, help="read the control socket's path from this config file"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, help="seconds to wait for wsd's answer")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="what the running daemon tracks: every VM, the store")
    _common(st)
    st.set_defaults(func=_status)
    vm = sub.add_parser("vm", help="control one VM's eviction: pause, resume, evict")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    for name, text in (
        (Command.PAUSE, "stop evicting this VM's pages (tracking goes on)"),
        (Command.RESUME, "evict this VM's pages again"),
        (
            Command.EVICT,
            "evict now the pages idle in the last interval; answers once committed",
        ),
    ):
        p = vm_sub.add_parser(str(name), help=text)
        p.add_argument("vm_id", help="the VM's id, as its VMM handed it off")
        if name is Command.EVICT:
            p.add_argument("--bytes", type=_size, help="evict at most this much (64MiB, 1GB)")
        _common(p)
        p.set_defaults(func=_vm)
