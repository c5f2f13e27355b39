"""The guest's RAM and its hand-off to wsd.

What a VMM does at boot: guest RAM is a memfd (hugetlbfs with ``--hugetlb``)
mapped ``MAP_SHARED``, so wsd can read and punch pages through the file; the
userfaultfd is created raw (no ``UFFDIO_API``: wsd negotiates the features)
and both go to wsd over its socket.  The guest keeps its own copy of the uffd
for its whole run (RWP-FACTS fact 9: if wsd held the only reference and died,
evicted pages would silently read back as zeros).
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
from typing import Any

import numpy as np
import numpy.typing as npt

from wsd.kernel import memfd_create, open_userfaultfd
from wsd.kernel.uffd import OpenFlag
from wsd.vmm.client import hand_off
from wsd.vmm.kept import KeptPipes

from .config import Thp
from .native import Native

__all__ = ["GuestMemory", "GuestSetupError", "handoff_message"]


class GuestSetupError(RuntimeError):
    """The guest could not get its memory; the message says what to change."""


class GuestMemory:
    """A memfd of ``size`` bytes mapped ``MAP_SHARED``, plus per-page versions and locks."""

    def __init__(self, native: Native, size: int, page_size: int, *, thp: Thp = Thp.DEFAULT):
        self.native = native
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        self.hugetlb = page_size != mmap.PAGESIZE
        try:
            self.memfd = memfd_create(
                "wsd-guest-ram", size=size, hugetlb_page_size=page_size if self.hugetlb else None
            )
        except OSError as e:
            raise GuestSetupError(f"cannot create guest RAM: {e}") from e
        try:
            # A shared hugetlbfs mapping reserves its huge pages here: ENOMEM
            # now rather than SIGBUS on first touch.
            self.map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        except OSError as e:
            os.close(self.memfd)
            hint = (
                f": {size // page_size} free {page_size >> 20} MiB huge pages are needed"
                " (vm.nr_hugepages)"
                if self.hugetlb and e.errno == errno.ENOMEM
                else ""
            )
            raise GuestSetupError(f"cannot map {size} bytes of guest RAM: {e}{hint}") from e
        if thp is Thp.NEVER:
            self.map.madvise(mmap.MADV_NOHUGEPAGE)
        elif thp is Thp.ALWAYS:
            self.map.madvise(mmap.MADV_HUGEPAGE)
        ffi = native.ffi
        # Version of each page's content (the pattern keeps its low 24 bits),
        # and the try-lock a writer holds while rewriting the page.
        self.versions: npt.NDArray[np.uint32] = np.zeros(self.npages, dtype=np.uint32)
        self.locks: npt.NDArray[np.uint8] = np.zeros(self.npages, dtype=np.uint8)
        # The buffers stay exported (and alive) as long as these cdata objects.
        self._buffers = (
            ffi.from_buffer("uint8_t[]", self.map),
            ffi.from_buffer("uint32_t[]", self.versions),
            ffi.from_buffer("uint8_t[]", self.locks),
        )
        self.guest: Any = ffi.new("struct wsdg_guest *")
        self.guest.base, self.guest.versions, self.guest.locks = self._buffers
        self.guest.page_size = page_size
        self.base = int(ffi.cast("uintptr_t", self.guest.base))
        self.uffd: int | None = None

    def fill(self) -> None:
        """Write version 0 of every page (populates all of guest RAM)."""
        self.native.lib.wsdg_fill(self.guest, 0, self.npages, 0)

    def open_uffd(self, *, user_mode_only: bool = False) -> int:
        """Create the raw userfaultfd this process keeps until it exits."""
        flags = OpenFlag.CLOEXEC | OpenFlag.NONBLOCK
        if user_mode_only:
            flags |= OpenFlag.USER_MODE_ONLY
        self.uffd = open_userfaultfd(flags)
        return self.uffd

    def hand_off(
        self,
        path: os.PathLike[str] | str,
        vm_id: str,
        *,
        reattach: KeptPipes | None = None,
        dma_pinned: bool = False,
    ) -> tuple[dict[str, Any], socket.socket]:
        """Send uffd (fd 0) and memfd (fd 1) to wsd; raises HandoffRefused on an error reply.

        ``reattach``: give a restarted wsd the session its predecessor had,
        with the pipes that one asked us to keep.
        ``dma_pinned``: mark the region DMA-pinned, as a VMM with VFIO
        passthrough would; wsd then never evicts from it.
        """
        if self.uffd is None:
            raise RuntimeError("open_uffd() before hand_off()")
        msg = handoff_message(
            vm_id, os.getpid(), self.base, self.size, self.page_size, dma_pinned=dma_pinned
        )
        fds = [self.uffd, self.memfd]
        if reattach is not None:
            msg, fds = reattach.reattach({**msg, "type": "reattach"}, fds)
        return hand_off(os.fspath(path), msg, fds)

    def close(self) -> None:
        for buf in self._buffers:
            self.native.ffi.release(buf)
        self.map.close()
        os.close(self.memfd)
        if self.uffd is not None:
            os.close(self.uffd)
            self.uffd = None


def handoff_message(
    vm_id: str, pid: int, base: int, size: int, page_size: int, *, dma_pinned: bool = False
) -> dict[str, Any]:
    """A protocol-1 hand-off of one region (docs/protocol.md)."""
    region: dict[str, Any] = {
        "guest_phys_addr": 0,
        "host_virt_addr": base,
        "size": size,
        "fd_index": 1,
        "offset": 0,
        "page_size": page_size,
    }
    if dma_pinned:
        region["dma_pinned"] = True
    return {
        "type": "handoff",
        "version": 1,
        "vm_id": vm_id,
        "vmm_pid": pid,
        "uffd": {"fd_index": 0, "state": "raw"},
        "regions": [region],
    }
