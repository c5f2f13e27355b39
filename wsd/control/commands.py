"""What each control command does to a running daemon.

Everything here runs on the daemon's event loop and never waits on I/O,
except ``evict``, which waits (without holding anything) for the cycle task
to prepare and commit the eviction.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from .eviction import EvictionRequest
from .protocol import Command, ControlError, ErrorCode, Request
from .status import take_status

if TYPE_CHECKING:
    from wsd.daemon import Daemon, Session

__all__ = ["ControlCommands"]

log = structlog.get_logger("wsd.control")


class ControlCommands:
    """The control server's handler for one :class:`~wsd.daemon.Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.command is Command.STATUS:
            return await asyncio.to_thread(take_status(self.daemon, pid=os.getpid()))
        session = self._session(request.vm_id)
        if request.command is Command.PAUSE:
            return self._set_paused(session, True)
        if request.command is Command.RESUME:
            return self._set_paused(session, False)
        return await self._evict(session, request.max_bytes)

    def owner_uid(self, vm_id: str) -> int | None:
        """The uid VM ``vm_id``'s VMM runs as, for the control server's check; None if unknown."""
        session = self.daemon.sessions.get(vm_id)
        return None if session is None else session.owner_uid

    def _session(self, vm_id: str | None) -> Session:
        session = self.daemon.sessions.get(vm_id or "")
        if session is None:
            raise ControlError(
                ErrorCode.UNKNOWN_VM,
                f"no VM {vm_id!r} is tracked (tracked VMs: {_listed(self.daemon.sessions)})",
                "vm_id",
            )
        return session

    @staticmethod
    def _set_paused(session: Session, paused: bool) -> dict[str, Any]:
        was = session.paused
        session.paused = paused
        if was != paused:
            log.info("eviction paused" if paused else "eviction resumed", vm_id=session.vm_id)
        return {"vm_id": session.vm_id, "paused": paused, "changed": was != paused}

    async def _evict(self, session: Session, max_bytes: int | None) -> dict[str, Any]:
        vm_id = session.vm_id
        if session.ctx.store is None:
            raise ControlError(
                ErrorCode.CANNOT_EVICT,
                f"VM {vm_id!r} cannot evict: wsd runs without storage (no [storage] table)",
            )
        if not session.ctx.config.enabled:
            raise ControlError(
                ErrorCode.CANNOT_EVICT,
                f"VM {vm_id!r} cannot evict: eviction is disabled for it (evictor.enabled = false)",
            )
        reasons = session.evictor.reasons
        if all(reasons):
            why = "; ".join(f"region {i}: {r}" for i, r in enumerate(reasons))
            raise ControlError(ErrorCode.CANNOT_EVICT, f"VM {vm_id!r} cannot evict: {why}")
        if session.eviction is not None:
            raise ControlError(
                ErrorCode.BUSY,
                f"an eviction of VM {vm_id!r} is already under way; ask again once it answered",
            )
        request = session.eviction = EvictionRequest(vm_id, max_bytes)
        log.info("eviction requested", vm_id=vm_id, max_bytes=max_bytes)
        # A client that goes away must not cancel the request: the cycle task
        # carries it out regardless.
        return await asyncio.shield(request.done)


# Enough names to spot a typo; a daemon with hundreds of VMs must not make
# every such reply kilobytes long.
_LISTED_VMS = 8


def _listed(vm_ids: Iterable[str]) -> str:
    names = sorted(vm_ids)
    if not names:
        return "none"
    more = f" and {len(names) - _LISTED_VMS} more" if len(names) > _LISTED_VMS else ""
    return ", ".join(names[:_LISTED_VMS]) + more
