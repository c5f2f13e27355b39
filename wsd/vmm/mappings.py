"""Check that the VMM really maps each region's memfd where the hand-off says.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsd.kernel import KernelError, file_id
from wsd.kernel.procfs import PROC, FileId, Mapping, read_maps

from .protocol import ErrorCode, HandoffError, HandoffRequest, Region

__all__ = ["check_mappings"]


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
