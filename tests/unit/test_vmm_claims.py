"""No two regions may share a memfd range, and no two sessions a uffd."""

from __future__ import annotations

import pytest

from wsd.kernel.procfs import FileId
from wsd.vmm.claims import Claim, check_unclaimed
from wsd.vmm.protocol import HandoffError

UFFD, OTHER_UFFD = FileId(15, 1), FileId(15, 2)
MEMFD, OTHER_MEMFD = FileId(1, 100), FileId(1, 200)
MIB = 1 << 20


def claim(*memory: tuple[FileId, int, int], uffd: FileId = OTHER_UFFD) -> Claim:
    return Claim("new", uffd, memory)


HELD = Claim("vm-a", UFFD, ((MEMFD, 0, 2 * MIB),))


@pytest.mark.parametrize(
    "new",
    [
        claim((MEMFD, 2 * MIB, 3 * MIB)),  # right after vm-a's range
        claim((OTHER_MEMFD, 0, 2 * MIB)),
        claim((OTHER_MEMFD, 0, MIB), (OTHER_MEMFD, MIB, 2 * MIB)),  # adjacent, one file
    ],
    ids=["adjacent", "other-file", "two-ranges"],
)
def test_disjoint_memory_and_another_uffd_are_free(new: Claim) -> None:
    check_unclaimed(new, [HELD])


@pytest.mark.parametrize(
    ("new", "field", "words"),
    [
        (
            claim((MEMFD, MIB, 3 * MIB)),
            "regions[0]",
            "[0x100000, 0x200000) is guest memory of VM 'vm-a' too",
        ),
        (claim((OTHER_MEMFD, 0, MIB), uffd=UFFD), "uffd.fd_index", "the uffd is the one VM 'vm-a'"),
        (
            claim((OTHER_MEMFD, 0, 2 * MIB), (OTHER_MEMFD, MIB, 3 * MIB)),
            "regions[1]",
            "regions[1] and regions[0] are backed by the same range of one memfd",
        ),
    ],
    ids=["shared-range", "shared-uffd", "within-one-hand-off"],
)
def test_what_is_held_already_is_refused_naming_it(new: Claim, field: str, words: str) -> None:
    with pytest.raises(HandoffError) as exc:
        check_unclaimed(new, [HELD])
    assert exc.value.code == "bad_fds" and exc.value.field == field
    assert words in exc.value.message
