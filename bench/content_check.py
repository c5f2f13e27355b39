"""What the rwp commit's content check adds to a sync window, against the punch it precedes.

    .venv/bin/python bench/content_check.py [--rounds 15] [--pages 1024]

On 4 KiB shmem the commit re-reads every page it is about to punch and compares
it with the digest of its stored bytes (:func:`wsd.evictor.transaction.changed_since_read`).
Both the check and the punch run in the window on the event loop, chunk by
chunk (128 pages), so the ratio check / punch says how much longer the
window's punching gets.  Measured on a memfd of random pages, for a contiguous
batch and for a scattered one (every 4th page: one ``pread`` and one
``fallocate`` per page).  The punch is the raw syscall (``fallocate`` through
:func:`wsd.kernel.punch_hole`), without the ``UFFDIO_WAKE`` that follows it in
the daemon.  Best of ``--rounds`` per figure, in one run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from wsd.evictor.evictor import COMMIT_CHUNK
from wsd.evictor.transaction import changed_since_read, digests, read_pages, runs
from wsd.kernel import punch_hole
from wsd.vmm.protocol import Region

PAGE = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pages", type=int, default=1024)
    args = ap.parse_args()
    n = args.pages
    size = 4 * n * PAGE
    fd = os.memfd_create("content-check-bench")
    os.ftruncate(fd, size)
    region = Region(guest_phys_addr=0, host_virt_addr=1 << 30, size=size, fd_index=1)
    batches = {
        "contiguous": np.arange(n, dtype=np.int64),
        "every 4th page": np.arange(0, 4 * n, 4, dtype=np.int64),
    }
    print(f"{n} pages of 4 KiB in chunks of {COMMIT_CHUNK}, best of {args.rounds}")
    print(f"{'batch':<16}{'check µs/page':>15}{'punch µs/page':>15}{'check/punch':>13}")
    for name, pages in batches.items():
        check = punch = float("inf")
        for _ in range(args.rounds):
            os.pwrite(fd, os.urandom(size), 0)
            stored = digests(read_pages(fd, region, pages))
            scratch = bytearray()
            t = time.perf_counter()
            for k in range(0, n, COMMIT_CHUNK):
                changed = changed_since_read(
                    fd, region, pages[k : k + COMMIT_CHUNK], stored, scratch
                )
                assert not changed.any()
            check = min(check, time.perf_counter() - t)
            t = time.perf_counter()
            for k in range(0, n, COMMIT_CHUNK):
                for first, count in runs(pages[k : k + COMMIT_CHUNK]):
                    punch_hole(fd, first * PAGE, count * PAGE)
            punch = min(punch, time.perf_counter() - t)
        print(f"{name:<16}{check / n * 1e6:>15.2f}{punch / n * 1e6:>15.2f}{check / punch:>13.2f}")
    os.close(fd)


if __name__ == "__main__":
    main()
