"""Check that the VMM really maps each region's memfd where the hand-off says,
and that the userfaultfd it handed off is its own.

The daemon checks a VMM's own hand-off (``bad_region``) in the worker thread
that starts its tracker, but not a reattach, whose regions are those first
handed off and may have moved or gone since.  The server checks every
hand-off sent on behalf of a VMM (``forbidden``, ``onbehalf.py``).

wsd tracks a region at ``host_virt_addr`` in the VMM and reads, stores and
punches its pages through the memfd at ``offset``.  If the two disagree (a
VMM that mixed up two regions' fds or offsets), wsd would evict one piece of
memory on the evidence of another's accesses, and the guest would read the
punched pages back from the wrong place, or as zeros.  So every region must
be covered, without a gap, by shared mappings of that very memfd (device and
inode), each at the file offset the region implies.  Several adjacent
mappings may cover one region (a VMM's ``madvise`` or ``mprotect`` of part
of it splits the mapping).

A userfaultfd belongs to the address space of the process that created it,
and ``UFFDIO_REGISTER`` registers ranges there.  A uffd made by another
process that maps the memfd at the same addresses (a child forked by the
VMM, say) registers without an error, but in that process: the VMM's own
accesses then go untrapped, and its first touch of an evicted page reads
zeros from the punched memfd.  Nothing in the uffd names its address space,
so after registering, :func:`check_registered` looks for the registration
where it must show, in the VMM's ``VmFlags``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsd.kernel import KernelError, file_id
from wsd.kernel.procfs import PROC, FileId, Mapping, SmapsInfo, read_maps, read_smaps

from .protocol import ErrorCode, HandoffError, HandoffRequest, Region

__all__ = ["check_mappings", "check_registered"]


def check_mappings(
    req: HandoffRequest, fds: list[int], *, code: ErrorCode, proc: Path = PROC
) -> None:
    """Raise HandoffError (``code``) naming the first region ``req.vmm_pid`` does not
    map as described, and where."""
    try:
        mappings = read_maps(req.vmm_pid, proc=proc)
    except OSError as e:
        raise HandoffError(
            code,
            f"cannot read the mappings of pid {req.vmm_pid} to check the regions: {e}",
            "vmm_pid",
        ) from e
    for i, r in enumerate(req.regions):
        try:
            fid = file_id(fds[r.fd_index])
        except KernelError as e:
            raise HandoffError(ErrorCode.BAD_FDS, f"regions[{i}]: {e}", f"regions[{i}]") from e
        problem = _mismatch(r, fid, mappings)
        if problem:
            raise HandoffError(
                code,
                f"regions[{i}]: pid {req.vmm_pid} does not map its memfd ({fid}) shared at "
                f"[{r.host_virt_addr:#x}, {r.host_end:#x}) with offset {r.offset:#x}: "
                f"{problem}",
                f"regions[{i}]",
            )


def _mismatch(r: Region, fid: FileId, mappings: Sequence[Mapping]) -> str | None:
    """What is wrong at the first address of ``r`` that is not mapped as it says."""
    address = r.host_virt_addr
    for m in mappings:  # in address order
        if m.end <= address:
            continue
        if m.start > address:
            break
        if not m.shared:
            return f"{address:#x} is in a private mapping"
        if m.file != fid:
            return f"{address:#x} maps another file ({m.path or 'anonymous memory'})"
        offset = m.offset + (address - m.start)
        if offset != r.offset + (address - r.host_virt_addr):
            return f"{address:#x} maps the memfd at offset {offset:#x}"
        address = m.end
        if address >= r.host_end:
            return None
    return f"nothing is mapped at {address:#x}"


def check_registered(req: HandoffRequest, *, proc: Path = PROC) -> None:
    """Raise HandoffError (``bad_fds``) if a region, once registered with the handed-off
    uffd, shows no userfaultfd ``VmFlags`` in ``req.vmm_pid``: the uffd is another
    process's.

    Reads ``smaps``, which costs the kernel a walk of the resident pages'
    table entries (about 6 ms per GiB here), so it belongs off the event loop.
    """
    try:
        smaps = read_smaps(req.vmm_pid, proc=proc)
    except OSError as e:
        raise HandoffError(
            ErrorCode.BAD_REGION,
            f"cannot read the smaps of pid {req.vmm_pid} to check the uffd's registration: {e}",
            "vmm_pid",
        ) from e
    for i, r in enumerate(req.regions):
        address = _first_unregistered(r, smaps)
        if address is not None:
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"uffd.fd_index {req.uffd.fd_index}: registering regions[{i}] with it did not "
                f"register pid {req.vmm_pid}'s mapping at {address:#x} (no userfaultfd VmFlags "
                "in its smaps): the userfaultfd belongs to another process's address space; "
                "create it in the process that maps guest memory",
                "uffd.fd_index",
            )


def _first_unregistered(r: Region, smaps: dict[int, SmapsInfo]) -> int | None:
    """The start of the first mapping of ``r`` that no userfaultfd has registered."""
    for start, info in smaps.items():  # in address order
        if start < r.host_end and r.host_virt_addr < info.end and not info.uffd_flags:
            return max(start, r.host_virt_addr)
    return None
