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


def track_puppet(p: PuppetVMM, vm_id: str = "puppet") -> VmTracker:
    """Start a VmTracker on a puppet's memory in the mode this kernel gets."""
    k = probe_kernel()
    region = Region(
        guest_phys_addr=0, host_virt_addr=p.base, size=p.size, fd_index=1, page_size=p.page_size
    )
    return VmTracker.start(
        vm_id,
        vmm_pid=p.pid,
        spec=UffdSpec(),
        uffd_fd=os.dup(p.uffd_fd),
        regions=[(region, p.memfd)],
        decision=choose_mode(k),
        kernel=k,
    )
