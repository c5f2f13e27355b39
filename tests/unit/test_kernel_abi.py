"""Struct layouts and ioctl numbers against the Linux 7.3 uapi (x86_64/arm64 LP64)."""

from __future__ import annotations

import pytest

from wsd.kernel import ioctl_numbers as nr
from wsd.kernel._ffi import ffi

SIZES = {
    "struct uffdio_api": 24,
    "struct uffdio_range": 16,
    "struct uffdio_register": 32,
    "struct uffdio_copy": 40,
    "struct uffdio_zeropage": 32,
    "struct uffdio_writeprotect": 24,
    "struct uffdio_continue": 32,
    "struct uffdio_poison": 32,
    "struct uffdio_rwprotect": 24,
    "struct uffdio_move": 40,
    "struct uffdio_set_mode": 16,
    "struct uffd_msg": 32,
    "struct page_region": 24,
    "struct pm_scan_arg": 96,
}

OFFSETS = {
    ("struct uffdio_register", "mode"): 16,
    ("struct uffdio_register", "ioctls"): 24,
    ("struct uffdio_copy", "copy"): 32,
    ("struct uffdio_rwprotect", "mode"): 16,
    ("struct uffdio_set_mode", "disable"): 8,
    ("struct uffd_msg", "arg"): 8,
    ("struct pm_scan_arg", "walk_end"): 32,
    ("struct pm_scan_arg", "vec"): 40,
    ("struct pm_scan_arg", "max_pages"): 56,
    ("struct pm_scan_arg", "category_inverted"): 64,
    ("struct pm_scan_arg", "category_mask"): 72,
    ("struct pm_scan_arg", "category_anyof_mask"): 80,
    ("struct pm_scan_arg", "return_mask"): 88,
}

# Values of the uapi macros as gcc computes them from the 7.3 headers.
IOCTLS = {
    "USERFAULTFD_IOC_NEW": 0xAA00,
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "UFFDIO_RWPROTECT": 0xC018AA09,
    "UFFDIO_SET_MODE": 0x4010AA0A,
    "PAGEMAP_SCAN": 0xC0606610,
}


@pytest.mark.parametrize(("struct", "size"), SIZES.items())
def test_struct_size(struct: str, size: int) -> None:
    assert ffi.sizeof(struct) == size


@pytest.mark.parametrize(("where", "offset"), OFFSETS.items(), ids=str)
def test_field_offset(where: tuple[str, str], offset: int) -> None:
    assert ffi.offsetof(*where) == offset


@pytest.mark.parametrize(("name", "value"), IOCTLS.items())
def test_ioctl_number(name: str, value: int) -> None:
    assert getattr(nr, name) == value


def test_ioc_rejects_oversized_argument() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        nr._ioc(3, 0xAA, 0, 1 << 14)
