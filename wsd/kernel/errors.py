"""Errors raised by wsd.kernel.

Every failed syscall becomes a :class:`KernelError`: an ``OSError`` whose
message names the operation, the errno and the address range (or fd, pid) it
was applied to.  The instance also derives from the builtin ``OSError``
subclass Python would have picked for that errno, so ``except
FileExistsError`` (an ``EEXIST`` from ``UFFDIO_COPY``) or ``except
ProcessLookupError`` keep working.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import os
from dataclasses import dataclass

__all__ = ["AddressRange", "FeatureUnavailable", "KernelError", "oserror"]


@dataclass(frozen=True, slots=True)
class AddressRange:
    """A half-open byte range ``[start, start + length)`` in some address space."""

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0:
            raise ValueError(f"negative address range {self.start:#x}+{self.length:#x}")

    @property
    def end(self) -> int:
        return self.start + self.length

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


def errno_text(err: int) -> str:
    """``EINVAL: Invalid argument``: the errno's name, then what it means."""
    return f"{errno_mod.errorcode.get(err, str(err))}: {os.strerror(err)}"


class KernelError(OSError):
    """A syscall or ioctl failed; carries what was attempted on what."""

    op: str
    range: AddressRange | None
    fd: int | None
    pid: int | None
    detail: str | None

    def __init__(
        self,
        err: int,
        op: str,
        *,
        range: AddressRange | None = None,
        fd: int | None = None,
        pid: int | None = None,
        detail: str | None = None,
    ) -> None:
        context = []
        if range is not None:
            context.append(f"range {range}")
        if fd is not None:
            context.append(f"fd {fd}")
        if pid is not None:
            context.append(f"pid {pid}")
        if detail:
            context.append(detail)
        where = f" ({', '.join(context)})" if context else ""
        super().__init__(err, f"{op} failed: {errno_text(err)}{where}")
        self.op = op
        self.range = range
        self.fd = fd
        self.pid = pid
        self.detail = detail


class FeatureUnavailable(KernelError):
    """The running kernel lacks something wsd needs; says what would provide it."""

    feature: str
    requirement: str

    def __init__(self, feature: str, requirement: str, *, err: int = errno_mod.EOPNOTSUPP) -> None:
        super().__init__(err, f"{feature} is not available", detail=f"needs {requirement}")
        self.feature = feature
        self.requirement = requirement
        # Not OSError's "[Errno 95] ... failed: ...": nothing wsd attempted
        # failed, the kernel lacks something.  strerror too, for code that
        # reports an OSError by its errno and strerror.
        self._text = f"{feature} is not available ({errno_text(err)}); needs {requirement}"
        self.strerror = self._text

    def __str__(self) -> str:
        return self._text


# The builtin OSError subclasses, as PEP 3151 maps errnos to them.
_ERRNO_CLASSES: dict[int, type[OSError]] = {
    errno_mod.EAGAIN: BlockingIOError,
    errno_mod.EALREADY: BlockingIOError,
    errno_mod.EINPROGRESS: BlockingIOError,
    errno_mod.ECHILD: ChildProcessError,
    errno_mod.EPIPE: BrokenPipeError,
    errno_mod.ESHUTDOWN: BrokenPipeError,
    errno_mod.ECONNABORTED: ConnectionAbortedError,
    errno_mod.ECONNREFUSED: ConnectionRefusedError,
    errno_mod.ECONNRESET: ConnectionResetError,
    errno_mod.EEXIST: FileExistsError,
    errno_mod.ENOENT: FileNotFoundError,
    errno_mod.EISDIR: IsADirectoryError,
    errno_mod.ENOTDIR: NotADirectoryError,
    errno_mod.EINTR: InterruptedError,
    errno_mod.EACCES: PermissionError,
    errno_mod.EPERM: PermissionError,
    errno_mod.ESRCH: ProcessLookupError,
    errno_mod.ETIMEDOUT: TimeoutError,
}


@functools.cache
def _class_for(err: int) -> type[KernelError]:
    base = _ERRNO_CLASSES.get(err)
    if base is None:
        return KernelError
    return type(f"Kernel{base.__name__}", (KernelError, base), {"__module__": __name__})


def oserror(
    op: str,
    err: int,
    *,
    range: AddressRange | None = None,
    fd: int | None = None,
    pid: int | None = None,
    detail: str | None = None,
) -> KernelError:
    """Build the error for a failed ``op``; the caller raises it."""
    return _class_for(err)(err, op, range=range, fd=fd, pid=pid, detail=detail)
