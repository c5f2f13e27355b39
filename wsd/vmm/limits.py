"""How much one client and all clients together may ask of the hand-off socket.

Each limit bounds memory or time an unprivileged (but allowed) VMM, or a
misbehaving one, could make wsd spend.  Refusals name the limit's config key
(``limits.…``) so an operator knows what to raise.
"""

from __future__ import annotations

from pydantic import BaseModel, ByteSize, ConfigDict, Field

from .protocol import MAX_REGIONS, ErrorCode, HandoffError, HandoffRequest


class HandoffLimits(BaseModel):
    """The ``[limits]`` table of the configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """A client must deliver its whole message within this time of connecting."""
    max_pending_connections: int = Field(default=64, ge=1, le=4096)
    """Connections that have not finished their hand-off yet; more are refused at once."""
    max_sessions: int = Field(default=256, ge=1)
    """VMs wsd manages at the same time."""
    max_regions_per_session: int = Field(default=MAX_REGIONS, ge=1, le=MAX_REGIONS)
    """Regions one hand-off may carry (the protocol allows at most 512)."""
    max_guest_bytes_per_session: ByteSize = Field(default=ByteSize(16 << 40), gt=0)
    """Total size of one VM's regions."""


def check_request(req: HandoffRequest, limits: HandoffLimits) -> None:
    """Refuse a well-formed hand-off that asks for more than one session may have."""
    if len(req.regions) > limits.max_regions_per_session:
        raise HandoffError(
            ErrorCode.LIMIT,
            f"{len(req.regions)} regions exceed limits.max_regions_per_session "
            f"({limits.max_regions_per_session})",
            "regions",
        )
    total = sum(r.size for r in req.regions)
    if total > limits.max_guest_bytes_per_session:
        raise HandoffError(
            ErrorCode.LIMIT,
            f"the regions add up to {total} bytes, more than "
            f"limits.max_guest_bytes_per_session ({int(limits.max_guest_bytes_per_session)})",
            "regions",
        )
