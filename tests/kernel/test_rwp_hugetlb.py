"""RWP-FACTS fact 7: hugetlbfs is tracked at 2 MiB and wants 2 MiB-aligned ranges."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from wsd.kernel import Feature, KernelError, PageCategory, Pagemap, Userfaultfd
from wsd.testing.arming import arm_rwp
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
