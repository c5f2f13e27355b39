"""Hand-offs on behalf of another process (``"on_behalf": true``, sent by ``wsd attach``).

A VMM normally hands off its own memory, and ``vmm_pid`` must be the
connecting process.  ``wsd attach`` adopts an unmodified QEMU: it injects the
userfaultfd into QEMU with ptrace and takes QEMU's memfds, so the connecting
process is not QEMU.  Such a hand-off claims another process's memory, so it
is accepted only when both hold:

- the peer is root or wsd's own user: a process that could ptrace the VMM
  and take these fds itself (``access.allowed_users`` and ``allowed_groups``
  admit plain hand-offs, not these);
- ``vmm_pid`` really maps every region: ``/proc/<vmm_pid>/maps`` shows a
  shared mapping at ``host_virt_addr`` covering ``size`` bytes of that very
  memfd (device and inode) at that offset.  So a region cannot point wsd's
  tracking at another process's addresses or at another file.
"""

from __future__ import annotations

from pathlib import Path

from wsd.access import AccessPolicy, PeerCred
from wsd.kernel import KernelError, file_id
from wsd.kernel.procfs import PROC, read_maps

from .protocol import ErrorCode, HandoffError, HandoffRequest

__all__ = ["check_on_behalf"]


def check_on_behalf(
    req: HandoffRequest,
    fds: list[int],
    peer: PeerCred,
    access: AccessPolicy,
    *,
    proc: Path = PROC,
) -> None:
    """Raise ``forbidden`` unless ``peer`` may hand off ``req.vmm_pid``'s memory."""
    if not access.is_privileged(peer):
        raise HandoffError(
            ErrorCode.FORBIDDEN,
            f"peer pid {peer.pid} (uid {peer.uid}) may not hand off memory on behalf of pid "
            f"{req.vmm_pid}: only root and wsd's own user may",
            "on_behalf",
        )
    try:
        mappings = read_maps(req.vmm_pid, proc=proc)
    except OSError as e:
        raise HandoffError(
            ErrorCode.FORBIDDEN,
            f"cannot read the mappings of pid {req.vmm_pid} to check the regions: {e}",
            "vmm_pid",
        ) from e
    for i, r in enumerate(req.regions):
        try:
            fid = file_id(fds[r.fd_index])
        except KernelError as e:
            raise HandoffError(ErrorCode.BAD_FDS, f"regions[{i}]: {e}", f"regions[{i}]") from e
        if not any(
            m.covers(r.host_virt_addr, r.size)
            and m.shared
            and m.file == fid
            and m.offset + (r.host_virt_addr - m.start) == r.offset
            for m in mappings
        ):
            raise HandoffError(
                ErrorCode.FORBIDDEN,
                f"regions[{i}]: pid {req.vmm_pid} does not map its memfd ({fid}) shared at "
                f"[{r.host_virt_addr:#x}, {r.host_virt_addr + r.size:#x}) "
                f"with offset {r.offset:#x}",
                f"regions[{i}]",
            )
