"""The hugetlbfs pool's free pages, from sysfs."""

from __future__ import annotations

from pathlib import Path

from wsd.kernel import free_huge_page_count


def test_free_huge_pages_are_read_per_page_size(tmp_path: Path) -> None:
    pool = tmp_path / "hugepages-2048kB"
    pool.mkdir()
    (pool / "free_hugepages").write_text("7\n")
    assert free_huge_page_count(2 << 20, sysfs=tmp_path) == 7
    assert free_huge_page_count(1 << 30, sysfs=tmp_path) is None  # no 1 GiB pool
    (pool / "free_hugepages").write_text("garbage\n")
    assert free_huge_page_count(2 << 20, sysfs=tmp_path) is None
