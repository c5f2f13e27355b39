"""``wsd guest``: the command line of the synthetic VMM."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .config import DEFAULT_SOCKET, GuestConfig, Pattern, Thp, parse_hot, parse_size

__all__ = ["add_parser", "config_from_args", "main"]

DESCRIPTION = """\
A synthetic VMM: creates guest RAM (a memfd mapped MAP_SHARED) and a raw
userfaultfd, hands both to a running wsd over its socket, then runs an access
workload on its own threads.  Every page holds a self-verifying pattern and
every access checks it: corruption exits with status 3 naming the page.
Exit status: 0 stopped cleanly, 2 bad options or setup, 3 corruption,
4 hand-off failed or refused.  See docs/guest.md."""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hot(text: str) -> Any:
    try:
        return parse_hot(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--socket", type=Path, default=DEFAULT_SOCKET, help="wsd's hand-off socket (%(default)s)"
    )
    ap.add_argument("--vm-id", help="the VM's name in wsd (default guest-<pid>)")
    ap.add_argument("--size", type=_size, default="256M", help="guest RAM, e.g. 256M, 1G")
    ap.add_argument("--hugetlb", action="store_true", help="back RAM with 2 MiB hugetlbfs pages")
    ap.add_argument("--threads", type=int, default=1, help="worker threads (vcpus)")
    ap.add_argument(
        "--hot",
        type=_hot,
        default="0.1",
        help="hot-set size: a fraction (0.1, 10%%) or bytes (25M) (default %(default)s)",
    )
    ap.add_argument(
        "--pattern",
        type=Pattern,
        choices=list(Pattern),
        default=Pattern.UNIFORM,
        help="uniform: every pass touches the whole hot set and nothing else; zipf: the whole"
        " guest, by popularity; phases: the hot set moves (default %(default)s)",
    )
    ap.add_argument("--zipf-s", type=float, default=0.99, help="zipf exponent (%(default)s)")
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument(
        "--phase-seconds", type=float, default=5.0, help="phases: seconds per phase (%(default)s)"
    )
    phase.add_argument(
        "--phase-passes",
        type=int,
        help="phases: move on once every thread made this many passes over the hot set",
    )
    ap.add_argument(
        "--write-ratio", type=float, default=0.3, help="share of accesses that write (%(default)s)"
    )
    ap.add_argument(
        "--duration", type=float, default=0.0, help="seconds to run; 0 = until SIGTERM/SIGINT"
    )
    ap.add_argument("--report", type=Path, help="write a JSON report here at exit")
    ap.add_argument(
        "--truth", type=Path, help="JSON lines: each phase's start time and exact hot pages"
    )
    ap.add_argument(
        "--no-handoff",
        dest="handoff",
        action="store_false",
        help="run without wsd (a baseline for benchmarks)",
    )
    ap.add_argument(
        "--reattach",
        action="store_true",
        help="when wsd closes the hand-off connection (it died), reconnect every second with"
        " a reattach message until a restarted wsd takes the session back",
    )
    ap.add_argument(
        "--user-mode-only",
        action="store_true",
        help="create the uffd with UFFD_USER_MODE_ONLY (kernel-originated faults then SIGBUS)",
    )
    ap.add_argument(
        "--dma-pinned",
        action="store_true",
        help="mark guest RAM dma_pinned in the hand-off, as a VMM with a passthrough device"
        " would: wsd tracks it but never evicts from it",
    )
    ap.add_argument(
        "--thp",
        type=Thp,
        choices=list(Thp),
        default=Thp.DEFAULT,
        help="madvise the mapping: never = MADV_NOHUGEPAGE, always = MADV_HUGEPAGE",
    )
    ap.add_argument(
        "--progress", type=Path, help="JSON lines, one per second: time, operations, writes"
    )
    ap.add_argument("--seed", type=int, help="RNG seed (default random; in the report)")
    ap.add_argument(
        "--ready-fd",
        type=int,
        help="write one JSON line (pid, base, fds, hand-off reply) to this fd once running",
    )


def config_from_args(args: argparse.Namespace) -> GuestConfig:
    return GuestConfig(
        vm_id=args.vm_id or f"guest-{os.getpid()}",
        size=args.size,
        hugetlb=args.hugetlb,
        threads=args.threads,
        hot=args.hot,
        pattern=args.pattern,
        zipf_s=args.zipf_s,
        phase_seconds=None if args.phase_passes else args.phase_seconds,
        phase_passes=args.phase_passes,
        write_ratio=args.write_ratio,
        duration=args.duration,
        socket=args.socket,
        handoff=args.handoff,
        user_mode_only=args.user_mode_only,
        dma_pinned=args.dma_pinned,
        reattach=args.reattach,
        thp=args.thp,
        seed=args.seed,
        report=args.report,
        truth=args.truth,
        progress=args.progress,
        ready_fd=args.ready_fd,
    )


def _run(args: argparse.Namespace) -> int:
    from .run import EXIT_SETUP, run  # noqa: PLC0415 (module docstring of wsd.cli)

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"wsd guest: {e}", file=sys.stderr)
        return EXIT_SETUP
    return run(config)


def add_parser(subparsers: Any) -> None:
    """Add ``guest`` to wsd's subcommands (``subparsers`` from ``add_subparsers``)."""
    ap = subparsers.add_parser(
        "guest",
        help="a synthetic VMM that hands its memory to wsd and runs a verified workload",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    ap.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> None:
    """``python -m wsd.guest``: the same options without wsd's other subcommands."""
    ap = argparse.ArgumentParser(
        prog="wsd guest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(ap)
    sys.exit(_run(ap.parse_args(argv)))
