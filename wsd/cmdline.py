"""What the clients of wsd's sockets share on the command line.

``wsd attach`` (the hand-off socket) and ``wsd status`` / ``wsd vm ...`` (the
control socket) find their socket the same way (``--socket``, else the one
``--config`` names, else the default) and turn a failure into one
``prefix: message`` line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from wsd import config

__all__ = ["Exit", "Failures", "attempt", "socket_path"]

T = TypeVar("T")

Failures = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]]
"""Exceptions a command reports, each with its exit status; the first match wins."""


@dataclass(frozen=True)
class Exit:
    """A command that failed and already said why: exit with ``code``."""

    code: int


def socket_path(args: argparse.Namespace, key: Literal["socket", "control_socket"]) -> Path:
    """``--socket``, else ``daemon.<key>`` of ``--config``, else its default."""
    if args.socket is not None:
        return Path(args.socket)
    daemon = config.load(args.config).daemon if args.config is not None else config.DaemonSection()
    path: Path = getattr(daemon, key)
    return path


def attempt(prefix: str, call: Callable[[], T], failures: Failures) -> T | Exit:
    """``call()``, or the exit status of the first of ``failures`` it raised, printed.

    A bad configuration file (``ConfigError``) is always exit status 2.
    """
    try:
        return call()
    except BaseException as e:
        for kinds, code in ((config.ConfigError, 2), *failures):
            if isinstance(e, kinds):
                print(f"{prefix}: {e}", file=sys.stderr)
                return Exit(code)
        raise
