"""Which pages the guest touches: hot sets per phase and the zipf sampler.

Pure numpy and deterministic from the seed, so a test can recompute what a
guest did.  Page indices are ``uint64`` (what the C helper takes); the truth
file lists them sorted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .config import Pattern

__all__ = ["HotSets"]

Pages = npt.NDArray[np.uint64]


class HotSets:
    """Hot set of each phase, and for zipf the rank-to-page map and its sampler.

    - ``uniform``: one phase; ``hot_pages`` pages drawn at random, touched in
      full (shuffled) on every pass and nothing else.
    - ``phases``: a fresh random hot set of the same size for every phase.
    - ``zipf``: accesses fall on the whole guest with probability ∝ 1/rank^s,
      ranks spread over pages by a random permutation; the hot set recorded
      in the truth is the ``hot_pages`` most popular ranks.
    """

    def __init__(
        self, pattern: Pattern, npages: int, hot_pages: int, seed: int, zipf_s: float = 0.99
    ) -> None:
        if not 1 <= hot_pages <= npages:
            raise ValueError(f"hot set of {hot_pages} pages in a guest of {npages}")
        self.pattern = pattern
        self.npages = npages
        self.hot_pages = hot_pages
        self.seed = seed
        self.zipf_s = zipf_s
        self._rank_to_page: Pages | None = None
        self._cdf: npt.NDArray[np.float64] | None = None
        if pattern is Pattern.ZIPF:
            rng = np.random.default_rng([seed, 0x21FF])
            self._rank_to_page = rng.permutation(npages).astype(np.uint64)
            weights = np.arange(1, npages + 1, dtype=np.float64) ** -zipf_s
            cdf = np.cumsum(weights)
            self._cdf = cdf / cdf[-1]

    def hot(self, phase: int) -> Pages:
        """The sorted hot pages of ``phase``."""
        if self._rank_to_page is not None:
            return np.sort(self._rank_to_page[: self.hot_pages])
        if self.pattern is Pattern.UNIFORM and phase != 0:
            raise ValueError("the uniform pattern has only phase 0")
        rng = np.random.default_rng([self.seed, phase])
        return np.sort(rng.choice(self.npages, self.hot_pages, replace=False)).astype(np.uint64)

    def sample(self, rng: np.random.Generator, n: int) -> Pages:
        """``n`` zipf-distributed pages (with replacement)."""
        if self._cdf is None or self._rank_to_page is None:
            raise ValueError(f"sample() is for the zipf pattern, not {self.pattern}")
        ranks = np.searchsorted(self._cdf, rng.random(n), side="right")
        np.minimum(ranks, self.npages - 1, out=ranks)  # rounding at the top of the CDF
        return self._rank_to_page[ranks]
