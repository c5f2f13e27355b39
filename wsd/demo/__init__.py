"""``wsd demo``: the daemon and a synthetic guest, live, in one command.

wsd runs in this process, as ``wsd run`` would (uvloop, one root TaskGroup),
with a file tier in a temporary directory, metrics on a free local port and a
control socket.  ``wsd guest`` runs beside it as the VMM: self-checking pages,
a hot set that moves every few seconds.  One line per second shows what wsd
sees and does; at the end the guest stops, re-reads and checks every page,
and the summary says whether any byte was lost.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DemoOptions", "run"]


@dataclass(frozen=True)
class DemoOptions:
    seconds: float = 30.0
    size: str = "256M"
    hot: str = "10%"
    phase_seconds: float = 10.0
    interval: float = 0.5
    threads: int = 2


def run(opts: DemoOptions) -> int:
    """Run the demo; returns its exit status."""
    # Imported here, not above: the command line builds its parser from
    # DemoOptions, and every other command would load the daemon with it.
    from .live import run as run_live  # noqa: PLC0415

    return run_live(opts)
