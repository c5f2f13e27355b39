"""Fixtures for tests that need Linux 7.3 with userfaultfd RWP (run them in the VM)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from wsd.kernel import Feature, Ioctl, Pagemap, Userfaultfd, probe_api
from wsd.testing.arming import RWP, arm_rwp
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.thp import SHMEM_ENABLED, eager_khugepaged, shmem_thp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def rwp_supported() -> Feature:
    api = probe_api()
    if RWP & ~api.features or Ioctl.SET_MODE not in api.ioctls:
        pytest.skip(
            f"kernel {os.uname().release} lacks userfaultfd RWP "
            "(needs Linux 7.3 with CONFIG_USERFAULTFD_RWP=y); run `make test-kernel`"
        )
    return api.features


@pytest.fixture(scope="session")
def hugepages() -> int:
    """Reserve a few 2 MiB huge pages (as root, in the VM) and return how many are free."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    free = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    if int(free.read_text()) < 8 and os.access(knob, os.W_OK):
        knob.write_text("16\n")
    n = int(free.read_text())
    if n < 4:
        pytest.skip(f"only {n} free 2 MiB huge pages (set vm.nr_hugepages as root)")
    return n


def _entered(cm: AbstractContextManager[None], what: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(cm)
        except OSError as e:
            pytest.skip(f"cannot set {what}: {e}")
        yield


@pytest.fixture
def shmem_thp_always() -> Iterator[None]:
    yield from _entered(shmem_thp("always"), str(SHMEM_ENABLED))


@pytest.fixture
def khugepaged_eager() -> Iterator[None]:
    """khugepaged scanning every 100 ms (not every 10 s), so collapses happen in a test."""
    yield from _entered(eager_khugepaged(), "khugepaged's scan interval")


@pytest.fixture
def puppet(rwp_supported: Feature) -> Iterator[PuppetVMM]:
    with PuppetVMM.spawn(32 << 20) as p:
        yield p


@pytest.fixture
def session(puppet: PuppetVMM) -> Iterator[tuple[PuppetVMM, Userfaultfd, Pagemap]]:
    with arm_rwp(puppet) as uffd, Pagemap.open(puppet.pid) as pm:
        yield puppet, uffd, pm
