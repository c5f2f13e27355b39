"""The verified punch's pipes, parked in systemd's fd store or with the VMM: raced writes
survive a kill.

In wp-async mode a page written between its read and its punch has its final
bytes only in the pipe that held it across the punch (:class:`HeldPages`),
from the punch until :func:`~.transaction.put_back` puts it back with
``UFFDIO_COPY``: about 3 ms per 2 MiB chunk, the thread's work and the loop's
turn after it.  A wsd killed there used to lose the write: its successor saw
a hole listed as evicted and served the older stored copy (CI, 2026-11-26:
"page 3487: expected version 22, found 21").

So the pipes outlive wsd.  Each session takes them from its own
:class:`PipePool`, parked in the fd store once, when the pool grows, rather
than at every punch (two datagrams to PID 1 per chunk would be thousands a
second).  A chunk's first pipe starts with a label naming the region and its
pages.  Reading the pages back does not consume them (``tee(2)``); the
pipes are emptied only after the last put-back.  A restarted wsd therefore
finds, in the pipes it gets back, either nothing, or a chunk in flight, or
the remains of one being filled or emptied (not a whole chunk: nothing of it
was punched, or all of it was put back).  For a whole chunk :func:`put_back`
installs every labelled page whose memfd offset is still a hole: that brings
back a raced page's final bytes and, for the others, the bytes that were
stored, equally current.  A page that holds data was never punched or was put
back already, and the memfd is newer than any pipe.  Without an fd store (no
systemd) the VMM keeps the pipes instead, and gives them back when it
reattaches (:mod:`wsd.vmm.kept`); a VMM that does not keep them leaves the
window open, as docs/reliability.md says.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import structlog

from wsd import fdstore, sdnotify
from wsd.kernel import KernelError, PipePool, close_fds, empty_pipe, peek_pipe
from wsd.tracker.session import TrackedRegion, VmTracker

from .transaction import copy_page

log = structlog.get_logger("wsd.evictor")

_MAGIC = b"wsdheld1"
_HEAD = struct.Struct("<8sIII")  # magic, region index, page size, page count


class HeldLabelError(ValueError):
    """Bytes that are not a verified punch's pipes, or not all of them."""


def label(region: int, page_size: int, pages: npt.NDArray[np.int64]) -> bytes:
    """What goes ahead of the pages in a chunk's first pipe (1 KiB for 128 pages)."""
    return _HEAD.pack(_MAGIC, region, page_size, len(pages)) + pages.astype("<u8").tobytes()


@dataclass(frozen=True)
class HeldChunk:
    region: int
    page_size: int
    pages: npt.NDArray[np.int64]
    data: bytes
    """The pages' bytes, in the order of ``pages``."""

    def page(self, k: int) -> memoryview:
        return memoryview(self.data)[k * self.page_size : (k + 1) * self.page_size]


def parse(data: bytes) -> HeldChunk:
    """A chunk from the concatenated contents of its pipes, in order."""
    if len(data) < _HEAD.size:
        raise HeldLabelError(f"{len(data)} bytes, shorter than a label")
    magic, region, page_size, count = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise HeldLabelError(f"no label (starts with {data[:8]!r})")
    body = _HEAD.size + 8 * count
    if page_size <= 0 or len(data) != body + count * page_size:
        raise HeldLabelError(
            f"{count} pages of {page_size} bytes labelled, {len(data) - body} bytes held"
        )
    pages = np.frombuffer(data, "<u8", count, _HEAD.size).astype(np.int64)
    return HeldChunk(region, page_size, pages, data[body:])


class ParkingFailed(Exception):
    """The pipes could not all be parked: the punch must not happen."""


class PipeKeeper(Protocol):
    """Without systemd, the VMM: it keeps the pipes and gives them back with a
    reattach (:class:`wsd.vmm.kept.VmmKeeper`)."""

    def keep(self, pipes: Sequence[int], first: int) -> None:
        """Hand over pipes ``first``, ``first + 1``...; raises OSError if not."""

    def close(self) -> None: ...


@dataclass
class Parking:
    """One session's verified-punch pipes, and which of them outlive wsd:
    in systemd's fd store, or else with the VMM (:attr:`vmm`)."""

    vm_id: str
    systemd: bool = field(default_factory=sdnotify.present)
    vmm: PipeKeeper | None = None
    """Set once the VMM's connection has its ``accepted`` reply, when there
    is no fd store."""
    pool: PipePool = field(default_factory=PipePool)
    parked: int = 0
    """The pool's first pipes that outlive wsd."""

    @property
    def available(self) -> bool:
        """Whether the pipes can outlive wsd.  Without (no fd store, and a
        VMM that has no reply yet, or an evictor without a daemon) the
        session does not survive a crash anyway, and nothing is parked."""
        return self.systemd or self.vmm is not None

    def park(self) -> None:
        """Hand the store, or the VMM, the pool's pipes it does not have yet
        (the pool grew).  Raises :class:`ParkingFailed` if it did not take them all.
        """
        new = self.pool.read_ends[self.parked :]
        if not new:
            return
        if self.systemd:
            n = fdstore.store_held(self.vm_id, new, first=self.parked)
            if n < len(new):
                fdstore.remove_held(self.vm_id, n, first=self.parked)
                raise ParkingFailed(f"the fd store took {n} of {len(new)} pipes")
        elif self.vmm is not None:
            try:
                self.vmm.keep(new, self.parked)
            except OSError as e:
                raise ParkingFailed(f"the VMM could not be sent pipes {self.parked}+: {e}") from e
        else:
            return
        self.parked += len(new)

    def close(self) -> None:
        """The session ended with every page back: closed, and out of the store.

        Between punches the pipes hold nothing, except after a punch whose
        pages could not be read back: a session left so stays parked
        (:meth:`stay_parked`).  A VMM keeps its copies until it reattaches or
        hangs up.
        """
        if self.parked and self.systemd:
            fdstore.remove_held(self.vm_id, self.parked)
            self.parked = 0
        if self.vmm is not None:
            self.vmm.close()
        self.pool.close()

    def stay_parked(self) -> dict[int, int]:
        """The session ended with pages left in storage, and stays parked: its
        pipes stay in the store (or with the VMM), and their read ends, by part,
        are returned for its VMM's reattach to this process (the caller owns
        them).  After a punch whose pages could not be read back they hold
        the only copy of a raced write, which the reattach puts back as a
        restart would (:func:`put_back`).
        """
        if self.vmm is not None:
            self.vmm.close()
        return dict(enumerate(self.pool.detach_read_ends()))


def put_back(
    tracker: VmTracker,
    held: Mapping[int, int],
    *,
    wp: bool,
    listed: Sequence[Collection[int]],
) -> dict[int, list[int]]:
    """Install the pages a killed wsd left in its parked pipes (``held``: part
    -> fd, owned and closed here) where their memfd offset is a hole; by
    region, the pages put back.  Runs before any fault is served.  The pipes
    are read without being emptied and leave the fd store only once done, so
    a crash in here repeats it; unless a page meets no memory
    (:func:`_install_from_memory` empties them).

    ``listed``: by region, the pages the page map lists as evicted.  Only
    those are put back: a held-back page the VMM discarded later (a
    balloon's ``MADV_REMOVE``) left the map when the dead wsd saw it go, and
    stays a hole that reads as zeros, as the VMM asked.  A wsd killed
    between that discard and the map's rewrite still puts its old bytes back.
    """
    fds = [held[k] for k in sorted(held)]
    done: dict[int, list[int]] = {}
    try:
        # Parts go into the store in order, each before any punch that uses
        # it, so a punch used parts 0..k, and they are all there.
        prefix: list[int] = []
        while len(prefix) in held:
            prefix.append(held[len(prefix)])
        data = b"".join(peek_pipe(fd) for fd in prefix)
        chunk = parse(data) if data else None  # nothing: no punch was in flight
    except HeldLabelError as e:
        # Pipes being filled (nothing punched yet) or emptied (everything put
        # back): their pages are all where they belong.
        log.info("parked pipes held no whole chunk", vm_id=tracker.vm_id, detail=str(e))
        chunk = None
    except KernelError as e:
        log.error("parked pipes of a verified punch unreadable", vm_id=tracker.vm_id, error=str(e))
        chunk = None
    try:
        if chunk is not None:
            t = _region_of(tracker, chunk)
            done, short = _install(tracker, t, chunk, wp=wp, only=listed[chunk.region])
            if short:
                _install_from_memory(tracker, t, chunk, short, fds, wp=wp, done=done)
    except HeldLabelError as e:
        log.error("parked pipes name pages the session has not", vm_id=tracker.vm_id, error=str(e))
    finally:
        close_fds(fds)
    fdstore.remove_held(tracker.vm_id, max(held, default=-1) + 1)
    for region, pages in done.items():
        log.warning(
            "pages held across a punch put back from the parked pipes",
            vm_id=tracker.vm_id,
            region=region,
            pages=len(pages),
        )
    return done


def retry(
    tracker: VmTracker, pool: PipePool, *, wp: bool
) -> tuple[int, npt.NDArray[np.int64]] | None:
    """Put back a chunk whose pages could not be read after their punch, from
    this wsd's own pipes (the pool of :class:`Parking`), as a restart would.

    The pipes are read again without being emptied, and every labelled page
    still held back (:meth:`TrackedRegion.is_held_back`) that is a hole is
    installed.  A labelled page that is no longer held back was discarded by
    the VMM since (a balloon's REMOVE): it stays a hole, to read as zeros.
    An install that says ENOMEM has the pipes refilled with the bytes read
    (:meth:`PipePool.refill`), once, and is tried again.
    Once every held-back page is resident, the pool is emptied (so verified
    punches can use it again), and the chunk's region and pages are
    returned; None while the pipes cannot be read or a page could not be
    installed: call again later.
    """
    try:
        data = b"".join(peek_pipe(fd) for fd in pool.read_ends)
        chunk = parse(data)
        t = _region_of(tracker, chunk)
    except (KernelError, HeldLabelError) as e:
        log.warning("held pipes still cannot be put back", vm_id=tracker.vm_id, error=str(e))
        return None
    held_back = [p for p in chunk.pages.tolist() if t.is_held_back(p)]
    _, short = _install(tracker, t, chunk, wp=wp, only=set(held_back))
    if short and not pool.refilled:
        # On hugetlbfs the punched pages the pipes hold may be all the pool
        # has, and every install says ENOMEM while they do.  Written into the
        # pipes, the same bytes take the kernel's own memory instead.
        try:
            pool.refill(data)
        except KernelError as e:
            log.error(
                "held pipes could not take their pages' bytes: those of pages not put "
                "back are lost",
                vm_id=tracker.vm_id,
                region=chunk.region,
                pages=short,
                error=str(e),
            )
        _install(tracker, t, chunk, wp=wp, only=set(short))  # still no memory: next time
    if not t.resident()[held_back].all():
        return None
    pool.empty()
    return chunk.region, chunk.pages


def _region_of(tracker: VmTracker, chunk: HeldChunk) -> TrackedRegion:
    if not 0 <= chunk.region < len(tracker.regions):
        raise HeldLabelError(f"region {chunk.region} of {len(tracker.regions)}")
    t = tracker.regions[chunk.region]
    if chunk.page_size != t.region.page_size or (
        len(chunk.pages) and chunk.pages.max() >= t.npages
    ):
        raise HeldLabelError(f"pages that are not region {chunk.region}'s")
    return t


def _install(
    tracker: VmTracker,
    t: TrackedRegion,
    chunk: HeldChunk,
    *,
    wp: bool,
    only: Collection[int] | None = None,
) -> tuple[dict[int, list[int]], list[int]]:
    """Install the chunk's pages that are holes (of them, those in ``only``);
    ``t``: the chunk's region, from :func:`_region_of`.  By region, the pages
    installed; and the pages the kernel had no memory for (``ENOMEM``)."""
    done: dict[int, list[int]] = {}
    short: list[int] = []
    resident = t.resident()
    for k, page in enumerate(chunk.pages.tolist()):
        if resident[page] or (only is not None and page not in only):
            continue
        try:
            copy_page(tracker.uffd, t, page, chunk.page(k), wp=wp)
        except FileExistsError:
            continue  # filled behind the uffd since: newer than ours
        except KernelError as e:
            if e.errno == errno.ENOMEM:
                short.append(page)
                continue
            log.error(
                "a page held across a punch could not be put back",
                vm_id=tracker.vm_id,
                region=chunk.region,
                page=page,
                error=str(e),
            )
            continue
        done.setdefault(chunk.region, []).append(page)
    return done, short


def _install_from_memory(
    tracker: VmTracker,
    t: TrackedRegion,
    chunk: HeldChunk,
    pages: list[int],
    fds: Sequence[int],
    *,
    wp: bool,
    done: dict[int, list[int]],
) -> None:
    """Install ``pages`` of ``chunk``, which met no memory while its pipes held
    them, once the pipes (``fds``) are emptied; into ``done``.

    On hugetlbfs the punched pages the pipes hold may be all the pool has.
    Emptying the pipes gives them back, whoever else holds the pipes open (the
    fd store, a VMM that kept them), and leaves the bytes in ``chunk`` alone:
    a crash before they are installed loses them.  A page still without
    memory is served from its stored copy, without a raced write it may have
    had, and logged as such.
    """
    try:
        for fd in fds:
            empty_pipe(fd)
    except KernelError as e:
        log.error("emptying parked pipes failed", vm_id=tracker.vm_id, error=str(e))
    more, pages = _install(tracker, t, chunk, wp=wp, only=set(pages))
    for region, installed in more.items():
        done.setdefault(region, []).extend(installed)
    if pages:
        log.error(
            "no memory to put back pages held across a punch: they are served from "
            "storage, without any write that raced their eviction",
            vm_id=tracker.vm_id,
            region=chunk.region,
            pages=pages,
        )
