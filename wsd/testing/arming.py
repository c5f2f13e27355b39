"""Arming a puppet's hand-off the way wsd does in rwp mode (for tests and benchmarks)."""

from __future__ import annotations

import os

from wsd.kernel import Feature, RegisterMode, Userfaultfd
from wsd.testing.puppet_vmm import PuppetVMM

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
