"""Eviction throughput of wsd's transaction against a bare C loop over the same pages.

    .venv/bin/python bench/evict_throughput.py [--size 256M] [--batch 1024] [--rounds 3]

Each run gets a fresh guest: ``bench/fault_c.c`` in ``guest`` mode (compiled with gcc
into a temporary directory at run time), a C process holding a ``MAP_SHARED`` memfd
mapping and a raw userfaultfd, which it hands over.  The memfd is filled with ``pwrite``
(alternately text-like and random 4 KiB pages, no zero pages, the same data every run),
and then all of it is evicted in batches of ``--batch`` pages, ascending.  Only the
eviction is timed.  Runs are interleaved: raw, wsd-file, wsd-zstd, raw, ...

* ``raw``: ``fault_c evict`` on the memfd and the uffd (negotiated and registered for
  MISSING by this script beforehand, as wsd would have): per batch, one ``pread`` of the
  batch from the memfd, one ``pwrite`` to a file in ``--dir`` (the filesystem the file
  tier uses), ``fdatasync`` of that file, ``fallocate(PUNCH_HOLE)`` of the batch in the
  memfd and one ``UFFDIO_WAKE`` of its range.  Timed by itself with
  ``CLOCK_MONOTONIC``.
* ``wsd-file``, ``wsd-zstd``: a :class:`~wsd.tracker.session.VmTracker` on the guest
  (``wp-async`` on a host without RWP), one tracking cycle, then the daemon's own path,
  on uvloop, as for ``wsd vm evict``: ``Evictor.prepare_idle`` stores every page in
  batches of ``--batch``, ``--batches-in-flight`` of them at once (the evictor's default
  unless given; each a ``pread`` in a worker, ``put``, ``sync``: for the file tier the
  ``fdatasync``\\ s of its data and index files); then one tracking cycle with
  ``Evictor.commit`` as its window hook punches and wakes them.  No page map
  (``state_dir`` unset).  Timed with ``time.monotonic`` around both.  Until 2026-11-28
  these runs called ``Evictor.evict_batch`` per batch instead (prepare and commit each
  batch, one at a time), which tests use but the daemon does not.

* ``wsd-file-unchecked``, ``wsd-zstd-unchecked`` (rwp only, not run by default): the
  same without the commit's content check (:func:`wsd.evictor.evictor.content_checked`
  patched to false), to show what the check costs.  wsd never runs that way.

MB/s is 10^6 bytes of guest pages per second.  The issue's goal: wsd >= 50% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_latency import (  # a sibling script, not a package
    PAGE,
    CGuest,
    add_batches_in_flight,
    build_c,
    fill,
    log,
    open_tier,
    start_tracker,
)

from wsd.collector import freeze_startup_objects
from wsd.evictor import evictor as evictor_module
from wsd.evictor.context import VmContext
from wsd.evictor.evictor import Evictor
from wsd.kernel import Feature, RegisterMode, Userfaultfd, data_ranges, probe_kernel
from wsd.priority import raise_fault_service
from wsd.tracker.mode import TrackingMode, choose_mode

GOAL_RATIO = 0.5
KINDS = ("raw", "wsd-file", "wsd-zstd")
UNCHECKED = ("wsd-file-unchecked", "wsd-zstd-unchecked")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def resident(memfd: int, size: int) -> int:
    return sum(end - start for start, end in data_ranges(memfd, 0, size))


def run_raw(exe: Path, size: int, batch: int, where: Path) -> float:
    g = CGuest(exe, size, None)
    out = where / "raw-evict.data"
    try:
        fill(g.memfd, 0, g.npages)
        with Userfaultfd(os.dup(g.uffd)) as uffd:
            uffd.api(Feature.MISSING_SHMEM)
            uffd.register(g.base, g.size, RegisterMode.MISSING)
            argv = [str(exe), "evict", str(g.memfd), str(uffd.fd), hex(g.base)]
            argv += [str(g.npages), str(batch), str(out)]
            done = subprocess.run(
                argv, check=True, stdout=subprocess.PIPE, pass_fds=[g.memfd, uffd.fd]
            )
        if resident(g.memfd, size):
            raise RuntimeError("raw eviction left pages resident")
        seconds = float(json.loads(done.stdout)["seconds"])
    finally:
        g.close()
        out.unlink(missing_ok=True)
    return seconds


async def run_wsd(
    exe: Path, tier: str, size: int, batch: int, where: Path, *, in_flight: int
) -> float:
    g = CGuest(exe, size, None)
    root = Path(tempfile.mkdtemp(prefix="evict-throughput-", dir=where))
    tracker = None
    store = None
    try:
        fill(g.memfd, 0, g.npages)
        tracker = start_tracker(g, f"bench-{tier}")
        store, cfg = await open_tier(tier, root / "pages", 2 * size)
        cfg = cfg.model_copy(
            update={
                "batch_pages": batch,
                "batches_in_flight": in_flight,
                "max_pages_per_window": g.npages,
            }
        )
        ctx = VmContext(tracker.vm_id, tracker, store, cfg)
        await tracker.cycle()
        ev = Evictor(ctx)
        t0 = time.monotonic()
        # The daemon's path, as for `wsd vm evict`: store every idle page, then
        # punch them in the next window.
        await ev.prepare_idle()
        await tracker.cycle(ev.commit)
        seconds = time.monotonic() - t0
        if ctx.stats.evicted_pages != g.npages or resident(g.memfd, size):
            raise RuntimeError(f"wsd evicted {ctx.stats.evicted_pages} of {g.npages} pages")
    finally:
        if tracker is not None:
            tracker.close()
        if store is not None:
            await store.close()
        g.close()
        shutil.rmtree(root, ignore_errors=True)
    return seconds


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size
    # As in Daemon.run: the loop thread real-time (else at nice -10) where
    # allowed, so eviction's background threads run at 0, the raw loop's
    # priority; what exists at startup frozen out of the garbage collector's
    # full collections.
    priority = raise_fault_service()
    freeze_startup_objects()
    mode = choose_mode(probe_kernel()).mode
    if mode is not TrackingMode.RWP and set(args.kinds) & set(UNCHECKED):
        raise SystemExit(f"the unchecked kinds need rwp; this kernel tracks in {mode}")
    log(
        f"kernel {os.uname().release}, tracking mode {mode}, {size >> 20} MiB, "
        f"batch {args.batch}, {args.batches_in_flight} in flight, wsd's loop at {priority}"
    )
    runs: dict[str, list[float]] = {k: [] for k in args.kinds}
    with tempfile.TemporaryDirectory(prefix="evict-throughput-build-") as tmp:
        exe = build_c(Path(tmp))
        for r in range(args.rounds):
            for kind in args.kinds:
                if kind == "raw":
                    s = await asyncio.to_thread(run_raw, exe, size, args.batch, args.dir)
                else:
                    tier = kind.removeprefix("wsd-").removesuffix("-unchecked")
                    check = (
                        mock.patch.object(evictor_module, "content_checked", lambda mode, t: False)
                        if kind in UNCHECKED
                        else contextlib.nullcontext()
                    )
                    with check:
                        s = await run_wsd(
                            exe,
                            tier,
                            size,
                            args.batch,
                            args.dir,
                            in_flight=args.batches_in_flight,
                        )
                mbs = size / s / 1e6
                runs[kind].append(mbs)
                log(f"round {r + 1}/{args.rounds} {kind:18} {s * 1000:8.1f} ms  {mbs:8.1f} MB/s")
    rows: dict[str, Any] = {}
    for kind, values in runs.items():
        rows[kind] = {"mb_s": values, "median_mb_s": float(np.median(values))}
        if "raw" in runs and kind != "raw":
            ratios = [w / b for w, b in zip(values, runs["raw"], strict=True)]
            rows[kind]["ratio_per_round"] = ratios
            rows[kind]["ratio_median"] = float(np.median(ratios))
    return {
        "kernel": os.uname().release,
        "mode": str(mode),
        "size": size,
        "batch": args.batch,
        "batches_in_flight": args.batches_in_flight,
        "dir": str(args.dir),
        "rows": rows,
    }


def print_table(out: dict[str, Any]) -> None:
    print(
        f"kernel {out['kernel']}, mode {out['mode']}, {out['size'] >> 20} MiB, "
        f"batch {out['batch']} pages, {out['batches_in_flight']} in flight, dir {out['dir']}"
    )
    print(f"{'kind':18} {'median MB/s':>11}  {'ratio':>5}  per round MB/s (ratio to raw)")
    for kind, row in out["rows"].items():
        ratios = row.get("ratio_per_round")
        per = " ".join(
            f"{v:.0f}" + (f" ({ratios[i]:.2f})" if ratios else "")
            for i, v in enumerate(row["mb_s"])
        )
        ratio = f"{row['ratio_median']:5.2f}" if "ratio_median" in row else "    -"
        print(f"{kind:18} {row['median_mb_s']:11.0f}  {ratio}  {per}")
    for kind, row in out["rows"].items():
        if "ratio_median" in row:
            met = "met" if row["ratio_median"] >= GOAL_RATIO else "NOT met"
            print(f"goal {kind} >= 50% of raw: median ratio {row['ratio_median']:.2f}, {met}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (and docs/benchmarks.md) for what is measured.",
    )
    p.add_argument("--size", type=parse_size, default=256 << 20, help="guest size (256M)")
    p.add_argument("--batch", type=int, default=1024, help="pages per batch (1024)")
    add_batches_in_flight(p)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each kind, interleaved")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="filesystem for the file tier and the raw loop's file",
    )
    p.add_argument("--quick", action="store_true", help="64 MiB, 1 round")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args()
    if args.quick:
        args.size, args.rounds = 64 << 20, 1
    if args.size % (PAGE * 1) or args.size <= 0:
        raise SystemExit("--size must be a positive multiple of 4 KiB")
    args.kinds = args.kinds.split(",")
    for k in args.kinds:
        if k not in KINDS + UNCHECKED:
            raise SystemExit(f"unknown kind {k!r}: {', '.join(KINDS + UNCHECKED)}")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(main_async(args))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
