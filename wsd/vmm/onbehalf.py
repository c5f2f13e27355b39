"""Hand-offs on behalf of another process (``"on_behalf": true``, sent by ``wsd attach``).

A VMM normally hands off its own memory, and ``vmm_pid`` must be the
connecting process.  ``wsd attach`` adopts an unmodified QEMU: it injects the
userfaultfd into QEMU with ptrace and takes QEMU's memfds, so the connecting
process is not QEMU.  Such a hand-off claims another process's memory, so it
is accepted only when both hold:

- the peer is root or wsd's own user: a process that could ptrace the VMM
  and take these fds itself (``access.allowed_users`` and ``allowed_groups``
  admit plain hand-offs, not these);
- ``vmm_pid`` really maps every region as described (``mappings.py``), as for
  every hand-off; a mismatch here is ``forbidden``, since the region would
  point wsd's tracking at another process's addresses or at another file.
"""

from __future__ import annotations

from wsd.access import AccessPolicy, PeerCred

from .protocol import ErrorCode, HandoffError, HandoffRequest

__all__ = ["check_on_behalf"]


def check_on_behalf(req: HandoffRequest, peer: PeerCred, access: AccessPolicy) -> None:
    """Raise ``forbidden`` unless ``peer`` may hand off another process's memory."""
    if not access.is_privileged(peer):
        raise HandoffError(
            ErrorCode.FORBIDDEN,
            f"peer pid {peer.pid} (uid {peer.uid}) may not hand off memory on behalf of pid "
            f"{req.vmm_pid}: only root and wsd's own user may",
            "on_behalf",
        )
