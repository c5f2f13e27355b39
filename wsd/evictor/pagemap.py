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
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from wsd.atomicfile import write_atomically

FORMAT: Final = "wsd-pagemap-1"


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
