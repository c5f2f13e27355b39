"""The few filesystem calls the file tier needs beyond ``os``, and errno translation."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Final, Unpack

from wsd.storage.errors import StorageError, StorageFull, Where

# linux/falloc.h
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range, keeping the file size (reads return zeros).

    A filesystem that cannot punch holes only loses the space saving: the index entry,
    not the data, says whether a page exists.
    """
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err in {errno.EOPNOTSUPP, errno.ENOSYS}:
        return
    raise OSError(err, f"fallocate(PUNCH_HOLE, {offset:#x}, {length:#x}): {os.strerror(err)}")


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the names created in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(err: OSError, what: str, **where: Unpack[Where]) -> StorageError:
    """Translate an OSError at the backend boundary; ENOSPC/EDQUOT become StorageFull."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    cls = StorageFull if err.errno in _FULL_ERRNOS else StorageError
    return cls(f"{what} failed: {reason} [errno {err.errno}]", **where)
