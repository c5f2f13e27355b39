"""ScanResult arithmetic and the merging of runs split by a resumed scan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsd.kernel import REGION_DTYPE, ScanResult
from wsd.kernel.pagemap import _merge_adjacent

BASE = 0x7F0000000000
PS = 4096


def regions(runs: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array([(BASE + s * PS, BASE + e * PS, c) for s, e, c in runs], dtype=REGION_DTYPE)


def test_page_indices_and_bitmap() -> None:
    r = ScanResult(regions([(0, 2, 8), (5, 6, 8), (9, 12, 8)]), walk_end=BASE + 16 * PS)
    assert r.page_indices(BASE, PS).tolist() == [0, 1, 5, 9, 10, 11]
    assert r.page_count(PS) == 6
    assert np.flatnonzero(r.bitmap(BASE, 16, PS)).tolist() == [0, 1, 5, 9, 10, 11]


def test_empty() -> None:
    r = ScanResult(regions([]), walk_end=BASE)
    assert r.page_indices(BASE, PS).tolist() == [] and r.page_count(PS) == 0


def test_merge_joins_touching_runs_with_equal_categories_only() -> None:
    merged = _merge_adjacent(regions([(0, 2, 8), (2, 4, 8), (4, 5, 10), (6, 7, 10)]))
    assert [(int(s - BASE) // PS, int(e - BASE) // PS, int(c)) for s, e, c in merged] == [
        (0, 4, 8),
        (4, 5, 10),
        (6, 7, 10),
    ]


@given(st.sets(st.integers(0, 499), max_size=200), st.integers(1, 50))
def test_split_then_merge_gives_the_same_pages(pages: set[int], cut: int) -> None:
    """Cutting runs at arbitrary points (as a resume does) never changes the page set."""
    runs: list[tuple[int, int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][1] == p and (p % cut):
            runs[-1] = (runs[-1][0], p + 1, 8)
        else:
            runs.append((p, p + 1, 8))
    merged = ScanResult(_merge_adjacent(regions(runs)), walk_end=0)
    assert merged.page_indices(BASE, PS).tolist() == sorted(pages)
    starts = merged.starts
    assert np.all(merged.ends[:-1] < starts[1:]) if len(starts) > 1 else True


def test_bitmap_of_touching_runs() -> None:
    r = ScanResult(regions([(0, 2, 8), (2, 3, 10), (5, 7, 8)]), walk_end=0)
    assert np.flatnonzero(r.bitmap(BASE, 8, PS)).tolist() == [0, 1, 2, 5, 6]


@given(
    st.sets(st.integers(0, 299), max_size=300),
    st.sampled_from([PS, 2 << 20]),
    st.booleans(),
)
def test_bitmap_sparse_and_dense_paths_give_the_page_set(
    pages: set[int], page_size: int, reuse: bool
) -> None:
    """Few pages are set by index, many by a running sum: both give exactly the pages."""
    runs: list[tuple[int, int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1, 8)
        else:
            runs.append((p, p + 1, 8))
    r = ScanResult(
        np.array(
            [(BASE + s * page_size, BASE + e * page_size, c) for s, e, c in runs],
            dtype=REGION_DTYPE,
        ),
        walk_end=0,
    )
    out = np.ones(300, dtype=np.bool_) if reuse else None
    got = r.bitmap(BASE, 300, page_size, out=out)
    assert np.flatnonzero(got).tolist() == sorted(pages)
    if out is not None:
        assert got is out


def test_bitmap_refuses_a_wrong_out() -> None:
    r = ScanResult(regions([(0, 2, 8)]), walk_end=0)
    with pytest.raises(ValueError, match="expected \\(16,\\) bool"):
        r.bitmap(BASE, 16, PS, out=np.zeros(15, dtype=np.bool_))
