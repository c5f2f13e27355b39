"""The hand-off message a VMM sends with its userfaultfd and guest-RAM fds.

Wire format (docs/protocol.md): one compact JSON object terminated by ``\\n``
on a UNIX stream socket, the fds attached with ``SCM_RIGHTS`` to the bytes of
the message.  wsd answers with one JSON line: ``accepted`` or ``error``.

The fields follow the hand-off proposed for Cloud Hypervisor
(``UffdHandoffMessage``: ``type``, ``version``, ``vmm_pid``, regions sorted by
guest physical address).  Regions in Firecracker's ``GuestRegionUffdMapping``
shape (``base_host_virt_addr``, ``size``, ``offset``, ``page_size``) are
accepted too.  Validation that needs only the message lives here; checks of
the fds themselves (is it a uffd, is the region inside the memfd) are in
:mod:`wsd.vmm.fdcheck`.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_REGIONS = 512
# One uffd plus one fd per backing file; below the kernel's SCM_MAX_FD (253).
MAX_FDS = 64
PAGE_SIZES = (4096, 2 << 20, 1 << 30)

# Addresses, sizes and offsets are u64 in the kernel; bounding them here keeps
# arithmetic on hostile numbers cheap and error messages short.
U64 = Annotated[int, Field(ge=0, lt=1 << 64)]
POSITIVE_U64 = Annotated[int, Field(gt=0, lt=1 << 64)]


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    INVALID = "invalid_message"
    BAD_FDS = "bad_fds"
    BAD_REGION = "bad_region"
    UNSUPPORTED = "unsupported"
    DUPLICATE = "duplicate_vm"
    NO_SESSION = "no_session"
    FORBIDDEN = "forbidden"
    LIMIT = "limit_exceeded"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class HandoffError(Exception):
    """A hand-off wsd refuses; the message names exactly what was wrong."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def reply(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.field:
            err["field"] = self.field
        return {"type": "error", "version": PROTOCOL_VERSION, "error": err}


class UffdState(enum.StrEnum):
    RAW = "raw"  # created, no UFFDIO_API yet: wsd negotiates and registers
    REGISTERED = "registered"  # the VMM did UFFDIO_API and REGISTER itself


RegisterModeName = Literal["MISSING", "WP", "MINOR", "RWP"]

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class UffdSpec(BaseModel):
    model_config = _STRICT

    fd_index: Annotated[int, Field(ge=0, lt=MAX_FDS)] = 0
    state: UffdState = UffdState.RAW
    # For REGISTERED: the features UFFDIO_API enabled and the register mode used.
    features: U64 | None = None
    register_mode: list[RegisterModeName] | None = None

    @model_validator(mode="after")
    def _registered_needs_details(self) -> UffdSpec:
        if self.state is UffdState.REGISTERED and (self.features is None or not self.register_mode):
            raise ValueError("a registered uffd must state its 'features' and 'register_mode'")
        if self.state is UffdState.RAW and (self.features is not None or self.register_mode):
            raise ValueError("'features' and 'register_mode' only go with state 'registered'")
        return self


def _check_page_size(v: int) -> int:
    if v not in PAGE_SIZES:
        raise ValueError(f"page_size {v} is not one of {', '.join(map(str, PAGE_SIZES))}")
    return v


class Region(BaseModel):
    """One guest memory region (Cloud Hypervisor shape)."""

    model_config = _STRICT

    guest_phys_addr: U64
    host_virt_addr: POSITIVE_U64
    size: POSITIVE_U64
    fd_index: Annotated[int, Field(ge=0, lt=MAX_FDS)]
    offset: U64 = 0
    page_size: POSITIVE_U64 = 4096
    dma_pinned: bool = False

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, v: int) -> int:
        return _check_page_size(v)

    @model_validator(mode="after")
    def _aligned(self) -> Region:
        for name in ("guest_phys_addr", "host_virt_addr", "size", "offset"):
            if getattr(self, name) % self.page_size:
                raise ValueError(
                    f"{name} {getattr(self, name):#x} is not a multiple of page_size "
                    f"{self.page_size:#x}"
                )
        return self

    @property
    def host_end(self) -> int:
        return self.host_virt_addr + self.size

    @property
    def hugetlb(self) -> bool:
        """Backed by hugetlbfs: any page size but the base one (no ``write()``,
        no ``SEEK_HOLE``, no ``UFFDIO_ZEROPAGE``, a pool of its own)."""
        return self.page_size != PAGE_SIZES[0]


class FirecrackerRegion(BaseModel):
    """Firecracker's ``GuestRegionUffdMapping``; converted to :class:`Region`."""

    model_config = _STRICT

    base_host_virt_addr: POSITIVE_U64
    size: POSITIVE_U64
    offset: U64
    page_size: POSITIVE_U64 = 4096
    page_size_kib: POSITIVE_U64 | None = None  # older Firecracker releases
    fd_index: Annotated[int, Field(ge=0, lt=MAX_FDS)] = 1
    guest_phys_addr: U64 | None = None

    def to_region(self) -> Region:
        page_size = self.page_size_kib * 1024 if self.page_size_kib else self.page_size
        return Region(
            # Firecracker lays guest memory out in one file, so the file
            # offset doubles as the guest physical address when none is given.
            guest_phys_addr=self.offset if self.guest_phys_addr is None else self.guest_phys_addr,
            host_virt_addr=self.base_host_virt_addr,
            size=self.size,
            fd_index=self.fd_index,
            offset=self.offset,
            page_size=page_size,
        )


def _is_firecracker(v: object) -> bool:
    return isinstance(v, dict) and "base_host_virt_addr" in v


class HandoffRequest(BaseModel):
    model_config = _STRICT

    type: Literal["handoff", "reattach"]
    """``reattach``: the same VM again, to a restarted wsd (see docs/protocol.md)."""
    version: int
    vm_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")]
    # pid_t is an int32; the kernel's pids stay below PID_MAX_LIMIT (2^22).
    vmm_pid: Annotated[int, Field(gt=0, lt=1 << 31)]
    on_behalf: bool = False
    """The sender is not the VMM but acts for it (``wsd attach``); see docs/protocol.md."""
    uffd: UffdSpec = UffdSpec()
    regions: Annotated[list[Region], Field(min_length=1, max_length=MAX_REGIONS)]
    held: list[Annotated[int, Field(ge=0, lt=MAX_FDS)]] = []
    """A ``reattach``'s pipes, by part: the fd_index of each pipe the dead wsd
    gave the VMM to keep (``keep`` messages, docs/protocol.md)."""

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        if len(v) > MAX_REGIONS:
            raise ValueError(f"{len(v)} regions exceed the limit of {MAX_REGIONS}")
        # Strict JSON validation gives plain dicts here; build Regions so the
        # Firecracker shape goes through the same checks, and keep the index.
        out = []
        for i, r in enumerate(v):
            if not isinstance(r, dict):
                raise ValueError(f"regions[{i}]: must be an object")
            try:
                if _is_firecracker(r):
                    out.append(FirecrackerRegion.model_validate(r).to_region())
                else:
                    out.append(Region.model_validate(r))
            except ValidationError as e:
                raise ValueError(f"regions[{i}]{_describe(e, nested=True)}") from None
        return out

    @model_validator(mode="after")
    def _layout(self) -> HandoffRequest:
        regions = self.regions
        for i, r in enumerate(regions):
            if r.fd_index == self.uffd.fd_index:
                raise ValueError(f"regions[{i}].fd_index {r.fd_index} is the uffd's fd_index")
        if self.held and self.type != "reattach":
            raise ValueError("held: only a reattach gives back pipes wsd asked to keep")
        taken = {self.uffd.fd_index, *(r.fd_index for r in regions)}
        for k, index in enumerate(self.held):
            if index in taken:
                raise ValueError(f"held[{k}]: fd_index {index} is used twice")
            taken.add(index)
        for i in range(1, len(regions)):
            if regions[i].guest_phys_addr < regions[i - 1].guest_phys_addr:
                raise ValueError(f"regions[{i}] is not sorted by guest_phys_addr")
        _no_overlap(
            [(r.guest_phys_addr, r.size, i) for i, r in enumerate(regions)],
            "in guest memory (guest_phys_addr)",
        )
        _no_overlap(
            [(r.host_virt_addr, r.size, i) for i, r in enumerate(regions)],
            "in the VMM's address space (host_virt_addr)",
        )
        for fd in {r.fd_index for r in regions}:
            _no_overlap(
                [(r.offset, r.size, i) for i, r in enumerate(regions) if r.fd_index == fd],
                f"in the file of fd_index {fd} (offset)",
            )
        return self

    @property
    def fd_count(self) -> int:
        """How many fds the message must carry: every index up to the highest one."""
        return max([self.uffd.fd_index, *(r.fd_index for r in self.regions), *self.held]) + 1


def _no_overlap(spans: list[tuple[int, int, int]], where: str) -> None:
    """Raise naming the first of (start, size, region index) spans that overlaps another."""
    ordered = sorted(spans)
    for (start_a, size_a, a), (start_b, _, b) in itertools.pairwise(ordered):
        if start_b < start_a + size_a:
            raise ValueError(f"regions[{max(a, b)}] overlaps regions[{min(a, b)}] {where}")


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "list", "dict") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_request(raw: bytes) -> HandoffRequest:
    """Decode and validate one message; raise HandoffError naming the problem."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise HandoffError(ErrorCode.TOO_LARGE, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
    try:
        # Strict UTF-8 first: json.loads would also take UTF-16 and UTF-32,
        # which the protocol (and pydantic, which parses the bytes again) does not.
        obj = json.loads(raw.decode(), parse_constant=_reject_constant)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers of
    # more than 4300 digits; RecursionError, arrays nested thousands deep.
    except (ValueError, RecursionError) as e:
        # Python's advice on its own integer limit means nothing to a client.
        why = str(e).partition("; use sys.set_int_max_str_digits()")[0]
        raise HandoffError(ErrorCode.BAD_JSON, f"message is not valid JSON: {why}") from None
    if not isinstance(obj, dict):
        raise HandoffError(
            ErrorCode.INVALID, f"message must be a JSON object, not {type(obj).__name__}"
        )
    if obj.get("type") not in ("handoff", "reattach"):
        raise HandoffError(
            ErrorCode.INVALID, f"unknown message type {_brief(obj.get('type'))}", "type"
        )
    if obj.get("version") != PROTOCOL_VERSION:
        raise HandoffError(
            ErrorCode.BAD_VERSION,
            f"unsupported protocol version {_brief(obj.get('version'))}; this wsd speaks "
            f"version {PROTOCOL_VERSION}",
            "version",
        )
    try:
        return HandoffRequest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # e.g. a lone surrogate escape, "\ud800"
            why = str(first["msg"]).removeprefix("Invalid JSON: ")
            raise HandoffError(ErrorCode.BAD_JSON, f"message is not valid JSON: {why}") from None
        text = _describe(e)
        # Every message starts with the field it blames ("regions[1].size: ...",
        # "regions[1] overlaps regions[0] ...").
        head = _FIELD.match(text)
        code = ErrorCode.BAD_REGION if text.startswith("regions") else ErrorCode.INVALID
        raise HandoffError(code, text, head.group(0) if head else None) from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _brief(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut short: a hostile value must not make a huge reply or log line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _json_brief(value: object, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # bytes, or an int too long to print
        text = repr(value)
    return text[:limit]


_FIELD = re.compile(r"^[a-z_]+(?:\[\d+\]|\.[a-z_]+)*(?=[: ])")


def _describe(e: ValidationError, nested: bool = False) -> str:
    """One line for the first error: where it is, what is wrong, what was given."""
    first = e.errors()[0]
    where = _location(first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if msg.startswith("regions["):
        return msg
    if first.get("input") is not None and first["type"] not in ("value_error", "missing"):
        msg += f" (got {_json_brief(first['input'])})"
    if nested:
        return f".{where}: {msg}" if where else f": {msg}"
    return f"{where}: {msg}" if where else msg
