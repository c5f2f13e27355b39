"""Guest-RAM backing files: memfd creation, page I/O and hole punching.

Reading a guest page through the memfd (``pread``) never faults in the VMM's
address space, so it neither trips RWP/WP tracking nor blocks on a uffd: that
is how wsd reads pages it is about to evict (RWP-FACTS fact 5).
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

from wsd import _batch

from ._ffi import ffi, libc
from .errors import AddressRange, KernelError, oserror

__all__ = [
    "MemfdFlag",
    "data_ranges",
    "map_shared",
    "memfd_create",
    "pread",
    "pread_into",
    "pread_pages",
    "punch_hole",
    "pwrite",
    "unreserved_huge_page_count",
    "write_into",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MFD_HUGE_SHIFT = 26


class MemfdFlag(enum.IntFlag):
    CLOEXEC = 0x0001
    ALLOW_SEALING = 0x0002
    HUGETLB = 0x0004
    NOEXEC_SEAL = 0x0008
    EXEC = 0x0010


def memfd_create(
    name: str,
    *,
    size: int = 0,
    hugetlb_page_size: int | None = None,
    flags: MemfdFlag = MemfdFlag.CLOEXEC,
) -> int:
    """Create a memfd of ``size`` bytes; ``hugetlb_page_size`` picks a hugetlbfs pool."""
    raw = int(flags)
    if hugetlb_page_size is not None:
        if hugetlb_page_size & (hugetlb_page_size - 1):
            raise ValueError(f"huge page size {hugetlb_page_size} is not a power of two")
        raw |= MemfdFlag.HUGETLB | (hugetlb_page_size.bit_length() - 1) << MFD_HUGE_SHIFT
    try:
        fd = os.memfd_create(name, raw)
    except OSError as e:
        raise oserror(
            "memfd_create", e.errno or errno.EIO, detail=f"{name!r} flags {raw:#x}"
        ) from e
    if size:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise oserror("ftruncate", e.errno or errno.EIO, fd=fd, detail=f"size {size}") from e
    return fd


def map_shared(fd: int, length: int, offset: int = 0, *, writable: bool = True) -> mmap.mmap:
    """wsd's own ``MAP_SHARED`` view of a memfd: never the VMM's registered mapping."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except OSError as e:
        raise oserror(
            "mmap", e.errno or errno.EIO, range=AddressRange(offset, length), fd=fd
        ) from e


def pread_into(fd: int, buf: Buffer, offset: int) -> None:
    """Fill ``buf`` from ``offset``; a short read (past EOF) is an error, not zeros."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise oserror(
                "pread", e.errno or errno.EIO, range=AddressRange(offset, len(view)), fd=fd
            ) from e
        if n == 0:
            raise oserror(
                "pread",
                errno.EIO,
                range=AddressRange(offset, len(view)),
                fd=fd,
                detail=f"end of file after {done} bytes",
            )
        done += n


def pread_pages(fd: int, offsets: npt.NDArray[np.uint64], page_size: int) -> list[bytes]:
    """A new ``page_size``-byte bytes of the file at each byte offset, in order.

    One ``preadv`` per run of consecutive pages, straight into the pages
    returned, all in C with the GIL released: a batch's read in a worker thread
    leaves the event loop thread free.  Reading past the end of the file is an
    error, as in :func:`pread_into`.
    """
    try:
        pages, _ = _batch.read_pages(fd, offsets, page_size, None, False)
    except OSError as e:
        first, last = int(offsets.min()), int(offsets.max())  # not empty: it failed
        span = last + page_size - first
        raise oserror(
            "pread", e.errno or errno.EIO, range=AddressRange(first, span), fd=fd, detail=e.strerror
        ) from e
    return pages


def pread(fd: int, length: int, offset: int) -> bytearray:
    buf = bytearray(length)
    pread_into(fd, buf, offset)
    return buf


def pwrite(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise oserror(
                "pwrite", e.errno or errno.EIO, range=AddressRange(offset, len(view)), fd=fd
            ) from e


def write_into(fd: int, data: Buffer, offset: int) -> None:
    """Write ``data`` into the memfd past any uffd: ``pwrite``, or on hugetlbfs,
    which has no ``write()``, through a short-lived mapping of our own (whose
    ``mmap`` says ENOMEM when the pool has no page to reserve for a hole)."""
    try:
        pwrite(fd, data, offset)
    except KernelError as e:
        if e.errno != errno.EINVAL:
            raise
        view = memoryview(data).cast("B")
        with map_shared(fd, len(view), offset) as m:
            m[:] = view


def punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)``: drop the pages, keep the file size.

    Threads of the VMM blocked in a uffd fault on these pages stay blocked
    until someone sends ``UFFDIO_WAKE`` (RWP-FACTS fact 5).
    """
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0:
        raise oserror("fallocate(PUNCH_HOLE)", ffi.errno, range=AddressRange(offset, length), fd=fd)


def data_ranges(fd: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The ``[start, end)`` file ranges that hold data (``SEEK_DATA``/``SEEK_HOLE``).

    Not on hugetlbfs, which has no ``SEEK_HOLE``: its ``lseek`` calls the whole
    file data, holes included.
    """
    if end is None:
        end = os.fstat(fd).st_size
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise oserror("lseek(SEEK_DATA)", e.errno or errno.EIO, fd=fd) from e
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, end)))
        pos = hole
    return out


HUGEPAGES = Path("/sys/kernel/mm/hugepages")


def unreserved_huge_page_count(page_size: int, *, sysfs: Path = HUGEPAGES) -> int | None:
    """Pages of the host's hugetlbfs pool of ``page_size`` that a new allocation
    can take: free, and reserved by no mapping (None: no such pool).

    A free page that a mapping reserved goes to that mapping's pages only, so
    a pool can list free pages and still have none for anyone else.
    """
    pool = sysfs / f"hugepages-{page_size >> 10}kB"
    try:
        free = int((pool / "free_hugepages").read_text())
        reserved = int((pool / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return None
    return max(free - reserved, 0)
