"""userfaultfd(2): opening, feature negotiation, ranges ioctls and messages.

Thin and policy-free: each method is one ioctl with typed arguments, and each
failure raises a :class:`~wsd.kernel.errors.KernelError` naming the ioctl, the
errno and the range.  What to register, when to protect and how to react to a
fault is decided in wsd.tracker and wsd.evictor.

A uffd is bound to the mm of the process that *created* it, not to whoever
holds the fd.  So a daemon that received the fd over SCM_RIGHTS registers,
protects and resolves faults on the VMM's addresses, and ``UFFDIO_COPY`` reads
its source from the daemon's own memory.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Self

from typing_extensions import Buffer

from . import ioctl_numbers as nr
from ._ffi import ffi, libc
from .errors import AddressRange, FeatureUnavailable, oserror
from .fds import OwnedFd
from .sysno import NR

__all__ = [
    "MSG_SIZE",
    "ApiResult",
    "EventType",
    "FaultFlag",
    "Feature",
    "ForkEvent",
    "Ioctl",
    "OpenFlag",
    "PageFault",
    "RegisterMode",
    "RemapEvent",
    "RemoveEvent",
    "UffdMessage",
    "UnmapEvent",
    "Userfaultfd",
    "decode_messages",
    "open_userfaultfd",
    "probe_api",
    "require_features",
]

UFFD_API = 0xAA


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*``: what ``UFFDIO_API`` negotiates."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16
    RWP = 1 << 17
    RWP_ASYNC = 1 << 18


# Which kernel brought each feature in, for error messages that tell an
# operator what to upgrade to.  (Mainline versions; distributions backport.)
FEATURE_REQUIREMENT: dict[Feature, str] = {
    Feature.EVENT_FORK: "Linux 4.11",
    Feature.EVENT_REMAP: "Linux 4.11",
    Feature.EVENT_REMOVE: "Linux 4.11",
    Feature.EVENT_UNMAP: "Linux 4.11",
    Feature.MISSING_HUGETLBFS: "Linux 4.11",
    Feature.MISSING_SHMEM: "Linux 4.11 with CONFIG_SHMEM",
    Feature.SIGBUS: "Linux 4.14",
    Feature.THREAD_ID: "Linux 4.14",
    Feature.MINOR_HUGETLBFS: "Linux 5.13",
    Feature.MINOR_SHMEM: "Linux 5.14",
    Feature.EXACT_ADDRESS: "Linux 5.18",
    Feature.WP_HUGETLBFS_SHMEM: "Linux 5.19 with CONFIG_PTE_MARKER_UFFD_WP",
    Feature.WP_UNPOPULATED: "Linux 6.4",
    Feature.POISON: "Linux 6.6",
    Feature.WP_ASYNC: "Linux 6.7",
    Feature.MOVE: "Linux 6.8",
    Feature.RWP: "Linux 7.3 with CONFIG_USERFAULTFD_RWP=y",
    Feature.RWP_ASYNC: "Linux 7.3 with CONFIG_USERFAULTFD_RWP=y",
}


def feature_requirement(features: Feature) -> str:
    """Name the kernel needed for ``features``, e.g. for a FeatureUnavailable."""
    needs = sorted({FEATURE_REQUIREMENT.get(f, "a newer kernel") for f in features})
    return "; ".join(needs) or "nothing"


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2
    RWP = 1 << 3


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks that ``UFFDIO_API`` and ``UFFDIO_REGISTER`` return."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    RWPROTECT = 1 << 0x09
    SET_MODE = 1 << 0x0A
    API = 1 << 0x3F


class FaultFlag(enum.IntFlag):
    """``UFFD_PAGEFAULT_FLAG_*``.  No WP/MINOR/RWP bit means a MISSING fault."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2
    RWP = 1 << 3


class OpenFlag(enum.IntFlag):
    """Flags of ``userfaultfd(2)`` and ``USERFAULTFD_IOC_NEW``."""

    USER_MODE_ONLY = 1
    NONBLOCK = os.O_NONBLOCK
    CLOEXEC = os.O_CLOEXEC


class EventType(enum.IntEnum):
    """``UFFD_EVENT_*`` (they start at 0x12 on purpose, to catch garbage)."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


# The flag tests below run several times per fault: on plain ints, since an
# IntFlag operator goes through the enum machinery (about a microsecond each).
_WRITE = int(FaultFlag.WRITE)
_WP = int(FaultFlag.WP)
_MINOR = int(FaultFlag.MINOR)
_RWP = int(FaultFlag.RWP)
_NOT_MISSING = _WP | _MINOR | _RWP
# FaultFlag by raw value: building an IntFlag costs half a microsecond, and a
# fault's flags take one of a handful of values.
_FLAGS: dict[int, FaultFlag] = {}


class PageFault(NamedTuple):
    """A page fault message.  A tuple: one is built per fault, and a tuple
    builds in half the time of a frozen dataclass (0.6 against 1.1 µs)."""

    address: int
    flags: FaultFlag
    thread_id: int

    @property
    def is_write(self) -> bool:
        return bool(int(self.flags) & _WRITE)

    @property
    def is_missing(self) -> bool:
        return not int(self.flags) & _NOT_MISSING

    @property
    def is_rwp(self) -> bool:
        return bool(int(self.flags) & _RWP)

    @property
    def is_minor(self) -> bool:
        return bool(int(self.flags) & _MINOR)

    @property
    def is_wp(self) -> bool:
        return bool(int(self.flags) & _WP)


@dataclass(frozen=True, slots=True)
class ForkEvent:
    """The VMM forked; ``uffd`` is a new fd, already installed in *our* fd table."""

    uffd: int


@dataclass(frozen=True, slots=True)
class RemapEvent:
    from_addr: int
    to_addr: int
    length: int


@dataclass(frozen=True, slots=True)
class RemoveEvent:
    """MADV_DONTNEED/MADV_REMOVE or a hole punch discarded ``[start, end)``."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnmapEvent:
    start: int
    end: int


UffdMessage = PageFault | ForkEvent | RemapEvent | RemoveEvent | UnmapEvent

MSG_SIZE: int = ffi.sizeof("struct uffd_msg")
# event, 7 reserved bytes, then the 24-byte union as three u64 words.
_MSG = struct.Struct("=B7xQQQ")
assert _MSG.size == MSG_SIZE


def decode_messages(buf: Buffer) -> list[UffdMessage]:
    """Decode whole ``struct uffd_msg`` records as read(2) returned them."""
    view = memoryview(buf).cast("B")
    if len(view) % MSG_SIZE:
        raise ValueError(f"{len(view)} bytes is not a whole number of {MSG_SIZE}-byte uffd_msg")
    out: list[UffdMessage] = []
    for event, a, b, c in _MSG.iter_unpack(view):
        if event == EventType.PAGEFAULT:
            flags = _FLAGS.get(a)
            if flags is None:
                flags = _FLAGS.setdefault(a, FaultFlag(a))
            out.append(PageFault(b, flags, c & 0xFFFFFFFF))
        elif event == EventType.FORK:
            out.append(ForkEvent(uffd=a & 0xFFFFFFFF))
        elif event == EventType.REMAP:
            out.append(RemapEvent(from_addr=a, to_addr=b, length=c))
        elif event == EventType.REMOVE:
            out.append(RemoveEvent(start=a, end=b))
        elif event == EventType.UNMAP:
            out.append(UnmapEvent(start=a, end=b))
        else:
            raise ValueError(f"unknown userfaultfd event {event:#x}")
    return out


@dataclass(frozen=True, slots=True)
class ApiResult:
    """What ``UFFDIO_API`` answered: enabled (or, for a probe, supported) features."""

    features: Feature
    ioctls: Ioctl


def open_userfaultfd(
    flags: OpenFlag = OpenFlag.CLOEXEC | OpenFlag.NONBLOCK,
    *,
    device: Path | None = None,
) -> int:
    """Create a raw userfaultfd (no ``UFFDIO_API`` yet) and return the fd.

    With ``device`` (normally ``/dev/userfaultfd``) the fd comes from
    ``USERFAULTFD_IOC_NEW`` on that node, whose file permissions rather than
    ``vm.unprivileged_userfaultfd`` decide who may handle kernel-mode faults.
    """
    if device is None:
        fd = int(libc.syscall(ffi.cast("long", NR.userfaultfd), ffi.cast("int", int(flags))))
        if fd < 0:
            err = ffi.errno
            if err == errno.ENOSYS:
                raise FeatureUnavailable("userfaultfd(2)", "CONFIG_USERFAULTFD=y", err=err)
            raise oserror("userfaultfd", err, detail=f"flags {flags!r}")
        return fd
    dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = int(libc.ioctl(dev, nr.USERFAULTFD_IOC_NEW, ffi.cast("int", int(flags))))
        if fd < 0:
            raise oserror("USERFAULTFD_IOC_NEW", ffi.errno, detail=str(device))
        return fd
    finally:
        os.close(dev)


def probe_api(*, device: Path | None = None) -> ApiResult:
    """The documented probe: ``UFFDIO_API`` with features 0 on a throwaway fd.

    The kernel answers with every feature and ioctl it supports.  The probe fd
    is closed, because a uffd accepts ``UFFDIO_API`` only once and the real one
    must then request exactly what wsd needs.
    """
    with Userfaultfd(open_userfaultfd(device=device)) as probe:
        return probe.api(Feature(0))


class Userfaultfd(OwnedFd):
    """An owned userfaultfd.  Close it (or use ``with``) to drop the fd."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.features: Feature | None = None

    @classmethod
    def create(
        cls,
        flags: OpenFlag = OpenFlag.CLOEXEC | OpenFlag.NONBLOCK,
        *,
        device: Path | None = None,
    ) -> Self:
        return cls(open_userfaultfd(flags, device=device))

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self.fd}, features={self.features!r})"

    def _ioctl(self, request: int, arg: object, op: str, rng: AddressRange | None = None) -> None:
        if libc.ioctl(self.fd, request, arg) < 0:
            raise oserror(op, ffi.errno, range=rng, fd=self.fd)

    # -- negotiation -------------------------------------------------------

    def api(self, features: Feature) -> ApiResult:
        """``UFFDIO_API``: enable ``features``; returns what is now enabled.

        EINVAL means a requested feature is unsupported (the kernel then zeroes
        the struct) or ``UFFDIO_API`` was already done on this uffd, e.g. by
        the VMM or by a previous wsd (RWP-FACTS fact 9).
        """
        arg = ffi.new("struct uffdio_api *", {"api": UFFD_API, "features": int(features)})
        if libc.ioctl(self.fd, nr.UFFDIO_API, arg) < 0:
            err = ffi.errno
            detail = f"requested {features!r}"
            if err == errno.EINVAL:
                detail += "; unsupported feature, or UFFDIO_API already done on this uffd"
            raise oserror("UFFDIO_API", err, fd=self.fd, detail=detail)
        self.features = Feature(arg.features)
        return ApiResult(features=Feature(arg.features), ioctls=Ioctl(arg.ioctls))

    # -- ranges --------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> Ioctl:
        """``UFFDIO_REGISTER``; returns the range ioctls the kernel allows there."""
        rng = AddressRange(start, length)
        arg = ffi.new(
            "struct uffdio_register *",
            {"range": {"start": start, "len": length}, "mode": int(mode)},
        )
        if libc.ioctl(self.fd, nr.UFFDIO_REGISTER, arg) < 0:
            raise oserror("UFFDIO_REGISTER", ffi.errno, range=rng, fd=self.fd, detail=repr(mode))
        return Ioctl(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        arg = ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl(nr.UFFDIO_UNREGISTER, arg, "UFFDIO_UNREGISTER", AddressRange(start, length))

    def wake(self, start: int, length: int) -> None:
        """Wake threads blocked on faults in the range, without resolving anything."""
        arg = ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl(nr.UFFDIO_WAKE, arg, "UFFDIO_WAKE", AddressRange(start, length))

    def rwprotect(self, start: int, length: int, *, protect: bool, wake: bool = True) -> None:
        """``UFFDIO_RWPROTECT``: arm (``protect``) or disarm read-write protection.

        Arming only touches present PTEs; unpopulated addresses stay
        unpopulated.  Disarming wakes threads blocked on RWP faults unless
        ``wake`` is false.
        """
        mode = (1 if protect else 0) | (0 if wake else 2)
        arg = ffi.new(
            "struct uffdio_rwprotect *", {"range": {"start": start, "len": length}, "mode": mode}
        )
        self._ioctl(nr.UFFDIO_RWPROTECT, arg, "UFFDIO_RWPROTECT", AddressRange(start, length))

    def set_mode(self, *, enable: Feature = Feature(0), disable: Feature = Feature(0)) -> None:
        """``UFFDIO_SET_MODE``: toggle async features at run time (only RWP_ASYNC in 7.3)."""
        arg = ffi.new("struct uffdio_set_mode *", {"enable": int(enable), "disable": int(disable)})
        if libc.ioctl(self.fd, nr.UFFDIO_SET_MODE, arg) < 0:
            raise oserror(
                "UFFDIO_SET_MODE",
                ffi.errno,
                fd=self.fd,
                detail=f"enable {enable!r}, disable {disable!r}",
            )

    def copy(self, dst: int, data: Buffer, *, wake: bool = True, wp: bool = False) -> int:
        """``UFFDIO_COPY`` ``data`` (from our memory) to ``dst`` (in the uffd's mm).

        Returns the number of bytes copied.  ``FileExistsError`` (EEXIST) means
        the page was already populated by someone else, except on hugetlbfs,
        which also says EEXIST when its pool has no free page for ``dst``
        (Linux 6.18; docs/evictor.md, "EEXIST on hugetlbfs").
        """
        src = ffi.from_buffer(data)
        length = len(src)
        arg = ffi.new(
            "struct uffdio_copy *",
            {
                "dst": dst,
                "src": int(ffi.cast("uintptr_t", src)),
                "len": length,
                "mode": (0 if wake else 1) | (2 if wp else 0),
            },
        )
        if libc.ioctl(self.fd, nr.UFFDIO_COPY, arg) < 0:
            err = ffi.errno
            raise oserror(
                "UFFDIO_COPY",
                err,
                range=AddressRange(dst, length),
                fd=self.fd,
                detail=f"copied {arg.copy}",
            )
        return int(arg.copy)

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        arg = ffi.new(
            "struct uffdio_zeropage *",
            {"range": {"start": start, "len": length}, "mode": 0 if wake else 1},
        )
        self._ioctl(nr.UFFDIO_ZEROPAGE, arg, "UFFDIO_ZEROPAGE", AddressRange(start, length))
        return int(arg.zeropage)

    def continue_(self, start: int, length: int, *, wake: bool = True, wp: bool = False) -> int:
        """``UFFDIO_CONTINUE``: map the page-cache pages behind a MINOR fault."""
        arg = ffi.new(
            "struct uffdio_continue *",
            {
                "range": {"start": start, "len": length},
                "mode": (0 if wake else 1) | (2 if wp else 0),
            },
        )
        self._ioctl(nr.UFFDIO_CONTINUE, arg, "UFFDIO_CONTINUE", AddressRange(start, length))
        return int(arg.mapped)

    def writeprotect(self, start: int, length: int, *, protect: bool, wake: bool = True) -> None:
        mode = (1 if protect else 0) | (0 if wake else 2)
        arg = ffi.new(
            "struct uffdio_writeprotect *",
            {"range": {"start": start, "len": length}, "mode": mode},
        )
        self._ioctl(nr.UFFDIO_WRITEPROTECT, arg, "UFFDIO_WRITEPROTECT", AddressRange(start, length))

    def poison(self, start: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_POISON``: later accesses get SIGBUS.  For pages that cannot be recovered."""
        arg = ffi.new(
            "struct uffdio_poison *",
            {"range": {"start": start, "len": length}, "mode": 0 if wake else 1},
        )
        self._ioctl(nr.UFFDIO_POISON, arg, "UFFDIO_POISON", AddressRange(start, length))
        return int(arg.updated)

    # -- messages ------------------------------------------------------------

    def read_messages(self, max_messages: int = 64) -> list[UffdMessage]:
        """Read pending messages; ``[]`` when none are queued (non-blocking fd)."""
        try:
            buf = os.read(self.fd, MSG_SIZE * max_messages)
        except BlockingIOError:
            return []
        except OSError as e:
            raise oserror("read(userfaultfd)", e.errno or errno.EIO, fd=self.fd) from e
        return decode_messages(buf)


def require_features(supported: Feature, needed: Feature, what: str) -> None:
    """Raise FeatureUnavailable unless every feature in ``needed`` is supported."""
    missing = needed & ~supported
    if missing:
        raise FeatureUnavailable(
            f"{what} (userfaultfd features {missing!r})", feature_requirement(missing)
        )
