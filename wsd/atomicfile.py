"""Crash-safe replacement of a small file."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def temporary(path: Path) -> tuple[int, str]:
    """A new temporary file (fd, path) beside ``path``, for writing its next version.

    Named ``.<name>.<random>.tmp``, which :func:`remove_leftovers` recognises.
    """
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def remove_leftovers(directory: Path, names: str) -> None:
    """Delete the temporary files of writes that a crash cut short, beside the
    files whose names the regular expression ``names`` matches whole.

    A crash mid-write leaves one each time (a page map snapshot can be tens
    of MB); call this only when nothing may be writing those files.
    """
    leftover = re.compile(rf"\.(?:{names})\.[a-z0-9_]+\.tmp")
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in entries:
        if leftover.fullmatch(name):
            (directory / name).unlink(missing_ok=True)


def create_new(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data``, unless it exists; whether this call did.

    Written aside and linked into place, so the file never exists without
    ``data``: a writer that opens it after this returns finds ``data`` first.
    Not synced: the caller syncs the file and the directory if it must.
    """
    fd, tmp = temporary(path)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    After a crash the file holds either the old or the new bytes, never a mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
