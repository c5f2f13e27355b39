"""The label that makes a verified punch's parked pipes readable by a restarted wsd."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd.evictor.held import HeldLabelError, label, parse


@settings(deadline=None, max_examples=50)
@given(
    region=st.integers(0, 2**32 - 1),
    page_size=st.sampled_from([4096, 16384]),
    pages=st.lists(st.integers(0, 2**40), max_size=128, unique=True).map(sorted),
)
def test_label_and_pages_read_back(region: int, page_size: int, pages: list[int]) -> None:
    arr = np.array(pages, dtype=np.int64)
    body = bytes(range(256)) * (len(pages) * page_size // 256)
    chunk = parse(label(region, page_size, arr) + body)
    assert (chunk.region, chunk.page_size) == (region, page_size)
    assert chunk.pages.tolist() == pages
    for k in range(len(pages)):
        assert chunk.page(k) == body[k * page_size : (k + 1) * page_size]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"short", "shorter than a label"),
        (b"x" * 64, "no label"),
        (
            label(0, 4096, np.array([1, 2])) + bytes(4096),
            "2 pages of 4096 bytes labelled, 4096 bytes held",
        ),
        (
            label(0, 4096, np.array([1])) + bytes(8192),
            "1 pages of 4096 bytes labelled, 8192 bytes held",
        ),
    ],
)
def test_anything_else_is_refused_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(HeldLabelError, match=message):
        parse(data)
