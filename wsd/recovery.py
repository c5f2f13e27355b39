"""What a restarted wsd needs to resume a session it did not start.

At hand-off wsd writes the session's description (``<vm_id>.session.json`` in
the state directory) and parks its fds in systemd's store
(:mod:`wsd.fdstore`).  The page map (:mod:`wsd.evictor.pagemap`) says which
holes are evicted pages.  A restarted wsd with all three resumes the session:
nothing is negotiated or registered again, since the uffd keeps both.

The description also names the VMM process by pid *and* start time, so that a
pid recycled by another process is never taken for the VMM.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from wsd.atomicfile import remove_leftovers, write_atomically
from wsd.tracker.mode import TrackingMode
from wsd.vmm.protocol import Region

FORMAT: Final = "wsd-session-1"


class RecoveryError(Exception):
    """A session description that cannot be used, naming the file and the problem."""


class SessionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["wsd-session-1"] = FORMAT
    vm_id: str
    vmm_pid: int
    vmm_start_ticks: int
    mode: TrackingMode
    features: int
    """The uffd features negotiated (by wsd or the VMM)."""
    regions: list[Region]
    """As handed off, except ``fd_index``: the region's memfd in the session's list."""
    minor: list[bool]
    """Whether MINOR is registered on each region too."""
    vanished: list[str | None] = []
    """Per region, why the VMM unmapped or moved it since (empty: none did)."""


def session_path(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.session.json"


def save(state_dir: Path, record: SessionRecord) -> Path:
    path = session_path(state_dir, record.vm_id)
    write_atomically(path, record.model_dump_json(indent=2).encode())
    return path


def load(state_dir: Path, vm_id: str) -> SessionRecord:
    path = session_path(state_dir, vm_id)
    try:
        record = SessionRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise RecoveryError(f"{path}: no session description") from None
    except (OSError, ValidationError) as e:
        raise RecoveryError(f"{path}: unusable session description: {e}") from e
    if record.vm_id != vm_id:
        raise RecoveryError(f"{path}: describes vm_id {record.vm_id!r}")
    if record.vanished and len(record.vanished) != len(record.regions):
        n, m = len(record.regions), len(record.vanished)
        raise RecoveryError(f"{path}: {m} vanished flags for {n} regions")
    if len(record.minor) != len(record.regions):
        n, m = len(record.regions), len(record.minor)
        raise RecoveryError(f"{path}: {m} minor flags for {n} regions")
    return record


def remove(state_dir: Path, vm_id: str) -> None:
    session_path(state_dir, vm_id).unlink(missing_ok=True)
    remove_temporaries(state_dir, vm_id)


def remove_temporaries(state_dir: Path, vm_id: str) -> None:
    """What writes of ``vm_id``'s description left when a crash cut them short."""
    remove_leftovers(state_dir, re.escape(session_path(state_dir, vm_id).name))


def note_region_change(
    state_dir: Path,
    vm_id: str,
    index: int,
    *,
    host_virt_addr: int | None = None,
    vanished: str | None = None,
) -> None:
    """Record that region ``index`` moved (``mremap``) or vanished, for a resume.

    A resumed session must arm the region where it is now, and must not arm
    one that is gone (the ioctl would fail and the whole resume with it).
    Blocking (it fsyncs): run it in a thread.
    """
    record = load(state_dir, vm_id)
    regions = list(record.regions)
    if host_virt_addr is not None:
        regions[index] = regions[index].model_copy(update={"host_virt_addr": host_virt_addr})
    gone = list(record.vanished) or [None] * len(regions)
    if vanished is not None:
        gone[index] = vanished
    save(state_dir, record.model_copy(update={"regions": regions, "vanished": gone}))
