"""A region must be covered by shared mappings of its memfd at the offsets it implies,
every one of them registered with the handed-off uffd once wsd has registered it."""

from __future__ import annotations

import pytest

from wsd.kernel.procfs import FileId, Mapping, SmapsInfo
from wsd.vmm.mappings import _first_unregistered, _mismatch
from wsd.vmm.protocol import Region

MEMFD = FileId(1, 100)
OTHER = FileId(1, 200)
BASE = 0x7F0000000000
MIB = 1 << 20


def region(offset: int = 0) -> Region:
    return Region(guest_phys_addr=0, host_virt_addr=BASE, size=4 * MIB, fd_index=1, offset=offset)


def mapping(
    start: int, end: int, offset: int, *, file: FileId = MEMFD, perms: str = "rw-s"
) -> Mapping:
    return Mapping(start=start, end=end, perms=perms, offset=offset, file=file, path="/memfd:x")


@pytest.mark.parametrize(
    ("maps", "problem"),
    [
        ([mapping(BASE - MIB, BASE + 8 * MIB, 0)], None),
        (
            [mapping(BASE - MIB, BASE + 8 * MIB, MIB)],
            f"{BASE:#x} maps the memfd at offset {2 * MIB:#x}",
        ),
        ([mapping(BASE, BASE + 4 * MIB, MIB)], None),
        # Split in two, as a VMM's madvise or mprotect of part of it leaves it.
        ([mapping(BASE, BASE + MIB, MIB), mapping(BASE + MIB, BASE + 4 * MIB, 2 * MIB)], None),
        (
            [mapping(BASE, BASE + MIB, MIB), mapping(BASE + MIB, BASE + 4 * MIB, 3 * MIB)],
            f"{BASE + MIB:#x} maps the memfd at offset {3 * MIB:#x}",
        ),
        (
            [mapping(BASE, BASE + MIB, MIB), mapping(BASE + 2 * MIB, BASE + 4 * MIB, 3 * MIB)],
            f"nothing is mapped at {BASE + MIB:#x}",
        ),
        ([mapping(BASE, BASE + 3 * MIB, MIB)], f"nothing is mapped at {BASE + 3 * MIB:#x}"),
        ([mapping(BASE + MIB, BASE + 4 * MIB, 2 * MIB)], f"nothing is mapped at {BASE:#x}"),
        ([], f"nothing is mapped at {BASE:#x}"),
        ([mapping(BASE, BASE + 4 * MIB, MIB, perms="rw-p")], f"{BASE:#x} is in a private mapping"),
        ([mapping(BASE, BASE + 4 * MIB, MIB, file=OTHER)], f"{BASE:#x} maps another file"),
    ],
    ids=[
        "inside",
        "offset",
        "exact",
        "split",
        "split-offset",
        "gap",
        "short",
        "late",
        "none",
        "private",
        "file",
    ],
)
def test_the_first_address_mapped_otherwise_is_named(
    maps: list[Mapping], problem: str | None
) -> None:
    found = _mismatch(region(offset=MIB), MEMFD, maps)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found


def smaps(*spans: tuple[int, int, str]) -> dict[int, SmapsInfo]:
    return {start: SmapsInfo(4096, frozenset(flags.split()), end) for start, end, flags in spans}


@pytest.mark.parametrize(
    ("spans", "unregistered"),
    [
        ([(BASE - MIB, BASE, "rd wr"), (BASE, BASE + 4 * MIB, "rd wr sh um uw")], None),
        ([(BASE, BASE + MIB, "rd sh um"), (BASE + MIB, BASE + 4 * MIB, "rd wr sh um")], None),
        ([(BASE - MIB, BASE + 8 * MIB, "rd wr sh")], BASE),
        ([(BASE, BASE + MIB, "rd sh um"), (BASE + MIB, BASE + 4 * MIB, "rd wr sh")], BASE + MIB),
        ([(BASE - MIB, BASE, "rd wr sh um"), (BASE, BASE + 4 * MIB, "rd wr sh")], BASE),
    ],
    ids=["registered", "split", "none", "half", "only-the-neighbour"],
)
def test_the_first_mapping_the_uffd_did_not_register_is_named(
    spans: list[tuple[int, int, str]], unregistered: int | None
) -> None:
    assert _first_unregistered(region(), smaps(*spans)) == unregistered
