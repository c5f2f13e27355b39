"""Guest memory and userfaultfds that sessions hold: no two may share either.

Two regions backed by the same range of one memfd (sent twice under two
fd_indexes, or handed off by two sessions) would each be evicted by
evidence of their own mapping's accesses.  One region's eviction punches the
other's pages, whose next touch raises a MISSING fault that its session
takes for a page never populated: zeros.  Two sessions reading one uffd
would each get some of the other's fault messages, and drop them (a fault
outside every region of theirs), leaving those vCPUs blocked for good.

Files are told apart by device and inode.  Every userfaultfd has an inode of
its own (a "secure" anonymous inode, Linux 5.12 and later; wsd needs 6.7 for
``PAGEMAP_SCAN``), so a uffd is recognised however often it was duplicated
or passed along.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from wsd.kernel import KernelError, file_id
from wsd.kernel.procfs import FileId

from .protocol import ErrorCode, HandoffError, Region

__all__ = ["Claim", "check_unclaimed"]

Span = tuple[FileId, int, int]
"""A range of a file: the file, and its start and end in bytes."""


@dataclass(frozen=True, eq=False)
class Claim:
    """What one session (or a hand-off on its way to becoming one) holds."""

    vm_id: str
    uffd: FileId
    memory: tuple[Span, ...]
    """Per region, in order: its memfd, and the range of it (start, end) in bytes."""

    @classmethod
    def take(cls, vm_id: str, uffd_fd: int, regions: Sequence[tuple[Region, int]]) -> Claim:
        """The claim of a uffd and ``(region, memfd fd)`` pairs; HandoffError
        (``bad_fds``) naming an fd that cannot be looked at."""
        try:
            uffd = file_id(uffd_fd)
        except KernelError as e:
            raise HandoffError(ErrorCode.BAD_FDS, f"uffd: {e}", "uffd.fd_index") from e
        memory = []
        for i, (r, fd) in enumerate(regions):
            try:
                memfd = file_id(fd)
            except KernelError as e:
                raise HandoffError(ErrorCode.BAD_FDS, f"regions[{i}]: {e}", f"regions[{i}]") from e
            memory.append((memfd, r.offset, r.offset + r.size))
        return cls(vm_id, uffd, tuple(memory))


def check_unclaimed(claim: Claim, held: Iterable[Claim]) -> None:
    """Raise HandoffError (``bad_fds``) naming the first of ``claim``'s uffd or
    memory ranges that it shares with itself or with a claim in ``held``."""
    if hit := next(_overlaps(claim.memory, claim.memory, earlier_only=True), None):
        i, j, file, shared = hit
        raise HandoffError(
            ErrorCode.BAD_FDS,
            f"regions[{i}] and regions[{j}] are backed by the same range of one memfd "
            f"({file}, {shared}), sent under two fd_indexes",
            f"regions[{i}]",
        )
    for other in held:
        if other.uffd == claim.uffd:
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"the uffd is the one VM {other.vm_id!r}'s session reads; "
                "each VM needs a userfaultfd of its own",
                "uffd.fd_index",
            )
        if hit := next(_overlaps(claim.memory, other.memory), None):
            i, j, file, shared = hit
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"regions[{i}]: its memfd ({file}) range {shared} is guest memory "
                f"of VM {other.vm_id!r} too (its regions[{j}])",
                f"regions[{i}]",
            )


def _overlaps(
    mine: Sequence[Span], theirs: Sequence[Span], *, earlier_only: bool = False
) -> Iterator[tuple[int, int, FileId, str]]:
    """``(i, j, file, range)`` for every span ``i`` of ``mine`` that shares a
    range of its file with span ``j`` of ``theirs`` (``j < i`` if ``earlier_only``)."""
    for i, (file, start, end) in enumerate(mine):
        for j, (other, s, e) in enumerate(theirs[:i] if earlier_only else theirs):
            low, high = max(start, s), min(end, e)
            if other == file and low < high:
                yield i, j, file, f"[{low:#x}, {high:#x})"
