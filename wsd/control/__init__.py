"""The control socket and the operator's commands (``wsd status``, ``wsd vm ...``).

:mod:`.protocol` is the wire format (docs/control.md), :mod:`.server` serves
it on the daemon's loop, :mod:`.commands` carries requests out against the
daemon, :mod:`.client` and :mod:`.cli` are the command line's side.
"""

from .commands import ControlCommands
from .eviction import EvictionRequest
from .protocol import Command, ControlError, ErrorCode, Request
from .server import ControlServer

__all__ = [
    "Command",
    "ControlCommands",
    "ControlError",
    "ControlServer",
    "ErrorCode",
    "EvictionRequest",
    "Request",
]
