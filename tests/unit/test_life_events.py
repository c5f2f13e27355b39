"""Life events, pins and other mappers with fakes: state transitions and /proc parsing."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wsd.evictor.guards import aliases, guard_reason, read_guards
from wsd.kernel import FileId, UringBuffers, io_uring_buffers, mappers_of, pinned_bytes
from wsd.kernel.procfs import Mapping
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region


def test_removed_pages_become_fresh_and_their_generation_moves_on() -> None:
    s = RegionState(8, Granularity.PAGE_4K, started_at=0.0)
    s.observe(np.zeros(8, np.bool_), np.ones(8, np.bool_), 1.0)
    s.note_evicted([1, 2, 3])
    stale = s.note_removed([2, 3, 4])
    assert stale.tolist() == [2, 3]  # their stored copies are garbage now
    assert s.evicted.tolist() == [False, True, False, False, False, False, False, False]
    assert s.evicted_pages == 1 and s.resident_pages == 4  # 0, 5, 6, 7
    # Evicted (1 -> 2) and resident (0 -> 1) pages alike: a prepared eviction
    # or a fetch that read the old generation finds it stale.
    assert s.generations.tolist() == [0, 1, 2, 2, 1, 0, 0, 0]
    # Never populated: the next touch is a zero page, and it can be evicted again.
    s.note_populated([2])
    assert s.settled_mask(np.array([2])).all()
    s.note_evicted([2])
    assert s.generation(2) == 3


def test_a_removal_is_no_candidate_until_repopulated() -> None:
    s = RegionState(4, Granularity.PAGE_4K, started_at=0.0)
    for t in range(1, 4):
        s.observe(np.zeros(4, np.bool_), np.ones(4, np.bool_), float(t))
    s.note_removed([0, 1])
    assert s.cold_candidates(1).tolist() == [2, 3]


def _proc(tmp_path: Path, pid: int, maps: str = "", status: str = "") -> None:
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "maps").write_text(maps)
    (d / "status").write_text(status)


def test_mappers_are_found_by_device_and_inode(tmp_path: Path) -> None:
    memfd = FileId(os.makedev(0, 1), 5288)
    line = "7f0000000000-7f0000400000 rw-s 00000000 00:01 5288   /memfd:guest (deleted)\n"
    _proc(tmp_path, 10, line)  # the VMM: excluded
    _proc(tmp_path, 11, line)  # vhost-user backend
    _proc(tmp_path, 12, line.replace("00:01", "00:02"))  # same inode, other device
    _proc(tmp_path, 13, "7f00-7f01 r--p 00000000 08:01 99 /usr/lib/libc.so\n")
    (tmp_path / "self").mkdir()  # not a pid
    assert mappers_of([memfd], exclude={10}, proc=tmp_path) == {memfd: {11}}


def test_vmpin_is_read_in_bytes(tmp_path: Path) -> None:
    _proc(tmp_path, 20, status="Name:\tvmm\nVmLck:\t   0 kB\nVmPin:\t  2048 kB\n")
    _proc(tmp_path, 21, status="Name:\tkthreadd\n")
    assert pinned_bytes(20, proc=tmp_path) == 2 << 20
    assert pinned_bytes(21, proc=tmp_path) == 0
    with pytest.raises(ProcessLookupError, match="no process 22"):
        pinned_bytes(22, proc=tmp_path)
    reading = read_guards(20, [], proc=tmp_path)
    assert reading.pinned_bytes == 2 << 20 and reading.mappers == {}
    # Between the walks for other mappers, only the pins are read.
    reading = read_guards(20, None, proc=tmp_path)
    assert reading.pinned_bytes == 2 << 20 and reading.mappers is None


RING = "anon_inode:[io_uring]"
FDINFO = """pos:\t0
flags:\t02000002
UserFiles:\t0
UserBufs:\t3
    0: 0x7f0000100000/1048576
    1: <none>
    2: 0x7f0000000000/8192
PollList:
"""


def _fds(tmp_path: Path, pid: int, fds: dict[int, tuple[str, str]]) -> None:
    """``/proc/<pid>/fd/N`` links to each target, ``fdinfo/N`` with each text."""
    d = tmp_path / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "fdinfo").mkdir()
    for n, (target, info) in fds.items():
        (d / "fd" / str(n)).symlink_to(target)
        (d / "fdinfo" / str(n)).write_text(info)


def test_io_uring_buffers_come_from_each_rings_fdinfo(tmp_path: Path) -> None:
    other = FDINFO.replace("UserBufs:\t3", "UserBufs:\t0").split("    0:")[0] + "PollList:\n"
    _fds(tmp_path, 30, {3: (RING, FDINFO), 4: ("/dev/null", FDINFO), 5: (RING, other)})
    assert io_uring_buffers(30, proc=tmp_path) == UringBuffers(
        ((0x7F0000100000, 0x7F0000200000), (0x7F0000000000, 0x7F0000002000)), None
    )
    with pytest.raises(ProcessLookupError, match="no process 31"):
        io_uring_buffers(31, proc=tmp_path)


def test_io_uring_buffers_a_busy_ring_does_not_list_are_unknown(tmp_path: Path) -> None:
    # The kernel lists the buffers only if it gets the ring's lock at once.
    busy = "UserFiles:\t0\nUserBufs:\t2\nPollList:\n"
    garbled = "UserBufs:\t1\n    0: 0xzz/4096\n"
    _fds(tmp_path, 32, {7: (RING, busy), 8: (RING, "pos:\t0\n"), 9: (RING, garbled)})
    reading = io_uring_buffers(32, proc=tmp_path)
    assert reading.spans == ()
    assert reading.unlisted is not None
    assert "fdinfo/7: 2 of 2 registered buffers not listed" in reading.unlisted
    assert "fdinfo/8: no UserBufs line" in reading.unlisted
    assert "fdinfo/9: unreadable: invalid literal" in reading.unlisted


def test_io_uring_buffers_cover_the_bytes_of_a_range_once() -> None:
    uring = UringBuffers(((0x1000, 0x5000), (0x3000, 0x4000), (0x8000, 0x9000)))
    assert uring.covered(0x2000, 0x8000) == 0x3000 + 0x1000
    assert uring.covered(0x5000, 0x3000) == 0
    assert UringBuffers().covered(0, 1 << 40) == 0


def _region(**kw: Any) -> Region:
    return Region(guest_phys_addr=0, host_virt_addr=1 << 30, size=1 << 20, fd_index=1, **kw)


def _fakes(
    region: Region,
    *,
    pinned: int = 0,
    mappers: tuple[int, ...] = (),
    uring_bytes: int = 0,
    uring_unlisted: str | None = None,
    aliased_at: int | None = None,
) -> Any:
    t = SimpleNamespace(
        region=region,
        vanished=None,
        other_mappers=mappers,
        uring_bytes=uring_bytes,
        aliased_at=aliased_at,
    )
    ctx = SimpleNamespace(
        tracker=SimpleNamespace(pinned_bytes=pinned, uring_unlisted=uring_unlisted)
    )
    return ctx, t


def test_guard_reasons_name_what_blocks_eviction() -> None:
    assert guard_reason(*_fakes(_region())) is None
    assert "dma_pinned" in (guard_reason(*_fakes(_region(dma_pinned=True))) or "")
    assert "1024 KiB pinned (VmPin)" in (guard_reason(*_fakes(_region(), pinned=1 << 20)) or "")
    why = guard_reason(*_fakes(_region(), mappers=(41, 42))) or ""
    assert "pids 41, 42" in why
    why = guard_reason(*_fakes(_region(), uring_bytes=8192)) or ""
    assert "io_uring registered buffers of the VMM cover 8 KiB" in why
    why = guard_reason(*_fakes(_region(), uring_unlisted="fdinfo/7: busy")) or ""
    assert "cannot place (fdinfo/7: busy)" in why
    why = guard_reason(*_fakes(_region(), aliased_at=0x7F0000000000)) or ""
    assert "the VMM maps this region's pages a second time, at 0x7f0000000000" in why
    ctx, t = _fakes(_region())
    t.vanished = "unmapped by the VMM"
    assert guard_reason(ctx, t) == "region unmapped by the VMM"


def _mapping(start: int, size: int, offset: int, file: FileId, perms: str = "rw-s") -> Mapping:
    return Mapping(start, start + size, perms, offset, file, "/memfd:guest (deleted)")


def test_the_vmm_s_aliases_of_a_region_are_found_and_its_own_mapping_is_not() -> None:
    memfd, other = FileId(1, 100), FileId(1, 200)
    mib = 1 << 20
    region = _region(offset=mib)  # the memfd's [1, 2) MiB at 1 GiB
    own = _mapping(1 << 30, mib, mib, memfd)
    assert aliases([own], [(memfd, region)]) == {}
    # Its own mapping may be larger (it maps offset 0 right below the region).
    assert aliases([_mapping((1 << 30) - mib, 3 * mib, 0, memfd)], [(memfd, region)]) == {}
    # Other offsets of the memfd elsewhere, or another file at the same offsets.
    elsewhere = [_mapping(0x7F0000000000, mib, 0, memfd), _mapping(0x7F1000000000, mib, mib, other)]
    assert aliases([own, *elsewhere], [(memfd, region)]) == {}
    # Half of the region's pages again, shared or private.
    for perms in ("rw-s", "r--p"):
        alias = _mapping(0x7F2000000000, mib, mib + mib // 2, memfd, perms)
        assert aliases([own, alias], [(memfd, region)]) == {0: 0x7F2000000000}
    half = _mapping(0x7F3000000000, mib, mib // 2, memfd)  # the region's first half MiB
    assert aliases([half], [(memfd, region)]) == {0: 0x7F3000000000 + mib // 2}
