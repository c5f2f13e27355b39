"""The ``wsd`` command line.

Each command loads what it runs when it runs: the parser is built from light
modules only, so that ``wsd status`` and ``wsd vm`` (a socket and a few
pydantic models) do not pay for the daemon, numpy and the kernel layer.
``tests/unit/test_cmdline.py`` keeps it so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from wsd import config, demo, logs
from wsd.attach import cli as attach_cli
from wsd.control import cli as control_cli
from wsd.guest import cli as guest_cli
from wsd.tracker import TrackingMode


def _kernel_info(args: argparse.Namespace) -> int:
    from wsd import kernel_info  # noqa: PLC0415 (see the module docstring)
    from wsd.kernel import probe_kernel  # noqa: PLC0415

    k = probe_kernel()
    if args.json:
        print(json.dumps(kernel_info.as_json(k), indent=2))
    else:
        print(kernel_info.as_text(k))
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(
        demo.DemoOptions(
            seconds=args.seconds,
            size=args.size,
            hot=args.hot,
            phase_seconds=args.phase_seconds,
            interval=args.interval,
            threads=args.threads,
        )
    )


def _run(args: argparse.Namespace) -> int:
    from wsd import daemon  # noqa: PLC0415 (see the module docstring)

    try:
        cfg = config.load(args.config) if args.config else config.WsdConfig()
    except config.ConfigError as e:
        print(f"wsd: {e}", file=sys.stderr)
        return 2
    logs.configure(cfg.daemon.log_format, cfg.daemon.log_level)
    overrides: dict[str, object] = {}
    if args.socket is not None:
        overrides["socket"] = args.socket
    if args.control_socket is not None:
        overrides["control_socket"] = args.control_socket
    if args.config:
        overrides["config_path"] = args.config
    if args.interval is not None:
        overrides["interval"] = args.interval
    if args.mode:
        overrides["mode"] = TrackingMode(args.mode)

    def settings_from(cfg: config.WsdConfig) -> daemon.Settings:
        return dataclasses.replace(daemon.Settings.from_config(cfg), **overrides)  # type: ignore[arg-type]

    def reload() -> daemon.Settings:
        new = config.load(args.config)
        logs.configure(new.daemon.log_format, new.daemon.log_level)
        return settings_from(new)

    return daemon.run(settings_from(cfg), reload if args.config else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wsd", description="Working-set tracking daemon for VMMs")
    sub = ap.add_subparsers(dest="command", required=True)
    ki = sub.add_parser("kernel-info", help="report kernel support and the tracking mode")
    ki.add_argument("--json", action="store_true", help="machine-readable output")
    ki.set_defaults(func=_kernel_info)
    de = sub.add_parser(
        "demo", help="run wsd and a synthetic guest for half a minute, with a live view"
    )
    dd = demo.DemoOptions()
    de.add_argument("--seconds", type=float, default=dd.seconds, help="%(default)s")
    de.add_argument("--size", default=dd.size, help="guest memory (%(default)s)")
    de.add_argument("--hot", default=dd.hot, help="hot-set size (%(default)s)")
    de.add_argument(
        "--phase-seconds", type=float, default=dd.phase_seconds, help="hot set moves (%(default)s)"
    )
    de.add_argument("--interval", type=float, default=dd.interval, help="tracking (%(default)s)")
    de.add_argument("--threads", type=int, default=dd.threads, help="guest threads (%(default)s)")
    de.set_defaults(func=_demo)
    ru = sub.add_parser("run", help="run the daemon in the foreground")
    ru.add_argument("--config", type=Path, help="the TOML configuration (see config.example.toml)")
    ru.add_argument("--socket", type=Path, help="hand-off socket (overrides daemon.socket)")
    ru.add_argument(
        "--control-socket",
        type=Path,
        help="control socket for wsd status and wsd vm (overrides daemon.control_socket)",
    )
    ru.add_argument(
        "--interval",
        type=float,
        help="tracking interval in seconds (overrides daemon.interval_seconds)",
    )
    ru.add_argument(
        "--mode",
        choices=[m.value for m in TrackingMode],
        help="force a tracking mode (default: the best this kernel supports)",
    )
    ru.set_defaults(func=_run)
    guest_cli.add_parser(sub)
    attach_cli.add_parser(sub)
    control_cli.add_parsers(sub)
    return ap


def _feature_unavailable(e: Exception) -> bool:
    """Whether ``e`` is the kernel layer's FeatureUnavailable.  Only a command
    that loaded that layer can raise it, so it is not loaded to find out."""
    errors = sys.modules.get("wsd.kernel.errors")
    return errors is not None and isinstance(e, errors.FeatureUnavailable)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except Exception as e:
        if not _feature_unavailable(e):
            raise
        print(f"wsd: {e}", file=sys.stderr)
        sys.exit(2)
