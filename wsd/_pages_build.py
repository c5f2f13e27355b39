"""The C loops of the tracker's per-page work, built by cffi when wsd is installed.

``setup.py`` names this file in ``cffi_modules``, so ``pip install`` (and
``tools/bootstrap.sh``) compiles ``wsd._pages_native`` next to it.  Each
function is one pass over plain arrays that numpy needs several passes (and
temporaries) for; :mod:`wsd.pages` is their typed interface.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
int wsd_mark_runs(const uint64_t *runs, size_t nruns, uint64_t base, unsigned shift,
                  uint8_t *out, size_t npages);
void wsd_age_observe(uint8_t *age, const uint8_t *hot, size_t n);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* PAGEMAP_SCAN's struct page_region: start, end, categories. */
#define RUN_WORDS 3

/*
 * Set out[i] = 1 for every page i of every run [start, end), counted from
 * base in pages of 1 << shift bytes.  Returns 0, or -1 without writing
 * anything more if a run does not lie within [base, base + npages pages).
 */
int wsd_mark_runs(const uint64_t *runs, size_t nruns, uint64_t base, unsigned shift,
                  uint8_t *out, size_t npages)
{
	for (size_t i = 0; i < nruns; i++) {
		uint64_t start = runs[i * RUN_WORDS], end = runs[i * RUN_WORDS + 1];
		if (start < base || end < start)
			return -1;
		uint64_t first = (start - base) >> shift, last = (end - base) >> shift;
		if (last > npages)
			return -1;
		memset(out + first, 1, last - first);
	}
	return 0;
}

/*
 * Close an interval for n pages: a hot page's age becomes 0, any other's
 * grows by one, saturating at 255.  hot[i] is 0 or 1 (a numpy bool), so
 * hot[i] - 1 is a mask: no branch, and the loop vectorises.
 */
void wsd_age_observe(uint8_t *restrict age, const uint8_t *restrict hot, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint8_t a = age[i];
		age[i] = (uint8_t)(a + (a != 255)) & (uint8_t)(hot[i] - 1);
	}
}
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("wsd._pages_native", SOURCE, extra_compile_args=["-O3", "-std=c11"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
