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

import array
import contextlib
import errno
import fcntl
import os
import termios
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from typing_extensions import Buffer

from ._ffi import ffi, libc
from .errors import AddressRange, KernelError, oserror
from .sched import COPY_SLICE_BYTES

__all__ = ["HeldPages", "PipePool", "empty_pipe", "peek_pipe"]

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
        self.held = 0  # bytes in it, the label's included
        # Over the per-user pipe quota a smaller pipe still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, _pipe_bytes())
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Pipes that :class:`HeldPages` fills and empties again, for a caller that
    must keep them somewhere else too (systemd's fd store) and would rather
    hand them over once than at every use.

    With a pool, reading held pages does not consume them: :meth:`HeldPages.read_into`
    duplicates each pipe's buffers into a scratch pipe with ``tee(2)``, which
    takes references and copies nothing, and reads that.  The pool's pipes
    keep the pages until :meth:`HeldPages.release`.
    """

    def __init__(self) -> None:
        self.pipes: list[_Pipe] = []
        self._scratch: _Pipe | None = None
        self.refilled = False
        """What the pipes hold was written by :meth:`refill`: bytes, not references."""

    @property
    def read_ends(self) -> list[int]:
        return [pipe.r for pipe in self.pipes]

    def scratch(self) -> _Pipe:
        if self._scratch is None:
            self._scratch = _Pipe()
        return self._scratch

    def empty(self) -> None:
        """Drop every reference the pipes hold: what a punch left in them after
        reading it back failed, once it is put back some other way."""
        for pipe in self.pipes:
            _read_all(pipe.r)
            pipe.held = 0
        self.refilled = False

    def refill(self, data: Buffer) -> None:
        """Replace what the pipes hold with a copy of ``data``, written across them
        in order, so that their contents joined are ``data`` again.

        Referenced pages (``splice``, ``vmsplice``) are the file's own; written
        bytes sit in the kernel's pipe buffers instead, which on hugetlbfs gives
        the punched pages back to the pool.  Written, a byte takes no more room
        than it did referenced, so what came out of the pipes fits.
        """
        self.empty()
        view = memoryview(data).cast("B")
        pos = 0
        for pipe in self.pipes:
            while pos < len(view):
                try:
                    n = os.write(pipe.w, view[pos:])
                except BlockingIOError:
                    break  # this pipe is full
                except OSError as e:
                    raise oserror("write(pipe)", e.errno or errno.EIO, fd=pipe.w) from e
                pipe.held += n
                pos += n
        if pos < len(view):
            raise KernelError(
                errno.ENOSPC, "write(pipe)", detail=f"{pos} of {len(view)} bytes fit in the pool"
            )
        self.refilled = True

    def detach_read_ends(self) -> list[int]:
        """The pipes' read ends, now the caller's, in order; every other fd
        closed and the pool empty.  What the pipes hold stays readable."""
        read_ends = self.read_ends
        for pipe in self.pipes:
            os.close(pipe.w)
        self.pipes = []
        self.close()
        return read_ends

    def close(self) -> None:
        pipes, self.pipes = self.pipes, []
        if self._scratch is not None:
            pipes.append(self._scratch)
            self._scratch = None
        for pipe in pipes:
            pipe.close()


class _NoSpliceRead(Exception):
    """The file cannot be spliced from (hugetlbfs): take references through a mapping."""


class HeldPages:
    """References to the pages of some byte spans of a memfd, readable after a punch.

    ``spans`` are ``(file offset, length)`` pairs, aligned to the memfd's page
    size and ascending.  :meth:`read_into` copies their bytes, in span order,
    as they are at the time of the read (the final bytes once punched).

    ``label``, if any, is written into the first pipe ahead of the pages, so
    that the pipes describe themselves to whoever reads them without this
    object (:func:`peek_pipe`, after a crash); :meth:`read_into` skips it.
    It must fit in a pipe (64 KiB at least).

    ``pool``: take the pipes from it (growing it when it has too few), read
    them without consuming them, and leave them open; :meth:`release` empties
    them for the next use.  Its pipes must be empty.
    """

    def __init__(
        self,
        fd: int,
        spans: Sequence[tuple[int, int]],
        page_size: int,
        *,
        label: bytes = b"",
        pool: PipePool | None = None,
    ) -> None:
        self.fd = fd
        self.length = sum(n for _, n in spans)
        self._pool = pool
        self._pipes: list[_Pipe] = []
        self._label = len(label)
        if pool is not None and any(p.held for p in pool.pipes):
            raise KernelError(errno.EBUSY, "splice", detail="the pipe pool still holds pages")
        if not spans:
            return
        try:
            if label:
                first = self._next_pipe()
                written = os.write(first.w, label)
                if written != len(label):
                    raise KernelError(errno.EMSGSIZE, "write(pipe)", detail="label too long")
                first.held += written
            try:
                for offset, length in spans:
                    self._hold(offset, length, self._splice_file)
            except _NoSpliceRead:
                self._hold_mapped(spans, page_size)
            if pool is not None:
                # tee(2) cannot resume part way, so the scratch pipe must take a
                # whole pipe at once: checked here, before anything is punched.
                scratch = pool.scratch()
                if any(p.capacity > scratch.capacity for p in self._pipes):
                    raise KernelError(
                        errno.ENOSPC, "tee", detail="scratch pipe smaller than a pipe"
                    )
        except BaseException:
            self.release()
            raise

    def _next_pipe(self) -> _Pipe:
        pool = self._pool
        if pool is not None and len(self._pipes) < len(pool.pipes):
            pipe = pool.pipes[len(self._pipes)]
        else:
            pipe = _Pipe()
            if pool is not None:
                pool.pipes.append(pipe)
        self._pipes.append(pipe)
        return pipe

    def _hold(self, pos: int, length: int, splice: Callable[[int, int, int], int]) -> None:
        """Move references to ``length`` bytes at ``pos`` into pipes, adding pipes as they fill."""
        done = 0
        while done < length:
            pipe = self._pipes[-1] if self._pipes else self._next_pipe()
            try:
                n = splice(pipe.w, pos + done, length - done)
            except BlockingIOError:  # this pipe is full
                self._next_pipe()
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
            # EINVAL on the very first splice (only a label held so far): the
            # file has no splice_read.
            if e.errno == errno.EINVAL and sum(p.held for p in self._pipes) == self._label:
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

    def read_into(self, buf: Buffer) -> None:
        """Copy every held byte into ``buf`` (at least :attr:`length` bytes).

        Without a pool this releases the pages; with one they stay held.
        """
        view = memoryview(buf).cast("B")
        if len(view) < self.length:
            raise ValueError(f"buffer of {len(view)} bytes for {self.length} held")
        pos = 0
        skip = self._label
        for pipe in self._pipes:
            source = pipe.r
            if self._pool is not None:
                source = self._pool.scratch().r
                _tee(pipe.r, self._pool.scratch().w, pipe.held)
            if skip:
                _drain(source, memoryview(bytearray(skip)))
            end = pos + pipe.held - skip
            _drain(source, view[pos:end])
            pos, skip = end, 0
            if self._pool is None:
                pipe.held = 0

    def release(self) -> None:
        """Drop every reference still held (a pool's pipes are emptied, not closed)."""
        pipes, self._pipes = self._pipes, []
        if self._pool is None:
            for pipe in pipes:
                pipe.close()
            return
        for pipe in pipes:
            if pipe.held:
                _read_all(pipe.r)
                pipe.held = 0

    def close(self) -> None:
        """Without a pool, :meth:`release`; with one, nothing: the pipes may hold the only
        copy of something (a failure after a punch), and the pool's owner decides."""
        if self._pool is None:
            self.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tee(src: int, dst: int, length: int) -> None:
    """Duplicate all ``length`` bytes of pipe ``src`` into the empty pipe ``dst``."""
    n = int(libc.tee(src, dst, length, SPLICE_F_NONBLOCK))
    if n < 0:
        raise oserror("tee", ffi.errno, fd=src)
    if n != length:
        raise KernelError(errno.EIO, "tee", fd=src, detail=f"{n} of {length} bytes")


def _drain(fd: int, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        try:
            n = os.readv(fd, [view[pos : pos + COPY_SLICE_BYTES]])  # pipe_read never yields
        except OSError as e:
            raise oserror("read(pipe)", e.errno or errno.EIO, fd=fd) from e
        if n == 0:
            raise KernelError(errno.EIO, "read(pipe)", fd=fd, detail="ended early")
        pos += n


def peek_pipe(fd: int) -> bytes:
    """Everything the pipe ``fd`` (a read end) holds, left in it.

    For a :class:`HeldPages` pipe that outlived its process: what it holds
    may be the only copy, so it is read from a ``tee(2)`` of it, and stays
    until the caller closes it.
    """
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count)
        size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError as e:
        raise oserror("ioctl(FIONREAD)", e.errno or errno.EIO, fd=fd) from e
    if not count[0]:
        return b""
    scratch = _Pipe()
    try:
        if scratch.capacity < size:
            try:
                fcntl.fcntl(scratch.w, fcntl.F_SETPIPE_SZ, size)
            except OSError as e:
                raise oserror("fcntl(F_SETPIPE_SZ)", e.errno or errno.EIO, fd=fd) from e
        _tee(fd, scratch.w, count[0])
        out = bytearray(count[0])
        _drain(scratch.r, memoryview(out))
        return bytes(out)
    finally:
        scratch.close()


def empty_pipe(fd: int) -> None:
    """Discard what the pipe ``fd`` (a read end) holds, without waiting for more.

    Reading a pipe's buffers releases the pages they reference, whoever else
    holds the pipe open (systemd's fd store, a VMM).
    """
    count = array.array("i", [0])
    while True:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, count)
            if not count[0]:
                return
            os.read(fd, count[0])
        except BlockingIOError:
            return
        except OSError as e:
            raise oserror("read(pipe)", e.errno or errno.EIO, fd=fd) from e


def _read_all(fd: int) -> None:
    """Empty a pipe whose writer is ours (nothing more will come)."""
    while True:
        try:
            if not os.read(fd, 1 << 20):
                return
        except BlockingIOError:
            return
        except OSError as e:
            raise oserror("read(pipe)", e.errno or errno.EIO, fd=fd) from e
