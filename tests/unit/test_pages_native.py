"""The C page loops (wsd.pages) against plain numpy, and their argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsd.kernel import REGION_DTYPE
from wsd.pages import age_observe, mark_runs

BASE = 0x7F0000000000


@given(st.sets(st.integers(0, 499), max_size=500), st.sampled_from([4096, 2 << 20]))
def test_mark_runs_sets_exactly_the_pages_of_the_runs(pages: set[int], page_size: int) -> None:
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    vec = np.array(
        [(BASE + s * page_size, BASE + e * page_size, 0) for s, e in runs], dtype=REGION_DTYPE
    )
    out = np.zeros(500, dtype=np.bool_)
    mark_runs(vec, BASE, page_size, out)
    assert np.flatnonzero(out).tolist() == sorted(pages)


def test_mark_runs_refuses_runs_outside_the_bitmap_and_bad_arrays() -> None:
    out = np.zeros(4, dtype=np.bool_)
    past_the_end = np.array([(BASE, BASE + 5 * 4096, 0)], dtype=REGION_DTYPE)
    with pytest.raises(ValueError, match="not within the 4 pages"):
        mark_runs(past_the_end, BASE, 4096, out)
    before_base = np.array([(BASE - 4096, BASE, 0)], dtype=REGION_DTYPE)
    with pytest.raises(ValueError, match="not within"):
        mark_runs(before_base, BASE, 4096, out)
    with pytest.raises(ValueError, match="contiguous 1-d bool"):
        mark_runs(before_base[:0], BASE, 4096, np.zeros(8, dtype=np.bool_)[::2])
    with pytest.raises(ValueError, match="power of two"):
        mark_runs(before_base[:0], BASE, 3000, out)


@given(st.lists(st.tuples(st.integers(0, 255), st.booleans()), max_size=300))
def test_age_observe_is_a_saturating_increment_zeroed_where_hot(
    pages: list[tuple[int, bool]],
) -> None:
    age = np.array([a for a, _ in pages], dtype=np.uint8)
    hot = np.array([h for _, h in pages], dtype=np.bool_)
    want = np.where(hot, 0, np.minimum(age.astype(np.int64) + 1, 255)).astype(np.uint8)
    age_observe(age, hot)
    assert age.tolist() == want.tolist()


def test_age_observe_refuses_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="age has 3 pages and hot 2"):
        age_observe(np.zeros(3, dtype=np.uint8), np.zeros(2, dtype=np.bool_))
    with pytest.raises(ValueError, match="contiguous 1-d uint8"):
        age_observe(np.zeros(3, dtype=np.int8), np.zeros(3, dtype=np.bool_))
