"""The ``wsd`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from wsd import demo, kernel_info
from wsd.kernel import FeatureUnavailable, probe_kernel


def _kernel_info(args: argparse.Namespace) -> int:
    k = probe_kernel()
    if args.json:
        print(json.dumps(kernel_info.as_json(k), indent=2))
    else:
        print(kernel_info.as_text(k))
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(size_mib=args.size_mib, hot_percent=args.hot_percent)


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
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except FeatureUnavailable as e:
        print(f"wsd: {e}", file=sys.stderr)
        sys.exit(2)
