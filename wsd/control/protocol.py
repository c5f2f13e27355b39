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
# More than any host's memory; a bound keeps a 4000-digit number out of the
# log lines and replies that echo it.
MAX_EVICT_BYTES: Final = (1 << 63) - 1
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

    def __init__(self, code: ErrorCode | str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        """The request's field at fault, which the message names; None: none in particular."""

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
        # Strict UTF-8: json.loads would also take UTF-16, UTF-32 and a BOM.
        data = json.loads(line.decode(), parse_constant=_reject_constant)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers of
    # more than 4300 digits; RecursionError, arrays nested thousands deep.
    except (ValueError, RecursionError) as e:
        # Python's advice on its own integer limit means nothing to a client.
        why = str(e).partition("; use sys.set_int_max_str_digits()")[0]
        raise ControlError(
            ErrorCode.BAD_JSON, f"the request is not valid JSON: {_cut(why)}"
        ) from None
    if not isinstance(data, dict):
        raise ControlError(
            ErrorCode.INVALID, f"the request must be a JSON object, not {_json_type(data)}"
        )
    version = data.get("version")
    # Exactly the integer: neither true nor 1.0.
    if type(version) is not int or version != CONTROL_VERSION:
        raise ControlError(
            ErrorCode.BAD_VERSION,
            f"'version' is {_brief(version)}; this wsd speaks control protocol {CONTROL_VERSION}",
            "version",
        )
    raw_command = data.get("command")
    known = [c.value for c in Command]
    if not isinstance(raw_command, str) or raw_command not in known:
        raise ControlError(
            ErrorCode.UNKNOWN_COMMAND,
            f"'command' is {_brief(raw_command)}; known commands: {', '.join(known)}",
            "command",
        )
    command = Command(raw_command)
    allowed = {"version", "command"}
    vm_id = max_bytes = None
    if command in _NEEDS_VM:
        allowed.add("vm_id")
        vm_id = data.get("vm_id")
        if not isinstance(vm_id, str) or not _VM_ID.match(vm_id):
            raise ControlError(
                ErrorCode.INVALID,
                f"{command} needs 'vm_id', a VM's id as its VMM handed it off; got {_brief(vm_id)}",
                "vm_id",
            )
    if command is Command.EVICT:
        allowed.add("max_bytes")
        max_bytes = data.get("max_bytes")
        if max_bytes is not None and (
            type(max_bytes) is not int or not 0 < max_bytes <= MAX_EVICT_BYTES
        ):
            raise ControlError(
                ErrorCode.INVALID,
                f"'max_bytes' is {_brief(max_bytes)}; it must be a positive integer "
                f"up to 2**63 - 1, or absent",
                "max_bytes",
            )
    extra = sorted(set(data) - allowed)
    if extra:
        names = ", ".join(_brief(k) for k in extra[:3])
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ControlError(ErrorCode.INVALID, f"{command} takes no {names}{more}", extra[0])
    return Request(command, vm_id, max_bytes)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _brief(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: a hostile value must not make a huge reply or log line."""
    return _cut(repr(value), limit)


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


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
