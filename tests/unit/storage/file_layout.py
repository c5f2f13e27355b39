"""The file tier's on-disk layout, for tests that inspect or damage it."""

from __future__ import annotations

from pathlib import Path

from wsd.storage import PageNamespace


def region_paths(root: Path, ns: PageNamespace) -> tuple[Path, Path]:
    """The data file and the index file of a region."""
    stem = root / ns.vm_id / f"region-{ns.region}"
    return stem.with_suffix(".data"), stem.with_suffix(".index")


def flip(path: Path, position: int) -> None:
    """Flip the lowest bit of one byte of a file."""
    with path.open("r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes((byte ^ 0x01,)))
