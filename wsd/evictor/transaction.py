"""The steps of one eviction batch that touch guest memory, in the order that keeps it safe.

1. :func:`read_pages`: ``pread`` the pages from the memfd (never through the
   VMM's registered mapping, so reading faults nothing; RWP-FACTS fact 5);
2. the caller ``put``\\ s them and waits for ``sync``;
3. the caller records them as evicted (and persists the page map);
4. :func:`punch_and_wake`: punch the holes, then ``UFFDIO_WAKE`` each range.
   The wake is mandatory: a vCPU that blocked on one of these pages during the
   sync window stays blocked forever without it.  Woken, it re-faults as
   MISSING and is served from storage.

In ``wp-async`` mode step 4 is :func:`punch_held` then :func:`put_back`, which
need no window.
In ``rwp`` mode on shmem, :func:`changed_since_read` goes right before step 4:
the scan can miss a write there (:func:`wsd.evictor.evictor.content_checked`).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import xxhash
from typing_extensions import Buffer

from wsd import _batch
from wsd.kernel import (
    AddressRange,
    HeldPages,
    KernelError,
    PipePool,
    Userfaultfd,
    data_ranges,
    pread,
    pread_into,
    pread_pages,
    punch_hole,
    unreserved_huge_page_count,
    write_into,
)
from wsd.tracker.session import TrackedRegion
from wsd.vmm.protocol import Region

B = TypeVar("B", bound=Buffer)

# Errors of UFFDIO_COPY that mean the VMM's mapping is gone: it unmapped the
# region (ENOENT) or exited (ESRCH).
VMM_GONE = frozenset({errno.ESRCH, errno.ENOENT})


def runs(pages: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive pages in an ascending array."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def read_pages(memfd: int, region: Region, pages: npt.NDArray[np.int64]) -> dict[int, bytes]:
    """The bytes of ``pages`` (ascending), keyed by byte offset within the region.

    Blocking: run it in a thread.  The reads run without the GIL
    (:func:`~wsd.kernel.pread_pages`), so the event loop serves faults meanwhile.
    """
    ps = region.page_size
    offsets = pages.astype(np.uint64) * np.uint64(ps)
    data = pread_pages(memfd, offsets + np.uint64(region.offset), ps)
    return dict(zip(offsets.tolist(), data, strict=True))


def punch_and_wake(
    uffd: Userfaultfd, memfd: int, region: Region, pages: npt.NDArray[np.int64]
) -> None:
    """Drop ``pages`` (ascending, already durable in storage) and wake their waiters."""
    ps = region.page_size
    spans = runs(pages)
    try:
        for first, count in spans:
            punch_hole(memfd, region.offset + first * ps, count * ps)
    finally:
        # Also after a failed punch: a waiter on a punched page must not stay
        # blocked, and one on an unpunched page just re-faults.
        for first, count in spans:
            uffd.wake(region.host_virt_addr + first * ps, count * ps)


def changed_since_read(
    memfd: int,
    region: Region,
    pages: npt.NDArray[np.int64],
    stored: Mapping[int, bytes],
    scratch: bytearray,
) -> npt.NDArray[np.bool_]:
    """Which of ``pages`` (ascending) no longer hold the bytes stored for them.

    ``stored``: the :func:`digest` of each page's stored bytes, by byte offset
    in the region.  One ``pread`` per run, the pages one after another in
    ``scratch`` (grown as needed), then all digests in one call: 1.5 to 1.7 µs
    per 4 KiB page of a run on the development host, most of it the copy
    (``bench/content_check.py``).  A page that became a hole reads as zeros and
    so counts as changed, unless zeros were stored.
    """
    ps = region.page_size
    total = len(pages) * ps
    if len(scratch) < total:
        scratch.extend(bytes(total - len(scratch)))  # before a view exports it
    done = 0
    with memoryview(scratch) as buf:
        for first, count in runs(pages):
            with buf[done : done + count * ps] as view:
                pread_into(memfd, view, region.offset + first * ps)
            done += count * ps
        with buf[:total] as view:
            return ~_same_as_stored(view, ps, (pages * ps).tolist(), stored)


def not_punched(memfd: int, region: Region, pages: npt.NDArray[np.int64]) -> list[int]:
    """Which of ``pages`` (ascending, just punched) still hold data in the memfd.

    A 4 KiB punch inside a shmem THP zeroes the range and then tries to split
    the huge page; when the split fails (the folio has extra references) the
    zeroed 4 KiB stays in the page cache instead of becoming a hole.  Costs one
    SEEK_DATA/SEEK_HOLE walk per run.
    """
    ps = region.page_size
    if region.hugetlb:
        return [p for p in pages.tolist() if holds_data(memfd, region, p)]
    left: list[int] = []
    for first, count in runs(pages):
        start = region.offset + first * ps
        for b, e in data_ranges(memfd, start, start + count * ps):
            left.extend(range((b - region.offset) // ps, -(-(e - region.offset) // ps)))
    return left


def holds_data(memfd: int, region: Region, page: int) -> bool:
    """Whether ``page`` of ``region`` in its memfd is not a hole.

    hugetlbfs has no SEEK_HOLE (its lseek calls the whole file data): there a
    page counts as a hole if it reads as zeros, which a hole does.  A page
    someone filled with zeros is then taken for a hole too, and gets the
    guest's stored bytes back.
    """
    ps = region.page_size
    at = region.offset + page * ps
    if not region.hugetlb:
        return bool(data_ranges(memfd, at, at + ps))
    data = pread(memfd, ps, at)
    return data.count(0) != len(data)  # in C: any() would visit 2 Mi ints


def copy_page(
    uffd: Userfaultfd,
    t: TrackedRegion,
    page: int,
    data: Buffer,
    *,
    wake: bool = True,
    wp: bool = False,
) -> None:
    """``UFFDIO_COPY`` ``data`` into ``page`` of ``t``, and raise as the ioctl does,
    except for an EEXIST that hugetlbfs gave for want of a free page: ``ENOMEM``.

    hugetlbfs answers a copy into a hole with EEXIST, not ENOMEM, when its
    pool has no page for it (Linux 6.18: a hole, no PTE, no unreserved page
    in the pool; docs/evictor.md, "EEXIST on hugetlbfs").  Taken at its word,
    the bytes being installed (a raced page's final bytes, a fetched page)
    would be dropped and the hole zero-filled at its next fault.  So there an
    EEXIST stands only if the VMM maps the page, or the page holds data, or
    a second copy says it again while the pool has a page to give.
    """
    r = t.region
    ps = r.page_size
    addr = r.host_virt_addr + page * ps
    try:
        uffd.copy(addr, data, wake=wake, wp=wp)
        return
    except FileExistsError:
        if not r.hugetlb or t.maps(page) or holds_data(t.memfd, r, page):
            raise
    try:
        uffd.copy(addr, data, wake=wake, wp=wp)  # a page may have come free since
    except FileExistsError as e:
        if unreserved_huge_page_count(ps) != 0:  # None: no pool to ask, take it as said
            raise
        raise KernelError(
            errno.ENOMEM,
            "UFFDIO_COPY",
            range=AddressRange(addr, ps),
            detail="EEXIST on a hole with no unreserved huge page: no memory for it",
        ) from e


@dataclass(frozen=True)
class VerifiedPunch:
    """How a verified punch (:func:`punch_held`, :func:`put_back`) left each page."""

    evicted: npt.NDArray[np.int64]
    """Punched, and their final bytes were the stored ones."""
    raced: npt.NDArray[np.int64]
    """Written after they were read: put back in the memfd with their final bytes."""
    kept: npt.NDArray[np.int64]
    """Resident: not punched (the punch failed part way), or written back (detached)."""
    errors: tuple[str, ...] = ()
    unplaced: dict[int, bytes] = field(default_factory=dict)
    """Raced pages the kernel had no memory for (``ENOMEM``), page -> final
    bytes: still holes, their bytes in this process alone; :func:`place` them."""


class PunchedUnread(Exception):
    """The pages were punched, then their held bytes could not be read back.

    A raced page's final bytes are then nowhere but in the pipes (parked in
    the fd store when there is one), and which pages raced is unknown: none
    of ``pages`` may be served from storage, nor zero-filled.
    """

    def __init__(self, pages: npt.NDArray[np.int64], error: KernelError) -> None:
        super().__init__(f"{len(pages)} pages punched, their held bytes unread: {error}")
        self.pages = pages
        self.error = error


def digest(page: Buffer) -> bytes:
    """What the verified punch compares: a 128-bit XXH3 of the page's bytes.

    Keeping digests instead of the bytes themselves between prepare and
    commit costs 16 bytes a page instead of a page; two different contents
    collide with probability 2**-128.
    """
    return xxhash.xxh3_128_digest(page)


_DIGEST = np.dtype((np.void, 16))


def digests(data: Mapping[int, bytes]) -> dict[int, bytes]:
    """:func:`digest` of every page of ``read_pages``' result (run it in a thread;
    the hashing lets the GIL go)."""
    raw = _batch.digests128(list(data.values()))
    return dict(zip(data.keys(), np.frombuffer(raw, dtype=_DIGEST).tolist(), strict=True))


def _same_as_stored(
    view: memoryview, page_size: int, offsets: Iterable[int], stored: Mapping[int, bytes]
) -> npt.NDArray[np.bool_]:
    """Per page of ``view``: whether its :func:`digest` is the one stored for the
    page at the same place in ``offsets``."""
    now = np.frombuffer(_batch.page_digests128(view, page_size), dtype=_DIGEST)
    was = np.frombuffer(b"".join(map(stored.__getitem__, offsets)), dtype=_DIGEST)
    return now == was  # type: ignore[no-any-return]


class PipeParking(Protocol):
    """Pipes for verified punches that outlive wsd (:mod:`.held`)."""

    @property
    def pool(self) -> PipePool: ...

    def park(self) -> None:
        """Make sure every pipe of :attr:`pool` outlives wsd; raise if not."""


@dataclass
class HeldPunch:
    """A verified punch's first half: pages punched, their final bytes read and compared.

    What :func:`put_back` needs to finish it.  Until then a raced page's final
    bytes are only in :attr:`final` and in the pipes.
    """

    pages: npt.NDArray[np.int64]
    punched: npt.NDArray[np.bool_]
    same: npt.NDArray[np.bool_]
    """Per page: its final bytes have the stored digest."""
    final: bytearray
    """The pages' final bytes, one after another (may be longer)."""
    held: HeldPages
    pooled: bool
    errors: list[str]


def punch_held(
    uffd: Userfaultfd,
    memfd: int,
    region: Region,
    pages: npt.NDArray[np.int64],
    stored: Mapping[int, bytes],
    *,
    scratch: bytearray | None = None,
    parking: PipeParking | None = None,
    label: bytes = b"",
) -> HeldPunch:
    """Punch ``pages`` (ascending) with no window, keeping every write that races the punch.

    Without a sync window nothing stops the guest writing a page between its
    read (``stored`` holds the :func:`digest` of the bytes stored, keyed by
    byte offset in the region) and its punch.  So: take references to the
    pages (:class:`~wsd.kernel.HeldPages`), punch, and read the held pages.
    Every write made before a page's PTE was zapped is in those bytes, and
    none can come after (the hole faults).  A page whose final bytes have the
    stored digest may be served from storage; :func:`put_back` puts any other
    back.  Between the punch and :func:`put_back` the caller must not serve
    a MISSING fault on these pages: it would take a hole for a first touch.

    It only reads ``stored`` and writes only ``scratch`` and the pipes, so it
    may run in a thread while the caller leaves those alone.  ``scratch``,
    reused across calls, saves faulting in a fresh buffer each time; it grows
    as needed.

    From the punch until the put-back the final bytes of a raced page exist
    only in the pipes.  With ``parking`` the pipes come from its pool, which
    is parked before the punch; ``label`` goes first in them, to make them
    readable alone, and they are read without being emptied.  :func:`put_back`
    empties them; nothing does on an error in between, when they may hold all
    that is left.

    Raises :class:`KernelError` if the references cannot be taken; then
    nothing was punched.  Raises :class:`PunchedUnread` if the held bytes
    cannot be read after the punch; a pool's pipes then keep them.
    """
    ps = region.page_size
    spans = runs(pages)
    errors: list[str] = []
    spans_bytes = [(region.offset + f * ps, n * ps) for f, n in spans]
    pool = parking.pool if parking is not None else None
    with HeldPages(memfd, spans_bytes, ps, label=label if pool else b"", pool=pool) as held:
        if parking is not None:
            try:
                parking.park()
            except BaseException:
                held.release()  # nothing punched
                raise
        try:
            punch_and_wake(uffd, memfd, region, pages)
        except KernelError as e:
            errors.append(str(e))
        final = scratch if scratch is not None else bytearray()
        if len(final) < held.length:
            final.extend(bytes(held.length - len(final)))
        unread: KernelError | None = None
        try:
            held.read_into(memoryview(final)[: held.length])
        except KernelError as e:
            unread = e
    punched = np.ones(len(pages), dtype=np.bool_)
    if unread is not None:
        if errors:
            # If the memfd cannot say which were punched, hold back them all:
            # a resident page held back only waits for the restart too.
            with contextlib.suppress(KernelError):
                punched = ~np.isin(pages, not_punched(memfd, region, pages))
        raise PunchedUnread(pages[punched], unread)
    if errors:
        punched = ~np.isin(pages, not_punched(memfd, region, pages))
    with memoryview(final) as view:
        same = _same_as_stored(view[: len(pages) * ps], ps, (pages * ps).tolist(), stored)
    return HeldPunch(pages, punched, same, final, held, pool is not None, errors)


def put_back(
    uffd: Userfaultfd,
    t: TrackedRegion,
    punch: HeldPunch,
    *,
    detached: bool = False,
) -> VerifiedPunch:
    """Finish ``punch``: put every punched page whose final bytes are not the
    stored ones back in place, write-protected so tracking goes on; that also
    wakes a vCPU that faulted on its hole meanwhile.  Then empty the pipes.

    ``t.region`` is where the pages are now (a remap may have moved them).
    ``detached``: the region is no longer the uffd's (:mod:`.events`), so
    every punched page goes back, by ``pwrite`` into the memfd, and none
    counts as evicted.
    """
    region = t.region
    ps = region.page_size
    pages, errors = punch.pages, list(punch.errors)
    back = punch.punched if detached else punch.punched & ~punch.same
    finals = {
        int(pages[k]): memoryview(punch.final)[k * ps : (k + 1) * ps]
        for k in np.flatnonzero(back).tolist()
    }
    left, more = place(uffd, t, finals, detached=detached)
    errors.extend(more)
    # punch.final is the caller's scratch
    unplaced = {page: bytes(now) for page, now in left.items()}
    if punch.pooled:
        punch.held.release()
    if unplaced:
        # A hugetlbfs pool with no spare page: the pipes' references kept the
        # punched pages themselves out of it until the release just above.
        unplaced, more = place(uffd, t, unplaced, detached=detached)
        errors.extend(more)
    if detached:
        return VerifiedPunch(
            evicted=pages[:0], raced=pages[:0], kept=pages, errors=tuple(errors), unplaced=unplaced
        )
    return VerifiedPunch(
        evicted=pages[punch.punched & punch.same],
        raced=pages[punch.punched & ~punch.same],
        kept=pages[~punch.punched],
        errors=tuple(errors),
        unplaced=unplaced,
    )


def place(
    uffd: Userfaultfd, t: TrackedRegion, unplaced: Mapping[int, B], *, detached: bool = False
) -> tuple[dict[int, B], list[str]]:
    """Put raced pages back (page -> final bytes); those the kernel still has no
    memory for, and what went wrong with the others.  ``detached``: into the
    memfd, not through the uffd (see :func:`put_back`)."""
    left: dict[int, B] = {}
    errors: list[str] = []
    for page, data in unplaced.items():
        try:
            if detached:
                errors.extend(_write_back_page(t, page, data))
            else:
                errors.extend(_put_back_page(uffd, t, page, data))
        except KernelError:
            left[page] = data
    return left, errors


def _put_back_page(uffd: Userfaultfd, t: TrackedRegion, page: int, data: Buffer) -> list[str]:
    """Install a raced page's final bytes, write-protected; what went wrong, if
    anything.  Raises KernelError ``ENOMEM``: no memory for the page now."""
    ps = t.region.page_size
    addr = t.region.host_virt_addr + page * ps
    try:
        copy_page(uffd, t, page, data, wp=True)
    except FileExistsError:
        # Only a write that bypassed the registered mapping (the VMM's
        # write() to the memfd, another process's mapping) fills a hole
        # without a fault.  Its bytes are newer than ours for that part.
        return [f"page {page} was repopulated behind the uffd; kept as found"]
    except OSError as e:  # by errno: EAGAIN comes as BlockingIOError
        if e.errno == errno.ENOMEM:
            raise
        if e.errno != errno.EAGAIN and e.errno not in VMM_GONE:
            return [f"page {page}: {e}"]
        # EAGAIN: a life event (REMOVE, UNMAP, REMAP) is queued, and it cannot
        # be read before this returns, so a retry would fail the same.
        # ENOENT, ESRCH: the VMM unmapped the region or exited meanwhile.  The
        # page cache takes the bytes without the uffd: the memfd outlives the
        # mapping, and they are the page's wherever it is mapped next.
        errors = _write_back_page(t, page, data)
        if e.errno == errno.EAGAIN and not errors:
            try:
                uffd.wake(addr, ps)  # a thread that faulted meanwhile maps them
            except KernelError as err:
                errors.append(f"page {page}: put back: {err}")
        return errors
    return []


def _write_back_page(t: TrackedRegion, page: int, data: Buffer) -> list[str]:
    """Write a page's bytes into the memfd, past any uffd; what went wrong, if
    anything.  Raises KernelError ``ENOMEM``: no memory for the page now."""
    region = t.region
    try:
        write_into(t.memfd, data, region.offset + page * region.page_size)
    except KernelError as e:
        if e.errno == errno.ENOMEM:
            raise
        return [f"page {page}: put back: {e}"]
    return []
