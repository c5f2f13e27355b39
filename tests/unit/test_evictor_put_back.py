"""A raced page's put-back when the VMM's mapping cannot take it: the memfd does."""

from __future__ import annotations

import errno
import os
from typing import cast

import pytest
from typing_extensions import Buffer

from wsd.evictor.transaction import place
from wsd.kernel import Userfaultfd, memfd_create, oserror, pread
from wsd.tracker.session import TrackedRegion
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region

PAGE = 4096
BASE = 0x7F0000000000


class _Refusing:
    """A uffd whose every UFFDIO_COPY fails with ``err``."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.woken: list[int] = []

    def copy(self, dst: int, data: Buffer, *, wake: bool = True, wp: bool = False) -> int:
        raise oserror("UFFDIO_COPY", self.err)

    def wake(self, start: int, length: int) -> None:
        self.woken.append(start)


@pytest.mark.parametrize(
    "err", [errno.EAGAIN, errno.ENOENT, errno.ESRCH], ids=["changing", "unmapped", "exited"]
)
def test_a_raced_page_the_mapping_cannot_take_goes_into_the_memfd(err: int) -> None:
    """EAGAIN: a life event is queued.  ENOENT, ESRCH: the VMM unmapped the
    region or exited meanwhile (a put-back retried for want of memory can meet
    either).  The final bytes go into the memfd, which outlives the mapping;
    before, an unmapped region's page was dropped with an error."""
    fd = memfd_create("put-back", size=4 * PAGE)
    try:
        region = Region(
            guest_phys_addr=0, host_virt_addr=BASE, size=4 * PAGE, fd_index=0, page_size=PAGE
        )
        t = TrackedRegion(region, fd, RegionState(4, Granularity.PAGE_4K, started_at=0.0))
        uffd = _Refusing(err)
        left, errors = place(cast(Userfaultfd, uffd), t, {2: b"\x5a" * PAGE})
        assert (left, errors) == ({}, [])
        assert bytes(pread(fd, PAGE, 2 * PAGE)) == b"\x5a" * PAGE
        # A thread that faulted on the hole re-faults and maps them; a gone mapping has none.
        assert uffd.woken == ([BASE + 2 * PAGE] if err == errno.EAGAIN else [])
    finally:
        os.close(fd)
