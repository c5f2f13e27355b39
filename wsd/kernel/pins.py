"""Keeping memfd pages readable across a punch: references held by pipes.

Splicing a shmem file into a pipe does not copy: each pipe buffer takes a
reference on the page-cache page.  Punching a hole removes the page from the
memfd and zaps every mapping of it, but the pipe's reference keeps the page
itself alive, bytes included, and every write any mapping made to it before
its PTE was zapped landed in it.  After the punch no write can reach that page
(the next access to the hole faults), so reading the pipe yields the page's
*final* bytes.

The reference also keeps the page from being replaced under the VMM: page
migration and khugepaged collapse both refuse a page that has references they
do not account for, so until the punch the VMM writes to exactly the page the
pipe holds.

hugetlbfs has no ``splice_read``.  There the references are taken with
``vmsplice`` (without ``SPLICE_F_GIFT``, which references the pages behind the
given addresses instead of copying them) from wsd's own read-only
``MAP_SHARED`` mapping of the memfd.  That mapping is not registered with any
uffd, so taking the references traps nothing, and it is unmapped right after.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from typing_extensions import Buffer

from ._ffi import ffi, libc
from .errors import AddressRange, KernelError, oserror

__all__ = ["HeldPages", "read_pipe"]

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


class _NoSpliceRead(Exception):
    """The file cannot be spliced from (hugetlbfs): take references through a mapping."""


class HeldPages:
    """References to the pages of some byte spans of a memfd, readable after a punch.

    ``spans`` are ``(file offset, length)`` pairs, aligned to the memfd's page
    size and ascending.  :meth:`read_into` copies their bytes, in span order,
    as they are at the time of the read (the final bytes once punched).

    ``label``, if any, is written into the first pipe ahead of the pages, so
    that the pipes describe themselves to whoever reads them without this
    object (:func:`read_pipe`, after a crash); :meth:`read_into` skips it.
    It must fit in a pipe (64 KiB at least).
    """

    def __init__(
        self, fd: int, spans: Sequence[tuple[int, int]], page_size: int, *, label: bytes = b""
    ) -> None:
        self.fd = fd
        self.length = sum(n for _, n in spans)
        self._pipes: list[_Pipe] = []
        self._label = len(label)
        if not spans:
            return
        try:
            if label:
                self._pipes.append(_Pipe())
                written = os.write(self._pipes[0].w, label)
                if written != len(label):
                    raise KernelError(errno.EMSGSIZE, "write(pipe)", detail="label too long")
            try:
                for offset, length in spans:
                    self._hold(offset, length, self._splice_file)
            except _NoSpliceRead:
                self._hold_mapped(spans, page_size)
        except BaseException:
            self.close()
            raise

    def _hold(self, pos: int, length: int, splice: Callable[[int, int, int], int]) -> None:
        """Move references to ``length`` bytes at ``pos`` into pipes, adding pipes as they fill."""
        done = 0
        while done < length:
            if not self._pipes:
                self._pipes.append(_Pipe())
            pipe = self._pipes[-1]
            try:
                n = splice(pipe.w, pos + done, length - done)
            except BlockingIOError:  # this pipe is full
                self._pipes.append(_Pipe())
                continue
            if n == 0:
                where = AddressRange(pos + done, length - done)
                raise KernelError(errno.EIO, "splice", range=where)
            pipe.held += n
            done += n

    def _splice_file(self, pipe: int, offset: int, length: int) -> int:
        try:
            return os.splice(self.fd, pipe, length, offset_src=offset, flags=SPLICE_F_NONBLOCK)
        except BlockingIOError:
            raise
        except OSError as e:
            if e.errno == errno.EINVAL and not any(p.held for p in self._pipes):
                raise _NoSpliceRead from e
            raise oserror(
                "splice", e.errno or errno.EIO, range=AddressRange(offset, length), fd=self.fd
            ) from e

    def _hold_mapped(self, spans: Sequence[tuple[int, int]], page_size: int) -> None:
        base = spans[0][0]
        map_len = spans[-1][0] + spans[-1][1] - base
        if base % page_size or map_len % page_size:
            raise ValueError(f"spans are not aligned to the page size {page_size}")
        addr = libc.mmap(ffi.NULL, map_len, PROT_READ, MAP_SHARED, self.fd, base)
        if addr == MAP_FAILED:
            raise oserror("mmap", ffi.errno, range=AddressRange(base, map_len), fd=self.fd)
        start = int(ffi.cast("uintptr_t", addr)) - base
        iov = ffi.new("struct iovec *")

        def vmsplice(pipe: int, offset: int, length: int) -> int:
            iov.iov_base = ffi.cast("void *", start + offset)
            iov.iov_len = length
            n = int(libc.vmsplice(pipe, iov, 1, SPLICE_F_NONBLOCK))
            if n < 0:
                err = ffi.errno
                if err == errno.EAGAIN:
                    raise BlockingIOError(err, "pipe full")
                raise oserror("vmsplice", err, range=AddressRange(offset, length), fd=self.fd)
            return n

        try:
            for offset, length in spans:
                self._hold(offset, length, vmsplice)
        finally:
            # The pipes hold the pages; our mapping of them is no longer needed.
            libc.munmap(addr, map_len)

    @property
    def read_ends(self) -> list[int]:
        """The pipes' read ends, in order: what must outlive this process to keep
        the pages (the write ends are not needed to read them)."""
        return [pipe.r for pipe in self._pipes]

    def read_into(self, buf: Buffer) -> None:
        """Copy every held byte into ``buf`` (at least :attr:`length` bytes), releasing them."""
        view = memoryview(buf).cast("B")
        if len(view) < self.length:
            raise ValueError(f"buffer of {len(view)} bytes for {self.length} held")
        if self._label:
            _drain(self._pipes[0].r, memoryview(bytearray(self._label)))
            self._label = 0
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


def _drain(fd: int, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        try:
            n = os.readv(fd, [view[pos:]])
        except OSError as e:
            raise oserror("read(pipe)", e.errno or errno.EIO, fd=fd) from e
        if n == 0:
            raise KernelError(errno.EIO, "read(pipe)", fd=fd, detail="ended early")
        pos += n


def read_pipe(fd: int) -> bytes:
    """Everything a pipe holds, from a read end whose write ends are all closed
    (a :class:`HeldPages` pipe that outlived its process)."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            break  # a writer is still open somewhere: what is there is all there is
        except OSError as e:
            raise oserror("read(pipe)", e.errno or errno.EIO, fd=fd) from e
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
