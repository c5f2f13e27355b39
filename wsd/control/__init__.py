"""The control socket and the operator's commands (``wsd status``, ``wsd vm ...``).

:mod:`.protocol` is the wire format (docs/control.md), :mod:`.server` serves
it on the daemon's loop, :mod:`.commands` carries requests out against the
daemon, :mod:`.client` and :mod:`.cli` are the command line's side.

Only the wire format is exported here: the daemon's side is imported from
its modules, so that ``wsd status`` does not load the daemon.
"""

from .protocol import Command, ControlError, ErrorCode, Request

__all__ = ["Command", "ControlError", "ErrorCode", "Request"]
