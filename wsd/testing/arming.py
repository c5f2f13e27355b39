"""Arming a puppet's hand-off the way wsd does in rwp mode (for tests and benchmarks)."""

from __future__ import annotations

import os

from wsd.kernel import Feature, RegisterMode, Userfaultfd, probe_kernel
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.tracker.mode import choose_mode
from wsd.tracker.session import VmTracker
from wsd.vmm.protocol import Region, UffdSpec

RWP = Feature.RWP | Feature.RWP_ASYNC
# What wsd negotiates in rwp mode, minus the events these callers don't handle.
RWP_SESSION = RWP | Feature.MISSING_SHMEM | Feature.MINOR_SHMEM | Feature.MISSING_HUGETLBFS


def arm_rwp(
    p: PuppetVMM,
    features: Feature = RWP_SESSION,
    mode: RegisterMode = RegisterMode.RWP | RegisterMode.MISSING,
) -> Userfaultfd:
    """UFFDIO_API, REGISTER on the VMM's range, then RWPROTECT all of it."""
    uffd = Userfaultfd(os.dup(p.uffd_fd))
    uffd.api(features)
    uffd.register(p.base, p.size, mode)
    uffd.rwprotect(p.base, p.size, protect=True)
    return uffd


def track_memory(
    vm_id: str, *, pid: int, base: int, size: int, uffd_fd: int, memfd: int, page_size: int = 4096
) -> VmTracker:
    """Start a VmTracker on one region of another process's memory, as a hand-off would.

    ``uffd_fd`` is the process's raw uffd (duplicated here); the memfd stays the caller's.
    """
    k = probe_kernel()
    region = Region(
        guest_phys_addr=0, host_virt_addr=base, size=size, fd_index=1, page_size=page_size
    )
    return VmTracker.start(
        vm_id,
        vmm_pid=pid,
        spec=UffdSpec(),
        uffd_fd=os.dup(uffd_fd),
        regions=[(region, memfd)],
        decision=choose_mode(k),
        kernel=k,
    )


def track_puppet(p: PuppetVMM, vm_id: str = "puppet") -> VmTracker:
    """Start a VmTracker on a puppet's memory in the mode this kernel gets."""
    return track_memory(
        vm_id,
        pid=p.pid,
        base=p.base,
        size=p.size,
        uffd_fd=p.uffd_fd,
        memfd=p.memfd,
        page_size=p.page_size,
    )
