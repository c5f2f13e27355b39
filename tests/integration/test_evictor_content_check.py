"""The commit's content check on a real memfd: which prepared pages changed since their read.

In rwp mode on shmem the scan can miss a write (an unmap of the PTE erases
its RWP state), so the commit compares each page with the digest of its
stored bytes before punching it.  The kernel side runs in the 7.3 VM
(tests/kernel/test_evictor_rwp.py); this pins the comparison itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from wsd.evictor.transaction import changed_since_read, digests, read_pages
from wsd.kernel import punch_hole
from wsd.vmm.protocol import Region

pytestmark = pytest.mark.integration
PS = 4096
# The region starts 4 pages into the memfd: offsets are region-relative.
REGION = Region(guest_phys_addr=0, host_virt_addr=1 << 30, size=16 * PS, fd_index=1, offset=4 * PS)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("content-check")
    try:
        os.ftruncate(fd, 20 * PS)
        os.pwrite(fd, os.urandom(20 * PS), 0)
        os.pwrite(fd, bytes(PS), REGION.offset + 12 * PS)  # page 12 holds zeros
        yield fd
    finally:
        os.close(fd)


def flip(fd: int, offset: int) -> None:
    """Change the byte at ``offset``: writing a fixed byte over random data left
    the page as it was once in 256 runs (ci64)."""
    os.pwrite(fd, bytes((os.pread(fd, 1, offset)[0] ^ 0xFF,)), offset)


def test_written_and_punched_pages_count_as_changed_the_rest_not(memfd: int) -> None:
    pages = np.array([1, 2, 3, 7, 9, 12, 15], dtype=np.int64)
    stored = digests(read_pages(memfd, REGION, pages))
    flip(memfd, REGION.offset + 2 * PS + 100)  # one byte of page 2
    punch_hole(memfd, REGION.offset + 9 * PS, PS)  # a hole reads as zeros
    punch_hole(memfd, REGION.offset + 12 * PS, PS)  # zeros before, zeros now
    os.pwrite(memfd, b"\1", REGION.offset + 5 * PS)  # not a candidate
    scratch = bytearray()
    changed = changed_since_read(memfd, REGION, pages, stored, scratch)
    assert pages[changed].tolist() == [2, 9]
    assert len(scratch) == len(pages) * PS  # every page read, one after another


def test_unchanged_pages_pass_with_a_scratch_buffer_reused(memfd: int) -> None:
    pages = np.arange(16, dtype=np.int64)
    stored = digests(read_pages(memfd, REGION, pages))
    scratch = bytearray(64 * PS)
    assert not changed_since_read(memfd, REGION, pages, stored, scratch).any()
    assert len(scratch) == 64 * PS


def test_a_short_run_before_a_long_one_grows_the_scratch_buffer_once(memfd: int) -> None:
    # The first daemon run hit this: growing a buffer that a view still exported.
    pages = np.array([0, 2, 3, 4, 5, 6, 9, 10], dtype=np.int64)
    stored = digests(read_pages(memfd, REGION, pages))
    scratch = bytearray()
    for _ in range(2):
        assert not changed_since_read(memfd, REGION, pages, stored, scratch).any()
    assert len(scratch) == len(pages) * PS
