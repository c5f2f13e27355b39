"""ioctl request numbers, computed the way <asm-generic/ioctl.h> does.

Numbers are derived from ``sizeof`` of the cffi-declared argument struct, never
pasted, so a wrong struct declaration shows up as a wrong request number (and an
ENOTTY from the kernel) rather than silently working on one kernel only.
"""

from __future__ import annotations

from ._ffi import ffi

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _ior(type_: int, nr: int, struct: str) -> int:
    return _ioc(_IOC_READ, type_, nr, ffi.sizeof(struct))


def _iow(type_: int, nr: int, struct: str) -> int:
    return _ioc(_IOC_WRITE, type_, nr, ffi.sizeof(struct))


def _iowr(type_: int, nr: int, struct: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(struct))


UFFDIO = 0xAA
USERFAULTFD_IOC_NEW = _io(UFFDIO, 0x00)

# The UNREGISTER and WAKE directions look backwards (_IOR for an argument the
# kernel reads); the uapi header keeps them that way for ABI compatibility.
UFFDIO_REGISTER = _iowr(UFFDIO, 0x00, "struct uffdio_register")
UFFDIO_UNREGISTER = _ior(UFFDIO, 0x01, "struct uffdio_range")
UFFDIO_WAKE = _ior(UFFDIO, 0x02, "struct uffdio_range")
UFFDIO_COPY = _iowr(UFFDIO, 0x03, "struct uffdio_copy")
UFFDIO_ZEROPAGE = _iowr(UFFDIO, 0x04, "struct uffdio_zeropage")
UFFDIO_MOVE = _iowr(UFFDIO, 0x05, "struct uffdio_move")
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, 0x06, "struct uffdio_writeprotect")
UFFDIO_CONTINUE = _iowr(UFFDIO, 0x07, "struct uffdio_continue")
UFFDIO_POISON = _iowr(UFFDIO, 0x08, "struct uffdio_poison")
UFFDIO_RWPROTECT = _iowr(UFFDIO, 0x09, "struct uffdio_rwprotect")
UFFDIO_SET_MODE = _iow(UFFDIO, 0x0A, "struct uffdio_set_mode")
UFFDIO_API = _iowr(UFFDIO, 0x3F, "struct uffdio_api")

PROCFS_IOCTL_MAGIC = ord("f")
PAGEMAP_SCAN = _iowr(PROCFS_IOCTL_MAGIC, 16, "struct pm_scan_arg")
