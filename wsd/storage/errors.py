"""Storage errors: one base class that carries and formats where a failure happened.

Every error names the backend (the tier) and, when known, the VM, region and page
offset, so a log line alone tells which page of which guest was affected.
"""

from __future__ import annotations

from typing import ClassVar, Required, TypedDict


class Where(TypedDict, total=False):
    """Error context, to build once and pass as ``**where``."""

    backend: Required[str]
    vm_id: str
    region: int
    offset: int


class StorageError(Exception):
    """Base class of every error raised by a page store.

    ``retryable`` tells the caller whether the same operation may succeed later
    without intervention (a server that is restarting), as opposed to a page that is
    gone or corrupt.
    """

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        vm_id: str | None = None,
        region: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.vm_id = vm_id
        self.region = region
        self.offset = offset

    def context(self) -> str:
        """The ``backend=… vm=… region=… offset=…`` part of the message."""
        parts = [f"backend={self.backend}"]
        if self.vm_id is not None:
            parts.append(f"vm={self.vm_id}")
        if self.region is not None:
            parts.append(f"region={self.region}")
        if self.offset is not None:
            parts.append(f"offset={self.offset:#x}")
        return " ".join(parts)

    def __str__(self) -> str:
        return f"{self.message} ({self.context()})"


class InvalidPage(StorageError, ValueError):
    """The caller passed a malformed request: misaligned offset, wrong page length."""


class PageNotFound(StorageError, LookupError):
    """No page is stored at the requested offsets (never put, or discarded).

    ``offsets`` lists every missing offset of a batched get.
    """

    def __init__(
        self,
        *,
        backend: str,
        vm_id: str,
        region: int,
        offsets: tuple[int, ...],
    ) -> None:
        shown = ", ".join(f"{o:#x}" for o in offsets[:8])
        more = f" and {len(offsets) - 8} more" if len(offsets) > 8 else ""
        super().__init__(
            f"page not found at {shown}{more}",
            backend=backend,
            vm_id=vm_id,
            region=region,
            offset=offsets[0] if len(offsets) == 1 else None,
        )
        self.offsets = offsets


class IntegrityError(StorageError):
    """A stored page failed verification; its bytes are never returned.

    ``expected`` and ``actual`` are the stored and recomputed checksums (or
    generations, for a stale record), when the failure is a comparison.
    """

    def __init__(
        self,
        reason: str,
        *,
        backend: str,
        vm_id: str,
        region: int,
        offset: int,
        expected: int | None = None,
        actual: int | None = None,
    ) -> None:
        detail = reason
        if expected is not None and actual is not None:
            detail = f"{reason}: expected {expected:#018x}, actual {actual:#018x}"
        super().__init__(
            f"integrity check failed in tier {backend}: {detail}",
            backend=backend,
            vm_id=vm_id,
            region=region,
            offset=offset,
        )
        self.reason = reason
        self.expected = expected
        self.actual = actual


class BudgetExceeded(StorageError):
    """A put would take the store past its configured byte budget; nothing was stored."""

    def __init__(
        self,
        *,
        backend: str,
        vm_id: str,
        region: int,
        budget_bytes: int,
        used_bytes: int,
        needed_bytes: int,
    ) -> None:
        super().__init__(
            f"budget exceeded: {needed_bytes} more bytes needed, "
            f"{used_bytes} of {budget_bytes} in use",
            backend=backend,
            vm_id=vm_id,
            region=region,
        )
        self.budget_bytes = budget_bytes
        self.used_bytes = used_bytes
        self.needed_bytes = needed_bytes


class TierUnavailable(StorageError):
    """The tier cannot be reached right now (server down, loading, timed out).

    Retryable: the operation did not take effect as far as the caller may rely on,
    and may succeed once the tier is back.
    """

    retryable: ClassVar[bool] = True


class TierTimeout(TierUnavailable):
    """A call to the tier did not return within its deadline (a hung server or mount).

    The call itself may still be running and may still take effect: a put that
    timed out was not acknowledged, but its pages may yet appear in the tier.
    """


class StorageFull(StorageError):
    """The tier ran out of space (ENOSPC, EDQUOT, Redis OOM); nothing was acknowledged."""


class EncryptionKeyError(StorageError):
    """The encryption key could not be loaded, is malformed, or does not match the data."""


class StoreClosed(StorageError):
    """The store was used after ``close()``."""
