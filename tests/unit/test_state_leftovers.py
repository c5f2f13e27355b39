"""Temporary files that writes cut short by a crash leave in the state directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsd import recovery
from wsd.atomicfile import temporary, write_atomically
from wsd.evictor import pagemap

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
