"""The hugetlbfs pool's pages that a new allocation can take, from sysfs."""

from __future__ import annotations

from pathlib import Path

from wsd.kernel import unreserved_huge_page_count


def test_unreserved_huge_pages_are_read_per_page_size(tmp_path: Path) -> None:
    pool = tmp_path / "hugepages-2048kB"
    pool.mkdir()
    (pool / "free_hugepages").write_text("7\n")
    (pool / "resv_hugepages").write_text("5\n")
    assert unreserved_huge_page_count(2 << 20, sysfs=tmp_path) == 2
    assert unreserved_huge_page_count(1 << 30, sysfs=tmp_path) is None  # no 1 GiB pool
    (pool / "resv_hugepages").write_text("7\n")
    assert unreserved_huge_page_count(2 << 20, sysfs=tmp_path) == 0
    (pool / "free_hugepages").write_text("garbage\n")
    assert unreserved_huge_page_count(2 << 20, sysfs=tmp_path) is None
