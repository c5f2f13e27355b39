"""RWP-FACTS fact 2: which register modes work where, and which must fail."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import pytest

from wsd.kernel import Feature, KernelError, RegisterMode, Userfaultfd, memfd_create
from wsd.testing.arming import RWP_SESSION

R = RegisterMode
SIZE = 4 * mmap.PAGESIZE


def addr_of(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.fixture
def shmem() -> Iterator[int]:
    fd = memfd_create("modes", size=SIZE)
    m = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
    yield addr_of(m)
    os.close(fd)


def register(addr: int, mode: RegisterMode, features: Feature = RWP_SESSION) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(features)
        uffd.register(addr, SIZE, mode)


@pytest.mark.parametrize(
    "mode",
    [R.RWP, R.RWP | R.MISSING, R.RWP | R.MINOR, R.RWP | R.MISSING | R.MINOR],
    ids=repr,
)
def test_rwp_combinations_register_on_memfd(
    rwp_supported: Feature, shmem: int, mode: RegisterMode
) -> None:
    register(shmem, mode)


def test_rwp_with_wp_is_einval(rwp_supported: Feature, shmem: int) -> None:
    with pytest.raises(KernelError) as exc:
        register(shmem, R.RWP | R.WP, RWP_SESSION | Feature.WP_HUGETLBFS_SHMEM)
    assert exc.value.errno == errno.EINVAL and exc.value.op == "UFFDIO_REGISTER"
    assert exc.value.range is not None and exc.value.range.start == shmem


def test_rwp_without_negotiated_feature_is_einval(rwp_supported: Feature, shmem: int) -> None:
    with pytest.raises(KernelError) as exc:
        register(shmem, R.RWP, Feature.MISSING_SHMEM)
    assert exc.value.errno == errno.EINVAL


def test_minor_on_private_anon_is_einval(rwp_supported: Feature) -> None:
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with pytest.raises(KernelError) as exc:
        register(addr_of(m), R.MINOR)
    assert exc.value.errno == errno.EINVAL


def test_rwp_on_shared_anon_works(rwp_supported: Feature) -> None:
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    register(addr_of(m), R.RWP | R.MISSING | R.MINOR)


def test_prot_none_is_einval_prot_read_is_ok(rwp_supported: Feature, shmem: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def protect(prot: int) -> None:
        assert libc.mprotect(ctypes.c_void_p(shmem), ctypes.c_size_t(SIZE), prot) == 0

    try:
        protect(mmap.PROT_READ)
        register(shmem, R.RWP)
        protect(0)  # PROT_NONE
        with pytest.raises(KernelError) as exc:
            register(shmem, R.RWP)
        assert exc.value.errno == errno.EINVAL
    finally:
        protect(mmap.PROT_READ | mmap.PROT_WRITE)


def test_reregister_dropping_rwp_is_ebusy(rwp_supported: Feature, shmem: int) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(RWP_SESSION)
        uffd.register(shmem, SIZE, R.RWP | R.MISSING)
        with pytest.raises(KernelError) as exc:
            uffd.register(shmem, SIZE, R.MISSING)
        assert exc.value.errno == errno.EBUSY
        uffd.unregister(shmem, SIZE)
        uffd.register(shmem, SIZE, R.MISSING)
