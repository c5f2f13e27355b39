"""The ``wsd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsd import daemon, demo, kernel_info
from wsd.guest import cli as guest_cli
from wsd.kernel import FeatureUnavailable, probe_kernel
from wsd.tracker.mode import TrackingMode


def _kernel_info(args: argparse.Namespace) -> int:
    k = probe_kernel()
    if args.json:
        print(json.dumps(kernel_info.as_json(k), indent=2))
    else:
        print(kernel_info.as_text(k))
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(size_mib=args.size_mib, hot_percent=args.hot_percent)


def _run(args: argparse.Namespace) -> int:
    settings = daemon.Settings(
        socket=args.socket,
        interval=args.interval,
        mode=TrackingMode(args.mode) if args.mode else None,
    )
    return daemon.run(settings)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wsd", description="Working-set tracking daemon for VMMs")
    sub = ap.add_subparsers(dest="command", required=True)
    ki = sub.add_parser("kernel-info", help="report kernel support and the tracking mode")
    ki.add_argument("--json", action="store_true", help="machine-readable output")
    ki.set_defaults(func=_kernel_info)
    de = sub.add_parser("demo", help="hand a puppet guest to wsd.kernel: arm, scan, evict, fetch")
    de.add_argument("--size-mib", type=int, default=64)
    de.add_argument("--hot-percent", type=float, default=10.0)
    de.set_defaults(func=_demo)
    ru = sub.add_parser("run", help="run the daemon in the foreground")
    ru.add_argument(
        "--socket",
        type=Path,
        default=daemon.Settings.socket,
        help="hand-off socket (default %(default)s)",
    )
    ru.add_argument(
        "--interval",
        type=float,
        default=daemon.Settings.interval,
        help="tracking interval in seconds (default %(default)s)",
    )
    ru.add_argument(
        "--mode",
        choices=[m.value for m in TrackingMode],
        help="force a tracking mode (default: the best this kernel supports)",
    )
    ru.set_defaults(func=_run)
    guest_cli.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except FeatureUnavailable as e:
        print(f"wsd: {e}", file=sys.stderr)
        sys.exit(2)
