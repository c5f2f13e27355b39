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

The map is a *snapshot* and a *journal*.  The snapshot, one ``.npz`` per VM,
is replaced atomically (write, fsync, rename, fsync the directory).  Writing
it costs O(evicted pages), 12 bytes each, and building it on the event loop
O(guest pages): for a 16 GiB guest half evicted, 15 ms of the loop, then
25 MB written and fsynced (0.14 s in all, ``bench/pagemap_write.py``).  So
it is written only now and then (a *compaction*), and what changes in
between is appended to the journal, ``<vm>.journal.<seq>``, 16 bytes per
page: O(batch) per eviction.  Each snapshot names the first
journal it does not hold (``journal`` in its header); loading replays the
journals from that one on, in order:

* ``LISTED``: the page is evicted at this generation.  Appended and
  fdatasynced before the batch is punched.
* ``UNLISTED``: the page listed at this generation was finally not punched
  (touched in the window, its region no longer evictable).
* ``REMOVED``: the VMM discarded the page listed at this generation (a
  balloon's ``MADV_REMOVE``).  Its next touch must read zeros, never the old
  bytes; a restart finds it listed and marked removed, and treats it as the
  dead wsd did (``resume.adopt``).

``UNLISTED`` and ``REMOVED`` are plain writes on the event loop, made as the
fact is known and before anything else runs (no fsync: the page cache
outlives a wsd crash, and a host crash takes the VM with it).  Replaying in
order is what keeps a later eviction of a removed page from being taken for
the removal, even at a generation a restart reused.  Journal numbers only
grow: a wsd starts above every journal on disk, and each compaction takes
the next number and deletes the older journals once its snapshot is
written, so an earlier wsd's journals are never replayed over it.

``<vm>.removed``, the removals log of earlier versions, is still read (after
the snapshot, before the journals) and deleted by the next compaction.

``<vm>.ceiling``, beside the map, holds the VM's *generation ceiling*: no page
of the VM was ever stored at that generation or above it.  It is raised
(replaced atomically) before anything is stored at it, and outlives the
session: a restarted wsd, and the next session of the same VM, start every
page the map does not list right below it.  A page's own last generation
is on disk only while the map lists it, and a store may still hold, or an
attacker have kept, a record at any generation the page was stored at: one
that came round again would pass every check, encryption included.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from wsd.atomicfile import create_new, remove_leftovers, write_atomically

FORMAT: Final = "wsd-pagemap-1"
REMOVED_MAGIC: Final = b"wsdrm\x00\x00\x01"
REMOVED_RECORD: Final = np.dtype([("region", "<u4"), ("generation", "<u4"), ("page", "<u8")])
JOURNAL_MAGIC: Final = b"wsdpj\x00\x00\x01"
# 16 bytes; a region number fits in 16 bits (protocol.MAX_REGIONS is 512).
JOURNAL_RECORD: Final = np.dtype(
    [("page", "<u8"), ("generation", "<u4"), ("region", "<u2"), ("op", "u1"), ("pad", "u1")]
)
_JOURNAL_NAME: Final = re.compile(r"\.journal\.(\d+)")
MAX_GENERATION: Final = 0xFFFFFFFF


class JournalOp(enum.IntEnum):
    LISTED = 1
    UNLISTED = 2
    REMOVED = 3


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
    """Read back only: listed pages the VMM removed (``REMOVED_RECORD``s), each at the
    generation it is listed at."""
    journal: int = 0
    """The first journal this snapshot does not hold."""


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
        "journal": vm.journal,
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
    """Delete the session's map (its ceiling stays, for the VM's next session)."""
    path_for(state_dir, vm_id).unlink(missing_ok=True)
    clear_removed(state_dir, vm_id)
    drop_journals(state_dir, vm_id, below=None)
    remove_temporaries(state_dir, vm_id)


def remove_temporaries(state_dir: Path, vm_id: str) -> None:
    """What writes of ``vm_id``'s snapshot, journals or ceiling left when a crash cut them short."""
    remove_leftovers(state_dir, rf"{re.escape(vm_id)}\.(?:pagemap\.npz|journal\.\d+|ceiling)")


def ceiling_path(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.ceiling"


def load_ceiling(state_dir: Path, vm_id: str) -> int:
    """``vm_id``'s generation ceiling; 0 if none was ever written."""
    path = ceiling_path(state_dir, vm_id)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as e:
        raise PageMapError(f"{path}: unreadable generation ceiling: {e}") from e
    try:
        ceiling = int(text)
    except ValueError:
        raise PageMapError(f"{path}: not a generation ceiling: {text[:40]!r}") from None
    if not 0 < ceiling <= MAX_GENERATION:
        raise PageMapError(f"{path}: generation ceiling {ceiling} outside [1, {MAX_GENERATION}]")
    return ceiling


def save_ceiling(state_dir: Path, vm_id: str, ceiling: int) -> None:
    """Raise the ceiling durably (blocking: a thread's work)."""
    if not 0 < ceiling <= MAX_GENERATION:
        raise ValueError(f"generation ceiling {ceiling} outside [1, {MAX_GENERATION}]")
    write_atomically(ceiling_path(state_dir, vm_id), f"{ceiling}\n".encode())


def removed_path(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.removed"


def load_removed(state_dir: Path, vm_id: str) -> npt.NDArray[np.void]:
    """The removals log of earlier versions (``REMOVED_RECORD``s).

    A record cut short by a crash in the middle of its write is ignored: its
    removal never reached the log, as if wsd had died just before.
    """
    path = removed_path(state_dir, vm_id)
    if not path.exists():
        return np.empty(0, dtype=REMOVED_RECORD)
    return _read_records(path, REMOVED_MAGIC, REMOVED_RECORD, "removals log")


def _read_records(
    path: Path, magic: bytes, dtype: np.dtype[np.void], what: str
) -> npt.NDArray[np.void]:
    """The records of a file of ``magic`` then ``dtype`` records; a record cut
    short by a crash in its write is ignored, as if wsd had died just before it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PageMapError(f"{path}: unreadable {what}: {e}") from e
    if not data:
        return np.empty(0, dtype=dtype)
    if not data.startswith(magic):
        raise PageMapError(f"{path}: not a {what} (it starts with {data[:8]!r})")
    body = data[len(magic) :]
    whole = len(body) - len(body) % dtype.itemsize
    return np.frombuffer(body[:whole], dtype=dtype).copy()


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
            journal = int(header.get("journal", 0))
            return VmMap(header["vm_id"], tuple(regions), journal=journal)
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


# -- the journal ------------------------------------------------------------------


def journal_path(state_dir: Path, vm_id: str, seq: int) -> Path:
    return state_dir / f"{vm_id}.journal.{seq}"


def journals(state_dir: Path, vm_id: str) -> list[int]:
    """The numbers of ``vm_id``'s journals on disk, ascending."""
    prefix = f"{vm_id}.journal."
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and (m := _JOURNAL_NAME.fullmatch(name, len(vm_id))):
            found.append(int(m.group(1)))
    return sorted(found)


def next_journal(state_dir: Path, vm_id: str) -> int:
    """A journal number above every journal on disk and the snapshot's own."""
    path = path_for(state_dir, vm_id)
    held = 0
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                held = int(json.loads(bytes(z["header"]).decode()).get("journal", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PageMapError(f"{path}: unreadable page map: {e}") from e
    return max([held, *(seq + 1 for seq in journals(state_dir, vm_id))])


def drop_journals(state_dir: Path, vm_id: str, *, below: int | None) -> None:
    """Delete ``vm_id``'s journals numbered below ``below`` (None: all of them)."""
    for seq in journals(state_dir, vm_id):
        if below is None or seq < below:
            journal_path(state_dir, vm_id, seq).unlink(missing_ok=True)


def journal_records(
    op: JournalOp,
    region: int,
    pages: npt.NDArray[np.int64],
    generations: npt.NDArray[np.uint32],
) -> npt.NDArray[np.void]:
    records = np.zeros(len(pages), dtype=JOURNAL_RECORD)
    records["page"] = pages
    records["generation"] = generations
    records["region"] = region
    records["op"] = op
    return records


def append_journal(
    state_dir: Path, vm_id: str, seq: int, records: npt.NDArray[np.void], *, durable: bool
) -> bool:
    """Append ``records`` to journal ``seq``; whether this call created the file.

    ``durable``: fdatasync it before returning; the caller fsyncs the
    directory the first time.  Blocking, but small.  The loop and a worker
    thread may both append to the same journal (:class:`~wsd.evictor.evictor.Evictor`):
    each ``O_APPEND`` write lands whole, and the file only ever appears with
    its magic already in it.
    """
    path = journal_path(state_dir, vm_id, seq)
    created = False
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            # Never with O_CREAT: two appenders could each create the file and
            # write the magic, and the second would shift every later record.
            created = create_new(path, JOURNAL_MAGIC) or created
    try:
        view = memoryview(records.tobytes())
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return created


def load_journal(state_dir: Path, vm_id: str, seq: int) -> npt.NDArray[np.void]:
    """Journal ``seq``'s records (see :func:`_read_records`)."""
    path = journal_path(state_dir, vm_id, seq)
    records = _read_records(path, JOURNAL_MAGIC, JOURNAL_RECORD, "page map journal")
    bad = ~np.isin(records["op"], [int(op) for op in JournalOp])
    if bad.any():
        raise PageMapError(f"{path}: record {int(np.argmax(bad))} has an unknown operation")
    return records


def replay(vm: VmMap, records: npt.NDArray[np.void], *, source: str) -> VmMap:
    """``vm`` with journal ``records`` applied in order (see the module's docstring).

    Vectorised, because a restart waits for it: a journal may hold as many
    records as the snapshot lists pages, millions for a large guest.  Per
    page, only the records from its last ``LISTED`` on count (or all of
    them, over the snapshot's listing, if it has none): they cannot change
    its generation, so an ``UNLISTED`` at that generation deletes the listing
    and otherwise a ``REMOVED`` at it marks the page removed, whatever their
    order.  A ``LISTED`` clears an earlier mark.
    """
    if not len(records):
        return vm
    regions = list(vm.regions)
    removed = [vm.removed]
    for i in np.unique(records["region"]).tolist():
        if i >= len(regions):
            raise PageMapError(f"{source}: a record names region {i}, the map has {len(regions)}")
        r = regions[i]
        npages = r.size // r.page_size
        mine = records[records["region"] == i]
        if int(mine["page"].max()) >= npages:
            raise PageMapError(f"{source}: region {i}: page index outside [0, {npages})")
        # Marks from earlier replays come first, as the REMOVED records they were.
        earlier = removed[0][removed[0]["region"] == i]
        removed[0] = removed[0][removed[0]["region"] != i]
        marks = np.zeros(len(earlier), dtype=JOURNAL_RECORD)
        marks["page"], marks["generation"] = earlier["page"], earlier["generation"]
        marks["op"] = JournalOp.REMOVED
        mine = np.concatenate((marks, mine))
        page = mine["page"].astype(np.int64)
        gen, op = mine["generation"], mine["op"]
        touched, k = np.unique(page, return_inverse=True)
        order = np.arange(len(mine))
        last = np.full(len(touched), -1, dtype=np.int64)
        listing = op == JournalOp.LISTED
        np.maximum.at(last, k[listing], order[listing])
        at = np.minimum(np.searchsorted(r.pages, touched), max(len(r.pages) - 1, 0))
        in_snapshot = (r.pages[at] == touched) if len(r.pages) else np.zeros(len(touched), bool)
        relisted = last >= 0
        base = np.where(
            relisted, gen[np.maximum(last, 0)], r.generations[at] if len(r.pages) else 0
        )
        listed = relisted | in_snapshot
        after = (order > last[k]) & (gen == base[k])
        deleted = np.zeros(len(touched), bool)
        deleted[k[after & (op == JournalOp.UNLISTED)]] = True
        marked = np.zeros(len(touched), bool)
        marked[k[after & (op == JournalOp.REMOVED)]] = True
        listed &= ~deleted
        marked &= listed
        keep = ~np.isin(r.pages, touched)
        pages = np.concatenate((r.pages[keep], touched[listed]))
        gens = np.concatenate((r.generations[keep], base[listed].astype(np.uint32)))
        sort = np.argsort(pages, kind="stable")
        regions[i] = RegionMap(r.offset, r.size, r.page_size, pages[sort], gens[sort])
        mark = np.empty(int(marked.sum()), dtype=REMOVED_RECORD)
        mark["region"], mark["page"], mark["generation"] = i, touched[marked], base[marked]
        removed.append(mark)
    return dataclasses.replace(vm, regions=tuple(regions), removed=np.concatenate(removed))


def load_vm(state_dir: Path, vm_id: str) -> VmMap | None:
    """``vm_id``'s page map: the snapshot, then the removals log of earlier
    versions, then the journals the snapshot does not hold, in order.  None if
    no snapshot was ever written (nothing was evicted)."""
    path = path_for(state_dir, vm_id)
    if not path.exists():
        return None
    vm = load(path)
    legacy = load_removed(state_dir, vm_id)
    if len(legacy):
        vm = replay(vm, _as_removals(legacy), source=str(removed_path(state_dir, vm_id)))
    for seq in journals(state_dir, vm_id):
        if seq >= vm.journal:
            source = str(journal_path(state_dir, vm_id, seq))
            vm = replay(vm, load_journal(state_dir, vm_id, seq), source=source)
    return vm


def _as_removals(legacy: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
    records = np.zeros(len(legacy), dtype=JOURNAL_RECORD)
    records["page"] = legacy["page"]
    records["generation"] = legacy["generation"]
    records["region"] = legacy["region"]
    records["op"] = JournalOp.REMOVED
    return records
