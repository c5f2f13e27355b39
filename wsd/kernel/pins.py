"""Keeping memfd pages readable across a punch: references held by pipes.

``vmsplice`` (without ``SPLICE_F_GIFT``) does not copy: each pipe buffer takes
a reference on the page behind the given user address.  Punching a hole
removes the page from the memfd and zaps every mapping of it, but the pipe's
reference keeps the page itself alive, bytes included, and every write any
mapping made to it before its PTE was zapped landed in it.  After the punch no
write can reach that page (the next access to the hole faults), so reading
the pipe yields the page's *final* bytes.

The reference also keeps the page from being replaced under the VMM: page
migration and khugepaged collapse both refuse a page that has references they
do not account for, so until the punch the VMM writes to exactly the page the
pipe holds.

wsd takes the references through its own read-only ``MAP_SHARED`` mapping of
the memfd, which is not registered with any uffd, so taking them traps
nothing.  The mapping only lives while the references are taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from typing_extensions import Buffer

from ._ffi import ffi, libc
from .errors import AddressRange, KernelError, oserror

__all__ = ["HeldPages"]

SPLICE_F_NONBLOCK = 0x02
PROT_READ = 0x1
MAP_SHARED = 0x01
MAP_FAILED = ffi.cast("void *", -1)

# Bigger pipes mean fewer of them; 1 MiB is the default pipe-max-size, the
# most an unprivileged (or capability-less root) process may ask for.
PIPE_BYTES = 1 << 20
_PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


def _pipe_bytes() -> int:
    try:
        return min(PIPE_BYTES, int(_PIPE_MAX_SIZE.read_text()))
    except (OSError, ValueError):
        return 64 << 10


class _Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held = 0
        # Over the per-user pipe quota a smaller pipe still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, _pipe_bytes())

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class HeldPages:
    """References to the pages of some byte spans of a memfd, readable after a punch.

    ``spans`` are ``(file offset, length)`` pairs, aligned to the memfd's page
    size and ascending.  :meth:`read_into` copies their bytes, in span order,
    as they are at the time of the read (the final bytes once punched).
    """

    def __init__(self, fd: int, spans: Sequence[tuple[int, int]], page_size: int) -> None:
        self.fd = fd
        self.length = sum(n for _, n in spans)
        self._pipes: list[_Pipe] = []
        if not spans:
            return
        base = spans[0][0]
        map_len = spans[-1][0] + spans[-1][1] - base
        if base % page_size or map_len % page_size:
            raise ValueError(f"spans are not aligned to the page size {page_size}")
        addr = libc.mmap(ffi.NULL, map_len, PROT_READ, MAP_SHARED, fd, base)
        if addr == MAP_FAILED:
            raise oserror("mmap", ffi.errno, range=AddressRange(base, map_len), fd=fd)
        try:
            start = int(ffi.cast("uintptr_t", addr))
            for offset, length in spans:
                self._splice(start + offset - base, length, offset)
        except BaseException:
            self.close()
            raise
        finally:
            # The pipes hold the pages; our mapping of them is no longer needed.
            libc.munmap(addr, map_len)

    def _splice(self, addr: int, length: int, offset: int) -> None:
        iov = ffi.new("struct iovec *")
        done = 0
        while done < length:
            if not self._pipes:
                self._pipes.append(_Pipe())
            pipe = self._pipes[-1]
            iov.iov_base = ffi.cast("void *", addr + done)
            iov.iov_len = length - done
            n = libc.vmsplice(pipe.w, iov, 1, SPLICE_F_NONBLOCK)
            if n < 0:
                err = ffi.errno
                if err == errno.EAGAIN:  # this pipe is full
                    self._pipes.append(_Pipe())
                    continue
                raise oserror(
                    "vmsplice", err, range=AddressRange(offset + done, length - done), fd=self.fd
                )
            if n == 0:
                raise KernelError(
                    errno.EIO, "vmsplice", range=AddressRange(offset + done, length - done)
                )
            pipe.held += n
            done += n

    def read_into(self, buf: Buffer) -> None:
        """Copy every held byte into ``buf`` (exactly :attr:`length` bytes), releasing them."""
        view = memoryview(buf).cast("B")
        if len(view) != self.length:
            raise ValueError(f"buffer of {len(view)} bytes for {self.length} held")
        pos = 0
        for pipe in self._pipes:
            end = pos + pipe.held
            while pos < end:
                try:
                    pos += os.readv(pipe.r, [view[pos:end]])
                except OSError as e:
                    raise oserror("read(pipe)", e.errno or errno.EIO, fd=pipe.r) from e
            pipe.held = 0

    def close(self) -> None:
        """Drop every reference still held."""
        pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
