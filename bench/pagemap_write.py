"""What listing one eviction batch in the page map costs, by guest size.

    .venv/bin/python bench/pagemap_write.py [--sizes 1G,4G,16G] [--batch 1024] [--rounds 5]

Before its pages are punched, a batch must be listed durably in the page map
(``Evictor.save_map(force=True)``). For a guest of each size, half of it evicted,
this times in one run:

* **journal**: what wsd does per batch: a journal append of the batch and its
  fdatasync (``Evictor._journal_prepared``), to a journal that exists (its
  creation after a snapshot adds one fsync of the directory);
* **raw**: the same bytes written with ``os.write`` and fdatasynced, on the same
  filesystem, by this process (the baseline);
* **snapshot**: a whole new snapshot (``Evictor._compact``), which wsd writes
  once per a quarter as many journal records as the snapshot lists pages (at
  least ``COMPACT_MIN_RECORDS``), and which every batch wrote before the
  journal: its part on the event loop (``_map_with_prepared``, O(guest pages))
  and in all;
* **restart read**: ``pagemap.load`` of the snapshot alone (a restart's read
  before the journal) and ``pagemap.load_vm`` with the longest journal the
  threshold allows (**+journal**): a quarter as many records as the snapshot
  lists pages, at least ``COMPACT_MIN_RECORDS``.

The guest is a puppet process with a sparse memfd (nothing is populated or
punched: the evictor's page states are set directly). Best of ``--rounds`` each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

from wsd.evictor import EvictorConfig, pagemap
from wsd.evictor.context import VmContext
from wsd.evictor.evictor import COMPACT_MIN_RECORDS, COMPACT_SNAPSHOT_FRACTION, Evictor, Prepared
from wsd.testing.arming import track_puppet
from wsd.testing.puppet_vmm import PuppetVMM

PAGE = 4096


def parse_size(text: str) -> int:
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def best(samples: list[float]) -> float:
    return min(samples) * 1e3


async def measure(size: int, batch: int, rounds: int, root: Path) -> dict[str, float]:
    with PuppetVMM.spawn(size, fill=False) as puppet:
        tracker = track_puppet(puppet, vm_id="bench")
        try:
            t = tracker.regions[0]
            npages = size // PAGE
            t.state.note_evicted(np.arange(0, npages, 2, dtype=np.int64))
            state_dir = root / f"state-{size}"
            ctx = VmContext("bench", tracker, None, EvictorConfig())
            ev = Evictor(ctx, state_dir=state_dir)
            await ev.save_map(force=True)  # the first snapshot
            pages = np.arange(1, 2 * batch, 2, dtype=np.int64)  # resident ones
            gens = t.state.generations[pages].copy()
            ev._prepared = [Prepared(0, pages, None, gens)]
            journal, raw, snapshot, on_loop = [], [], [], []
            raw_path = state_dir / "raw"
            payload = os.urandom(batch * pagemap.JOURNAL_RECORD.itemsize)
            fd = os.open(raw_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                await ev._journal_prepared()  # creates the journal: its directory's fsync
                for _ in range(rounds):
                    start = time.perf_counter()
                    await ev._journal_prepared()
                    journal.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    os.write(fd, payload)
                    os.fdatasync(fd)
                    raw.append(time.perf_counter() - start)
            finally:
                os.close(fd)
            for _ in range(rounds):
                start = time.perf_counter()
                ev._map_with_prepared()
                on_loop.append(time.perf_counter() - start)
                start = time.perf_counter()
                await ev._compact(force=True)
                snapshot.append(time.perf_counter() - start)
            # A restart's read of the map: the snapshot alone (what it read
            # before the journal), and with the longest journal the
            # threshold allows.
            snapshot_now = pagemap.load(pagemap.path_for(state_dir, "bench"))
            listed = len(snapshot_now.regions[0].pages)
            longest = max(COMPACT_MIN_RECORDS, listed // COMPACT_SNAPSHOT_FRACTION)
            again = snapshot_now.regions[0].pages[:longest]  # listed pages evicted again
            tail = pagemap.journal_records(
                pagemap.JournalOp.LISTED, 0, again, np.full(len(again), 9, dtype=np.uint32)
            )
            pagemap.append_journal(state_dir, "bench", snapshot_now.journal, tail, durable=False)
            load_snapshot, load_all = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                pagemap.load(pagemap.path_for(state_dir, "bench"))
                load_snapshot.append(time.perf_counter() - start)
                start = time.perf_counter()
                replayed = pagemap.load_vm(state_dir, "bench")
                load_all.append(time.perf_counter() - start)
                assert replayed is not None and (replayed.regions[0].generations == 9).sum() == len(
                    again
                )
            return {
                "load_snapshot_ms": best(load_snapshot),
                "load_journal_ms": best(load_all),
                "journal_ms": best(journal),
                "raw_ms": best(raw),
                "snapshot_ms": best(snapshot),
                "snapshot_loop_ms": best(on_loop),
                "snapshot_mb": pagemap.path_for(state_dir, "bench").stat().st_size / 1e6,
            }
        finally:
            tracker.close()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="wsd-pagemap-", dir=args.dir) as tmp:
        print(
            f"{'guest':>6} {'journal ms':>11} {'raw ms':>8} {'journal/raw':>12} "
            f"{'snapshot ms':>12} {'on loop ms':>11} {'snapshot MB':>12} {'snapshot/journal':>17} "
            f"{'restart read ms':>16} {'+journal':>9}"
        )
        for text in args.sizes.split(","):
            r = await measure(parse_size(text), args.batch, args.rounds, Path(tmp))
            print(
                f"{text:>6} {r['journal_ms']:11.2f} {r['raw_ms']:8.2f} "
                f"{r['journal_ms'] / r['raw_ms']:12.2f} {r['snapshot_ms']:12.1f} "
                f"{r['snapshot_loop_ms']:11.1f} {r['snapshot_mb']:12.1f} "
                f"{r['snapshot_ms'] / r['journal_ms']:17.0f} "
                f"{r['load_snapshot_ms']:16.1f} {r['load_journal_ms']:9.1f}"
            )
        print(
            f"half of each guest evicted; batches of {args.batch} pages; best of {args.rounds}; "
            f"files in {args.dir or tempfile.gettempdir()}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", default="1G,4G,16G")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the state files go (default: $TMPDIR)")
    uvloop.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
