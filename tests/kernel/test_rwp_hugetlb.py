"""RWP-FACTS fact 7: hugetlbfs is tracked at 2 MiB and wants 2 MiB-aligned ranges; and
what a UFFDIO_COPY into it says when the pool is empty."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from wsd.kernel import (
    Feature,
    KernelError,
    PageCategory,
    Pagemap,
    RegisterMode,
    Userfaultfd,
    map_shared,
    memfd_create,
    pread,
    punch_hole,
    unreserved_huge_page_count,
)
from wsd.kernel._ffi import ffi
from wsd.testing.arming import arm_rwp
from wsd.testing.hammer import free_huge_pages
from wsd.testing.puppet_vmm import PuppetVMM

HUGE = 2 << 20


@pytest.fixture
def huge_session(
    rwp_supported: Feature, hugepages: int
) -> Iterator[tuple[PuppetVMM, Userfaultfd, Pagemap]]:
    with (
        PuppetVMM.spawn(4 * HUGE, page_size=HUGE) as p,
        arm_rwp(p) as uffd,
        Pagemap.open(p.pid) as pm,
    ):
        yield p, uffd, pm


def test_unaligned_rwprotect_is_einval(huge_session) -> None:
    p, uffd, _pm = huge_session
    for start, length in [(p.base + 4096, 4096), (p.base, HUGE + 4096), (p.base + 4096, HUGE)]:
        with pytest.raises(KernelError) as exc:
            uffd.rwprotect(start, length, protect=True)
        assert exc.value.errno == errno.EINVAL
    uffd.rwprotect(p.base + HUGE, HUGE, protect=True)


def test_one_small_touch_marks_the_whole_huge_page(huge_session) -> None:
    p, _uffd, pm = huge_session
    assert pm.scan(p.base, p.size, category_mask=PageCategory.ACCESSED).page_count(4096) == 0
    p.call("touch", pages=[2], write=False)  # puppet pages are 2 MiB here
    res = pm.scan(p.base, p.size, category_mask=PageCategory.ACCESSED)
    assert res.page_indices(p.base, HUGE).tolist() == [2]
    assert res.page_count(4096) == HUGE // 4096
    assert p.call("read", pages=[0, 1, 2, 3]) == [0, 0, 0, 0]


def test_a_copy_into_a_hole_with_an_empty_pool_says_eexist(rwp_supported: Feature) -> None:
    """As on the host's 6.18 (docs/evictor.md, "EEXIST on hugetlbfs"): with no
    free page in the pool, UFFDIO_COPY into a hugetlbfs hole says EEXIST, not
    ENOMEM; once a page is free the same copy succeeds."""
    with free_huge_pages(2, exactly=True) as free:
        if free != 2:
            pytest.skip(f"{free} free 2 MiB huge pages, exactly 2 needed")
        fd = memfd_create("eexist", size=2 * HUGE, hugetlb_page_size=HUGE)
        try:
            with (
                map_shared(fd, 2 * HUGE) as area,
                Userfaultfd.create() as uffd,
                ffi.from_buffer(area) as buf,
            ):
                base = int(ffi.cast("uintptr_t", buf))
                uffd.api(Feature(0))
                uffd.register(base, 2 * HUGE, RegisterMode.MISSING)
                data = b"\x5a" * HUGE
                uffd.copy(base, data)
                uffd.copy(base + HUGE, data)
                # The punch of a page gives it and its reservation back, as an eviction's does.
                punch_hole(fd, 0, HUGE)
                filler = memfd_create("filler", size=HUGE, hugetlb_page_size=HUGE)
                with map_shared(filler, HUGE) as taken:
                    taken[0] = 1  # the pool's last page
                assert unreserved_huge_page_count(HUGE) == 0
                with pytest.raises(FileExistsError):
                    uffd.copy(base, data)
                assert bytes(pread(fd, 16, 0)) == bytes(16)  # still a hole
                os.close(filler)
                uffd.copy(base, data)
                assert bytes(pread(fd, 16, 0)) == data[:16]
        finally:
            os.close(fd)
