"""Per-page loops in C (``wsd._pages_native``, built at install by cffi), typed for numpy.

The tracker's cycle touches every page of every region: setting the pages of
``PAGEMAP_SCAN``'s runs in a bitmap, then ageing every page.  numpy does each
in several passes with temporaries as large as the hot set or the region;
these do one pass over the caller's arrays and allocate nothing.  Arguments
are checked here, so a wrong array is a ``ValueError``, never a stray write.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from wsd import _pages_native  # type: ignore[attr-defined]

__all__ = ["age_observe", "mark_runs"]


class _Lib(Protocol):
    def wsd_mark_runs(  # noqa: PLR0917 (the C signature)
        self, runs: Any, nruns: int, base: int, shift: int, out: Any, npages: int
    ) -> int: ...

    def wsd_age_observe(self, age: Any, hot: Any, n: int) -> None: ...


_ffi: Any = _pages_native.ffi
_lib = cast(_Lib, _pages_native.lib)

# PAGEMAP_SCAN's struct page_region: wsd.kernel.REGION_DTYPE, spelled out
# here because wsd.kernel.pagemap imports this module.
_RUN = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


def _contiguous(name: str, arr: npt.NDArray[Any], dtype: np.dtype[Any]) -> None:
    if arr.dtype != dtype or arr.ndim != 1 or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-d {dtype} array, not {arr.dtype}")


def mark_runs(
    runs: npt.NDArray[np.void], base: int, page_size: int, out: npt.NDArray[np.bool_]
) -> None:
    """Set ``out[i]`` for every page ``i`` (from ``base``) of ``PAGEMAP_SCAN`` runs."""
    _contiguous("runs", runs, _RUN)
    _contiguous("out", out, np.dtype(np.bool_))
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if not len(runs):
        return
    status = _lib.wsd_mark_runs(
        _ffi.from_buffer("uint64_t[]", runs),
        len(runs),
        base,
        page_size.bit_length() - 1,
        _ffi.from_buffer("uint8_t[]", out, require_writable=True),
        len(out),
    )
    if status:
        lo, hi = int(runs["start"].min()), int(runs["end"].max())
        raise ValueError(
            f"runs [{lo:#x}, {hi:#x}) are not within the {len(out)} pages of "
            f"{page_size} bytes from {base:#x}"
        )


def age_observe(age: npt.NDArray[np.uint8], hot: npt.NDArray[np.bool_]) -> None:
    """Close an interval: ``age`` 0 where ``hot``, else one more (saturating at 255)."""
    _contiguous("age", age, np.dtype(np.uint8))
    _contiguous("hot", hot, np.dtype(np.bool_))
    if len(age) != len(hot):
        raise ValueError(f"age has {len(age)} pages and hot {len(hot)}")
    if not age.flags.writeable:
        raise ValueError("age is read-only")
    if len(age):
        _lib.wsd_age_observe(
            _ffi.from_buffer("uint8_t[]", age, require_writable=True),
            _ffi.from_buffer("uint8_t[]", hot),
            len(age),
        )
