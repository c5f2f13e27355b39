"""Fixtures for tests that need Linux 7.3 with userfaultfd RWP (run them in the VM)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsd.kernel import Feature, Ioctl, Pagemap, Userfaultfd, probe_api
from wsd.testing.arming import RWP, arm_rwp
from wsd.testing.puppet_vmm import PuppetVMM

SHMEM_THP_KNOB = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


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


@pytest.fixture
def shmem_thp_always() -> Iterator[None]:
    try:
        old = next(w[1:-1] for w in SHMEM_THP_KNOB.read_text().split() if w.startswith("["))
        SHMEM_THP_KNOB.write_text("always\n")
    except OSError as e:
        pytest.skip(f"cannot set {SHMEM_THP_KNOB}: {e}")
    yield
    SHMEM_THP_KNOB.write_text(old + "\n")


@pytest.fixture
def puppet(rwp_supported: Feature) -> Iterator[PuppetVMM]:
    with PuppetVMM.spawn(32 << 20) as p:
        yield p


@pytest.fixture
def session(puppet: PuppetVMM) -> Iterator[tuple[PuppetVMM, Userfaultfd, Pagemap]]:
    with arm_rwp(puppet) as uffd, Pagemap.open(puppet.pid) as pm:
        yield puppet, uffd, pm
