"""The control protocol: one JSON object per line each way (docs/control.md).

A request names a ``command`` and the protocol ``version``; the reply is
``{"version": 1, "ok": true, "result": {...}}`` or
``{"version": 1, "ok": false, "error": {"code": ..., "message": ...}}``.
A connection may carry several requests; each gets one reply, in order.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Final

CONTROL_VERSION: Final = 1
MAX_LINE_BYTES: Final = 64 << 10
# The hand-off protocol's vm_id pattern (wsd.vmm.protocol.HandoffRequest).
_VM_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")


class Command(enum.StrEnum):
    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    EVICT = "evict"


_NEEDS_VM: Final = frozenset({Command.PAUSE, Command.RESUME, Command.EVICT})


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    INVALID = "invalid_request"
    UNKNOWN_COMMAND = "unknown_command"
    FORBIDDEN = "forbidden"
    UNKNOWN_VM = "unknown_vm"
    CANNOT_EVICT = "cannot_evict"
    BUSY = "busy"
    SESSION_ENDED = "session_ended"
    INTERNAL = "internal"


class ControlError(Exception):
    """A request wsd refused or could not carry out; the message says exactly why."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self) -> dict[str, Any]:
        return error_reply(self.code, self.message)


@dataclass(frozen=True)
class Request:
    command: Command
    vm_id: str | None = None
    max_bytes: int | None = None
    """``evict`` only: evict at most this many bytes (None: no bound)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": CONTROL_VERSION, "command": str(self.command)}
        if self.vm_id is not None:
            out["vm_id"] = self.vm_id
        if self.max_bytes is not None:
            out["max_bytes"] = self.max_bytes
        return out


def encode(message: dict[str, Any]) -> bytes:
    """One line of the protocol."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def ok_reply(result: dict[str, Any]) -> dict[str, Any]:
    return {"version": CONTROL_VERSION, "ok": True, "result": result}


def error_reply(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {
        "version": CONTROL_VERSION,
        "ok": False,
        "error": {"code": str(code), "message": message},
    }


def parse_request(line: bytes) -> Request:
    """A request line as a :class:`Request`; ControlError names the field at fault."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(ErrorCode.BAD_JSON, f"the request is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ControlError(ErrorCode.INVALID, "the request must be a JSON object")
    version = data.get("version")
    if version != CONTROL_VERSION or isinstance(version, bool):
        raise ControlError(
            ErrorCode.BAD_VERSION,
            f"'version' is {version!r}; this wsd speaks control protocol {CONTROL_VERSION}",
        )
    raw_command = data.get("command")
    known = [c.value for c in Command]
    if raw_command not in known:
        raise ControlError(
            ErrorCode.UNKNOWN_COMMAND,
            f"'command' is {raw_command!r}; known commands: {', '.join(known)}",
        )
    command = Command(str(raw_command))
    allowed = {"version", "command"}
    vm_id = max_bytes = None
    if command in _NEEDS_VM:
        allowed.add("vm_id")
        vm_id = data.get("vm_id")
        if not isinstance(vm_id, str) or not _VM_ID.match(vm_id):
            raise ControlError(
                ErrorCode.INVALID,
                f"{command} needs 'vm_id', a VM's id as its VMM handed it off; got {vm_id!r}",
            )
    if command is Command.EVICT:
        allowed.add("max_bytes")
        max_bytes = data.get("max_bytes")
        if max_bytes is not None and (
            not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0
        ):
            raise ControlError(
                ErrorCode.INVALID,
                f"'max_bytes' is {max_bytes!r}; it must be a positive integer or absent",
            )
    extra = sorted(set(data) - allowed)
    if extra:
        raise ControlError(
            ErrorCode.INVALID, f"{command} takes no {', '.join(repr(k) for k in extra)}"
        )
    return Request(command, vm_id, max_bytes)


def parse_reply(line: bytes) -> dict[str, Any]:
    """The ``result`` of a reply line; raises the ControlError an error reply carries."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(ErrorCode.BAD_JSON, f"wsd's reply is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ControlError(ErrorCode.INVALID, f"wsd's reply is not a control reply: {data!r}")
    if not data["ok"]:
        error = data.get("error") or {}
        raise ControlError(
            str(error.get("code", ErrorCode.INTERNAL)), str(error.get("message", data))
        )
    result = data.get("result")
    if not isinstance(result, dict):
        raise ControlError(ErrorCode.INVALID, f"wsd's reply has no result object: {data!r}")
    return result
