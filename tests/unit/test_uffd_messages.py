"""Decoding struct uffd_msg, and the flag enums."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsd.kernel import (
    MSG_SIZE,
    EventType,
    FaultFlag,
    Feature,
    ForkEvent,
    PageFault,
    RegisterMode,
    RemapEvent,
    RemoveEvent,
    UnmapEvent,
    decode_messages,
)
from wsd.kernel._ffi import ffi


def raw(event: int, a: int = 0, b: int = 0, c: int = 0) -> bytes:
    msg = ffi.new("struct uffd_msg *")
    msg.event = event
    msg.arg.reserved.reserved1 = a
    msg.arg.reserved.reserved2 = b
    msg.arg.reserved.reserved3 = c
    return bytes(ffi.buffer(msg))


def test_pagefault_fields_land_where_the_kernel_puts_them() -> None:
    msg = ffi.new("struct uffd_msg *")
    msg.event = EventType.PAGEFAULT
    msg.arg.pagefault.flags = FaultFlag.RWP | FaultFlag.WRITE
    msg.arg.pagefault.address = 0x7F00_0000_1000
    msg.arg.pagefault.feat.ptid = 4242
    (f,) = decode_messages(bytes(ffi.buffer(msg)))
    assert f == PageFault(address=0x7F00_0000_1000, flags=FaultFlag(0x9), thread_id=4242)
    assert f.is_rwp and f.is_write and not f.is_missing


@pytest.mark.parametrize(
    ("flags", "missing", "wp", "minor", "rwp"),
    [
        (0, True, False, False, False),
        (1, True, False, False, False),
        (2, False, True, False, False),
        (4, False, False, True, False),
        (8, False, False, False, True),
        (9, False, False, False, True),
    ],
)
def test_fault_kinds(flags: int, missing: bool, wp: bool, minor: bool, rwp: bool) -> None:
    f = PageFault(0, FaultFlag(flags), 0)
    assert (f.is_missing, f.is_wp, f.is_minor, f.is_rwp) == (missing, wp, minor, rwp)


def test_events_decode() -> None:
    buf = (
        raw(EventType.FORK, 17)
        + raw(EventType.REMAP, 0x1000, 0x9000, 0x2000)
        + raw(EventType.REMOVE, 0x4000, 0x8000)
        + raw(EventType.UNMAP, 0x10000, 0x20000)
    )
    assert decode_messages(buf) == [
        ForkEvent(uffd=17),
        RemapEvent(from_addr=0x1000, to_addr=0x9000, length=0x2000),
        RemoveEvent(start=0x4000, end=0x8000),
        UnmapEvent(start=0x10000, end=0x20000),
    ]


def test_garbage_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown userfaultfd event 0x0"):
        decode_messages(bytes(MSG_SIZE))
    with pytest.raises(ValueError, match="whole number"):
        decode_messages(bytes(MSG_SIZE + 1))


@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 15), st.integers(0, 2**32 - 1)),
        max_size=20,
    )
)
def test_pagefault_roundtrip(faults: list[tuple[int, int, int]]) -> None:
    buf = b"".join(
        struct.pack("=B7xQQI4x", EventType.PAGEFAULT, fl, addr, tid) for addr, fl, tid in faults
    )
    assert decode_messages(buf) == [PageFault(a, FaultFlag(f), t) for a, f, t in faults]


def test_uapi_bit_values() -> None:
    assert Feature.RWP == 1 << 17 and Feature.RWP_ASYNC == 1 << 18
    assert Feature.WP_ASYNC == 1 << 15 and Feature.MINOR_SHMEM == 1 << 10
    assert RegisterMode.RWP == 1 << 3
    assert FaultFlag.RWP == 1 << 3
