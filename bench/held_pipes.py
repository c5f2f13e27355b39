"""What parking a verified punch's pipes costs: one 128-page chunk held, read and released.

    .venv/bin/python bench/held_pipes.py [--rounds 7] [--chunks 2000]

wp-async eviction holds each chunk of pages in pipes across its punch
(:class:`wsd.kernel.HeldPages`).  ``fresh`` creates the pipes for each chunk and
reads them empty, as wsd does without an fd store.  ``parked`` takes them from a
session's pool parked once in the fd store (here the test supervisor's), writes the
label first, reads through ``tee(2)`` and empties them afterwards, as wsd does under
systemd (:mod:`wsd.evictor.held`).  Rounds alternate; the median per chunk is
reported, and the ratio.  No punch: it measures the pipes only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from wsd.evictor import held
from wsd.kernel import HeldPages, memfd_create
from wsd.testing.supervisor import Supervisor

PAGE = 4096
PAGES = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunks", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervisor([], Path(tmp))
        os.environ["NOTIFY_SOCKET"] = str(sup.notify_path)
        fd = memfd_create("held-pipes", size=PAGES * PAGE)
        os.pwrite(fd, os.urandom(PAGES * PAGE), 0)
        label = held.label(0, PAGE, np.arange(PAGES, dtype=np.int64))
        buf = bytearray(PAGES * PAGE)
        parking = held.Parking("bench")

        def fresh() -> None:
            with HeldPages(fd, [(0, len(buf))], PAGE) as h:
                h.read_into(buf)

        def parked() -> None:
            with HeldPages(fd, [(0, len(buf))], PAGE, label=label, pool=parking.pool) as h:
                parking.park()
                h.read_into(buf)
            h.release()

        times: dict[str, list[float]] = {"fresh": [], "parked": []}
        try:
            for _ in range(args.rounds):
                for name, run in (("fresh", fresh), ("parked", parked)):
                    t = time.perf_counter()
                    for _ in range(args.chunks):
                        run()
                    times[name].append((time.perf_counter() - t) / args.chunks * 1e6)
        finally:
            parking.close()
            os.close(fd)
            sup.close()
    for name, values in times.items():
        print(f"{name:7s} µs per {PAGES}-page chunk: median {statistics.median(values):.1f}")
    ratio = statistics.median(times["parked"]) / statistics.median(times["fresh"])
    print(f"parked / fresh: {ratio:.2f}")


if __name__ == "__main__":
    main()
