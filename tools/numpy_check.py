"""Check numpy's set and sort routines against plain Python on random integer arrays.

    .venv/bin/python -m vmtest run -- .venv/bin/python tools/numpy_check.py

Written for the 7.3 test VM: under QEMU 7.2's TCG with AVX2 visible, ``np.isin``
answered wrongly for some arrays (docs/vmtest.md, "No AVX under TCG").  It prints the
SIMD features numpy dispatches to and, per routine, how many of ``--trials`` random
arrays it got wrong; the exit status is 1 if any was wrong.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from collections.abc import Callable

import numpy as np
from numpy._core._multiarray_umath import __cpu_features__

Check = Callable[[np.ndarray, np.ndarray], bool]


def _isin(kind: str | None) -> Check:
    def check(a: np.ndarray, b: np.ndarray) -> bool:
        members = set(b.tolist())
        return bool(np.isin(a, b, kind=kind).tolist() == [x in members for x in a.tolist()])

    return check


def _searchsorted(a: np.ndarray, b: list[int]) -> bool:
    return bool(
        np.searchsorted(np.array(b), a).tolist() == [bisect.bisect_left(b, x) for x in a.tolist()]
    )


CHECKS: dict[str, Check] = {
    "isin": _isin(None),
    "isin(kind='sort')": _isin("sort"),
    "isin(kind='table')": _isin("table"),
    "sort": lambda a, b: np.sort(a).tolist() == sorted(a.tolist()),
    "unique": lambda a, b: np.unique(a).tolist() == sorted(set(a.tolist())),
    "argsort(kind='stable')": lambda a, b: (
        a.argsort(kind="stable").tolist() == sorted(range(len(a)), key=a.tolist().__getitem__)
    ),
    "searchsorted": lambda a, b: _searchsorted(a, sorted(b.tolist())),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3000)
    args = parser.parse_args()
    print(
        "numpy",
        np.__version__,
        "CPU features:",
        " ".join(k for k, v in __cpu_features__.items() if v),
    )
    rng = np.random.default_rng(1)
    wrong = dict.fromkeys(CHECKS, 0)
    for _ in range(args.trials):
        a = rng.integers(0, 8192, int(rng.integers(1, 5000))).astype(np.int64)
        b = rng.integers(0, 8192, 300).astype(np.int64)
        for name, check in CHECKS.items():
            wrong[name] += not check(a, b)
    for name, n in wrong.items():
        print(f"{name:24} {n} of {args.trials} wrong")
    return 1 if any(wrong.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
