"""What a session leaves in the state directory: temporary files of writes cut short by
a crash, and a parked session a new hand-off of the VM takes over."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsd import recovery, resume
from wsd.atomicfile import temporary, write_atomically
from wsd.evictor import pagemap
from wsd.kernel import process_start_ticks
from wsd.tracker.mode import TrackingMode
from wsd.vmm.protocol import Region

CUT_SHORT = [  # each final name, as a write of it left its temporary file
    "vm-1.pagemap.npz",
    "vm-1.journal.7",
    "vm-1.ceiling",
    "vm-1.session.json",
]
OTHERS = [  # another VM's, and files that are not temporaries
    "vm-1.b.pagemap.npz",
    "vm-12.journal.3",
]


def _cut_short(state: Path, final: str) -> Path:
    fd, tmp = temporary(state / final)
    with open(fd, "wb") as f:
        f.write(b"partial")
    return Path(tmp)


def test_removing_a_session_removes_its_writes_cut_short_and_nothing_else(tmp_path: Path) -> None:
    for name in CUT_SHORT:
        _cut_short(tmp_path, name)
    kept = [_cut_short(tmp_path, name) for name in OTHERS]
    kept.append(tmp_path / ".vm-1.session.json.notes")
    kept[-1].write_text("not written by wsd")
    region = pagemap.RegionMap(0, 4096, 4096, np.array([0], np.int64), np.array([1], np.uint32))
    pagemap.save(tmp_path, pagemap.VmMap("vm-1", (region,)))
    write_atomically(recovery.session_path(tmp_path, "vm-1"), b"{}")

    pagemap.remove(tmp_path, "vm-1")
    recovery.remove(tmp_path, "vm-1")

    assert sorted(tmp_path.iterdir()) == sorted(kept)


def _parked(state: Path, vm_id: str, *, alive: bool) -> recovery.SessionRecord:
    """A session of this process (``alive``) or of one gone, with two pages listed."""
    ticks = process_start_ticks(os.getpid()) + (0 if alive else 1)
    region = Region(guest_phys_addr=0, host_virt_addr=1 << 30, size=1 << 20, fd_index=0)
    record = recovery.SessionRecord(
        vm_id=vm_id,
        vmm_pid=os.getpid(),
        vmm_start_ticks=ticks,
        mode=TrackingMode.WP_ASYNC,
        features=0,
        regions=[region],
        minor=[False],
    )
    recovery.save(state, record)
    listed = pagemap.RegionMap(0, 1 << 20, 4096, np.array([3, 9]), np.array([5, 5], np.uint32))
    pagemap.save(state, pagemap.VmMap(vm_id, (listed,)))
    pagemap.save_ceiling(state, vm_id, 6)
    return record


@pytest.mark.parametrize("alive", [True, False], ids=["vmm-runs", "vmm-gone"])
def test_a_new_session_takes_over_a_parked_one_only_once_its_vmm_is_gone(
    tmp_path: Path, alive: bool
) -> None:
    record = _parked(tmp_path, "vm-1", alive=alive)
    before = sorted(tmp_path.iterdir())
    assert resume.take_over(tmp_path, "vm-1") == (record if alive else None)
    if alive:
        assert sorted(tmp_path.iterdir()) == before
    else:  # only the generation ceiling outlives the session
        assert [p.name for p in tmp_path.iterdir()] == ["vm-1.ceiling"]
        assert pagemap.load_ceiling(tmp_path, "vm-1") == 6


def test_an_unusable_parked_description_is_taken_over_with_its_map(tmp_path: Path) -> None:
    _parked(tmp_path, "vm-1", alive=True)
    recovery.session_path(tmp_path, "vm-1").write_text("{")
    assert resume.take_over(tmp_path, "vm-1") is None
    assert [p.name for p in tmp_path.iterdir()] == ["vm-1.ceiling"]


def test_a_vm_never_parked_is_taken_over_without_a_write(tmp_path: Path) -> None:
    assert resume.take_over(tmp_path, "vm-new") is None
    assert list(tmp_path.iterdir()) == []
