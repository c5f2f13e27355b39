"""The persisted page map: which pages of a VM live in storage, at which generation.

The live map is the tracker's :class:`~wsd.tracker.state.RegionState` (flags and
generations).  This module writes it to disk so a restarted wsd knows which
holes in the memfd are evicted pages (fetch from storage, generation checked)
and which were never populated (zeros).

The file is written *before* a batch is punched, listing the batch as evicted.
It may therefore name pages that were finally not punched (touched during the
window) or that were fetched back since.  That is safe by construction: a page
present in the memfd is always newer than any stored copy, so recovery trusts
the memfd wherever it holds data and the map only for holes.

One ``.npz`` per VM, replaced atomically (write, fsync, rename, fsync the
directory).  Cost is proportional to the evicted pages (8 bytes each).

Beside it, the *removals log* (``<vm>.removed``): evicted or prepared pages
the VMM discarded (a balloon's ``MADV_REMOVE``) since the map was last
written.  The map is rewritten soon after such a discard, but in a thread; a
wsd killed before that would find the pages still listed, see holes and bring
back their old bytes where the guest must read zeros.  So the removal is
appended to the log on the event loop, before anything else runs, with a
plain ``write`` (no fsync: the page cache outlives a wsd crash, and a host
crash takes the VM with it).  Each record names the page and the generation
the map lists it at: a restart drops a listed page only at exactly that
generation, so a later eviction of the same page (a newer generation) is
never taken for the removal.  A map written after the last append makes the
log obsolete, and it is deleted.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from wsd.atomicfile import write_atomically

FORMAT: Final = "wsd-pagemap-1"
REMOVED_MAGIC: Final = b"wsdrm\x00\x00\x01"
REMOVED_RECORD: Final = np.dtype([("region", "<u4"), ("generation", "<u4"), ("page", "<u8")])


@dataclass(frozen=True)
class RegionMap:
    """One region's evicted pages (ascending) and the generation each was stored at."""

    offset: int  # of the region in its memfd
    size: int
    page_size: int
    pages: npt.NDArray[np.int64]
    generations: npt.NDArray[np.uint32]


@dataclass(frozen=True)
class VmMap:
    vm_id: str
    regions: tuple[RegionMap, ...]
    removed: npt.NDArray[np.void] = field(default_factory=lambda: np.empty(0, REMOVED_RECORD))
    """Read back only: the removals logged since the map was written (``load_removed``)."""


class PageMapError(Exception):
    """A page map file that cannot be trusted, naming the file and what is wrong."""


def path_for(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.pagemap.npz"


def save(state_dir: Path, vm: VmMap) -> Path:
    """Write ``vm`` durably and atomically; the path written."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = {
        "format": FORMAT,
        "vm_id": vm.vm_id,
        "regions": [
            {"offset": r.offset, "size": r.size, "page_size": r.page_size} for r in vm.regions
        ],
    }
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    }
    for i, r in enumerate(vm.regions):
        arrays[f"pages{i}"] = r.pages.astype(np.int64, copy=False)
        arrays[f"generations{i}"] = r.generations.astype(np.uint32, copy=False)
    final = path_for(state_dir, vm.vm_id)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_atomically(final, buf.getvalue())
    return final


def remove(state_dir: Path, vm_id: str) -> None:
    path_for(state_dir, vm_id).unlink(missing_ok=True)
    clear_removed(state_dir, vm_id)


def removed_path(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.removed"


def append_removed(
    state_dir: Path,
    vm_id: str,
    region: int,
    pages: npt.NDArray[np.int64],
    generations: npt.NDArray[np.uint32],
) -> None:
    """Log that the VMM removed ``pages`` of ``region``, which the map on disk
    may list at ``generations``.  Blocking, but one small write."""
    records = np.empty(len(pages), dtype=REMOVED_RECORD)
    records["region"] = region
    records["generation"] = generations
    records["page"] = pages
    # No mkdir: this runs on the event loop, and the session's description
    # was written into state_dir at its hand-off.
    fd = os.open(
        removed_path(state_dir, vm_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        data = records.tobytes()
        if os.fstat(fd).st_size == 0:
            data = REMOVED_MAGIC + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def load_removed(state_dir: Path, vm_id: str) -> npt.NDArray[np.void]:
    """The removals logged since the map was last written (``REMOVED_RECORD``s).

    A record cut short by a crash in the middle of its write is ignored: its
    removal never reached the log, as if wsd had died just before.
    """
    path = removed_path(state_dir, vm_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return np.empty(0, dtype=REMOVED_RECORD)
    except OSError as e:
        raise PageMapError(f"{path}: unreadable removals log: {e}") from e
    if not data:
        return np.empty(0, dtype=REMOVED_RECORD)
    if not data.startswith(REMOVED_MAGIC):
        raise PageMapError(f"{path}: not a removals log (it starts with {data[:8]!r})")
    body = data[len(REMOVED_MAGIC) :]
    whole = len(body) - len(body) % REMOVED_RECORD.itemsize
    return np.frombuffer(body[:whole], dtype=REMOVED_RECORD).copy()


def clear_removed(state_dir: Path, vm_id: str) -> None:
    removed_path(state_dir, vm_id).unlink(missing_ok=True)


def load(path: Path) -> VmMap:
    """Read and validate a page map file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            if header.get("format") != FORMAT:
                raise PageMapError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
            regions = []
            for i, r in enumerate(header["regions"]):
                pages = np.asarray(z[f"pages{i}"], dtype=np.int64)
                gens = np.asarray(z[f"generations{i}"], dtype=np.uint32)
                npages = r["size"] // r["page_size"]
                if pages.shape != gens.shape:
                    raise PageMapError(
                        f"{path}: region {i}: pages and generations differ in length"
                    )
                if len(pages) and (pages.min() < 0 or pages.max() >= npages):
                    raise PageMapError(f"{path}: region {i}: page index outside [0, {npages})")
                regions.append(RegionMap(r["offset"], r["size"], r["page_size"], pages, gens))
            return VmMap(header["vm_id"], tuple(regions))
    except PageMapError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PageMapError(f"{path}: unreadable page map: {e}") from e


def region_map(
    offset: int,
    size: int,
    page_size: int,
    evicted: npt.NDArray[np.bool_],
    gens: Sequence[int] | npt.NDArray[np.uint32],
) -> RegionMap:
    pages = np.flatnonzero(evicted).astype(np.int64)
    return RegionMap(offset, size, page_size, pages, np.asarray(gens, dtype=np.uint32)[pages])
