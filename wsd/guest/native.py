"""The guest's access loop in C, built with cffi (API mode) on first use.

Why C: an access to guest memory may block in a userfaultfd fault for as long
as wsd takes to resolve it (a sync window, a fetch from storage).  A Python
thread that touches the mapping through numpy or a memoryview holds the GIL
while it is blocked, and every other thread of the guest freezes with it.
cffi releases the GIL around each call into this library, so a worker blocked
in a fault stops only itself, exactly like a vCPU.

The page pattern is the one of :func:`wsd.testing.puppet_vmm.page_pattern`:
word 0 of page ``i`` at version ``v`` is the key ``i << 24 | (v & 0xFFFFFF)``,
word ``w >= 1`` is ``key ^ (w + 1) * 0x9E3779B97F4A7C15``.  So every 8 bytes
name their page and version, and a word of zeros, of another page or of an
older version is caught wherever it sits in the page.

Consistency between concurrent readers and writers (no false corruption):

- A writer first takes the page's try-lock (``locks[p]``, one byte; if another
  thread holds it the access becomes a read).  Holding it, it checks the page
  is *exactly* version ``versions[p]``, writes version ``v + 1``, publishes
  ``versions[p] = v + 1`` with release ordering and drops the lock.  So at any
  moment the page holds only words of the published version or of the one
  being written (published + 1).
- A reader loads ``lo = versions[p]`` (acquire), checks every word is version
  ``lo`` or ``lo + 1``, then loads ``hi = versions[p]`` again (after an
  acquire fence).  Every word it read was written at version >= ``lo`` and
  <= ``hi + 1``.  A word outside ``[lo, lo + 1]`` is therefore corruption for
  certain when ``hi == lo``; when a writer published meanwhile the reader
  simply reads again (at most 16 times, then the access counts as
  *unverified*).
- Zeros, a punched page, another page's bytes or a stale version (older than
  ``lo``) can never pass; a version newer than any write cannot be produced by
  wsd, so accepting ``lo + 1`` loses nothing.

The build goes to ``$XDG_CACHE_HOME/wsd/guest-<hash>/`` (``~/.cache`` by
default), keyed by a hash of the C source, the build flags and the Python ABI,
and is shared by every later run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cffi

__all__ = [
    "HelperBuildError",
    "Native",
    "load_native",
]

STRUCTS = """
struct wsdg_guest {
    uint8_t *base;        /* guest RAM, as mapped by this process */
    uint64_t page_size;
    uint32_t *versions;   /* per page: the version last written */
    uint8_t *locks;       /* per page: held by the thread rewriting it */
};

struct wsdg_result {
    uint64_t writes;      /* writes done by the call */
    uint64_t unverified;  /* reads abandoned: a writer kept racing them */
    uint64_t page;        /* the first bad page ... */
    uint64_t word;        /* ... its first bad 8-byte word ... */
    uint64_t found;       /* ... and what that word held */
    uint32_t lo, hi;      /* the versions the page may hold */
    uint32_t write;       /* 1 if a write found it (exact check under the lock) */
    uint8_t *diag;        /* if not NULL: gets a copy of the bad page (page_size bytes) */
};
"""

CDEF = (
    STRUCTS
    + """

int64_t wsdg_access(const struct wsdg_guest *g, const uint64_t *pages, const uint8_t *ops,
                    uint64_t count, struct wsdg_result *res);
void wsdg_fill(const struct wsdg_guest *g, uint64_t first, uint64_t count, uint32_t version);
int64_t wsdg_check(const uint8_t *page, uint64_t page_size, uint64_t index, uint32_t lo,
                   uint32_t span);
"""
)

C_SOURCE = (
    r"""
#include <stdint.h>
#include <string.h>

"""
    + STRUCTS
    + r"""

#define GOLDEN 0x9E3779B97F4A7C15ull
#define VMASK 0xFFFFFFull
#define READ_ATTEMPTS 16

static inline uint64_t key_of(uint64_t page, uint32_t version)
{
    return page << 24 | (version & VMASK);
}

/* Fast, branch-free (vectorisable) check that every word is the pattern of the
 * key's page at the key's version plus 0 or 1 (span is 0 or 1).  It does not
 * handle a version that wraps past 24 bits: the exact check below does. */
static int page_ok_fast(const uint64_t *p, uint64_t words, uint64_t key, uint64_t span)
{
    uint64_t keep = ~span, bad = (p[0] - key) & keep, body = GOLDEN;
    for (uint64_t w = 1; w < words; w++) {
        body += GOLDEN;
        bad |= ((p[w] ^ body) - key) & keep;
    }
    return bad == 0;
}

/* The first word that is not the pattern of `page` at a version in
 * [lo, lo + span] (modulo 2^24), or -1. */
static int64_t first_bad_word(const uint64_t *p, uint64_t words, uint64_t page, uint32_t lo,
                              uint32_t span)
{
    uint64_t body = 0;
    for (uint64_t w = 0; w < words; w++) {
        uint64_t x = p[w] ^ body;
        if (x >> 24 != page || ((x - lo) & VMASK) > span)
            return (int64_t)w;
        body = (w + 2) * GOLDEN;
    }
    return -1;
}

static int64_t check_page(const uint64_t *p, uint64_t words, uint64_t page, uint32_t lo,
                          uint32_t span)
{
    if (span <= 1 && page_ok_fast(p, words, key_of(page, lo), span))
        return -1;
    return first_bad_word(p, words, page, lo, span);
}

static void fill_page(uint64_t *p, uint64_t words, uint64_t page, uint32_t version)
{
    uint64_t key = key_of(page, version), body = GOLDEN;
    p[0] = key;
    for (uint64_t w = 1; w < words; w++) {
        body += GOLDEN;
        p[w] = body ^ key;
    }
}

static void report(struct wsdg_result *res, const uint64_t *p, uint64_t words, uint64_t page,
                   int64_t word, uint32_t lo, uint32_t hi, uint32_t write)
{
    res->page = page;
    res->word = (uint64_t)word;
    res->found = p[word];
    res->lo = lo;
    res->hi = hi;
    res->write = write;
    if (res->diag)
        memcpy(res->diag, p, words * 8);
}

int64_t wsdg_access(const struct wsdg_guest *g, const uint64_t *pages, const uint8_t *ops,
                    uint64_t count, struct wsdg_result *res)
{
    uint8_t *base = g->base, *locks = g->locks;
    uint64_t page_size = g->page_size, words = page_size / 8;
    uint32_t *versions = g->versions;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t page = pages[i];
        uint64_t *p = (uint64_t *)(base + page * page_size);
        uint32_t *ver = &versions[page];

        if (ops[i] && !__atomic_load_n(&locks[page], __ATOMIC_RELAXED)
            && !__atomic_exchange_n(&locks[page], 1, __ATOMIC_ACQUIRE)) {
            /* The lock makes us the only writer: the page must be exactly v. */
            uint32_t v = __atomic_load_n(ver, __ATOMIC_RELAXED);
            int64_t w = check_page(p, words, page, v, 0);
            if (w >= 0) {
                report(res, p, words, page, w, v, v, 1);
                __atomic_store_n(&locks[page], 0, __ATOMIC_RELEASE);
                return (int64_t)i;
            }
            fill_page(p, words, page, v + 1);
            __atomic_store_n(ver, v + 1, __ATOMIC_RELEASE);
            __atomic_store_n(&locks[page], 0, __ATOMIC_RELEASE);
            res->writes++;
            continue;
        }

        int attempt;
        for (attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
            uint32_t lo = __atomic_load_n(ver, __ATOMIC_ACQUIRE);
            int64_t w = check_page(p, words, page, lo, 1);
            if (w < 0)
                break;
            /* Order the page reads before the second load of the version. */
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            uint32_t hi = __atomic_load_n(ver, __ATOMIC_RELAXED);
            if (hi == lo) {
                report(res, p, words, page, w, lo, lo + 1, 0);
                return (int64_t)i;
            }
        }
        if (attempt == READ_ATTEMPTS)
            res->unverified++;
    }
    return -1;
}

void wsdg_fill(const struct wsdg_guest *g, uint64_t first, uint64_t count, uint32_t version)
{
    for (uint64_t page = first; page < first + count; page++) {
        fill_page((uint64_t *)(g->base + page * g->page_size), g->page_size / 8, page, version);
        g->versions[page] = version;
    }
}

int64_t wsdg_check(const uint8_t *page, uint64_t page_size, uint64_t index, uint32_t lo,
                   uint32_t span)
{
    return check_page((const uint64_t *)page, page_size / 8, index, lo, span);
}
"""
)

# No -march=native: the cache directory may be shared between machines.
COMPILE_ARGS = ("-O3", "-Wall", "-Wno-unused-function")


class HelperBuildError(RuntimeError):
    """The C helper could not be built; the message says what to install."""


class _Lib(Protocol):
    def wsdg_access(self, guest: Any, pages: Any, ops: Any, count: int, res: Any) -> int: ...

    def wsdg_fill(self, guest: Any, first: int, count: int, version: int) -> None: ...

    def wsdg_check(self, page: Any, page_size: int, index: int, lo: int, span: int) -> int: ...


@dataclass(frozen=True)
class Native:
    """The loaded helper: its ``ffi`` and typed ``lib``."""

    ffi: Any
    lib: _Lib
    path: Path


def source_hash() -> str:
    h = hashlib.sha256()
    for part in (CDEF, C_SOURCE, " ".join(COMPILE_ARGS), sysconfig.get_config_var("SOABI") or ""):
        h.update(part.encode())
        h.update(b"\0")
    h.update(cffi.__version__.encode())
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wsd"


def _check_toolchain() -> None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(os.environ.get("CC", cc).split()[0]) is None:
        raise HelperBuildError(
            f"wsd guest builds a small C helper on first use and needs a C compiler,"
            f" but {cc!r} is not on PATH: install gcc (tools/bootstrap.sh does)"
        )
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        raise HelperBuildError(
            f"wsd guest builds a small C helper on first use and needs the Python headers,"
            f" but {include}/Python.h is missing: install python3-dev for {sys.executable}"
        )


def _find_module(directory: Path, modname: str) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = directory / f"{modname}{suffix}"
    return path if path.exists() else None


def _build(directory: Path, modname: str) -> None:
    _check_toolchain()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        ffi.set_source(modname, C_SOURCE, extra_compile_args=list(COMPILE_ARGS))
        # setuptools' build machinery warns about its own deprecations; they are
        # not ours to fix, and the test suite turns warnings into errors.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            try:
                ffi.compile(tmpdir=str(tmp), verbose=False)
            except Exception as e:
                raise HelperBuildError(f"building the guest's C helper in {tmp} failed: {e}") from e
        for leftover in tmp.iterdir():  # objects and build dirs; keep the .c and the module
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.suffix == ".o":
                leftover.unlink()
        try:
            # Atomic publication: a concurrent build that won the race keeps its copy.
            tmp.rename(directory)
        except OSError:
            if _find_module(directory, modname) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def load_native(cache_root: Path | None = None) -> Native:
    """Load the helper, building it first if this source has not been built yet."""
    digest = source_hash()
    modname = f"_wsd_guest_{digest}"
    directory = (cache_root or default_cache_root()) / f"guest-{digest}"
    path = _find_module(directory, modname)
    if path is None:
        _build(directory, modname)
        path = _find_module(directory, modname)
        if path is None:
            raise HelperBuildError(f"the C helper build left no module {modname} in {directory}")
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise HelperBuildError(f"cannot load the C helper from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Native(ffi=module.ffi, lib=module.lib, path=path)
