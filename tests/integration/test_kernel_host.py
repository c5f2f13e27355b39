"""wsd.kernel against the host kernel: scans, memfds, fd passing, pidfds, the CLI."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from wsd.kernel import (
    COPY_SLICE_BYTES,
    REGION_DTYPE,
    FdKind,
    HeldPages,
    KernelError,
    PageCategory,
    Pagemap,
    PipePool,
    Userfaultfd,
    close_fds,
    data_ranges,
    describe_fd,
    empty_pipe,
    map_shared,
    memfd_create,
    peek_pipe,
    pidfd_getfd,
    pidfd_open,
    pread,
    punch_hole,
    pwrite,
    recv_with_fds,
    send_with_fds,
    unreserved_huge_page_count,
)
from wsd.kernel._ffi import ffi
from wsd.testing.hammer import free_huge_pages
from wsd.testing.running import wsd_cli

pytestmark = pytest.mark.integration
PS = mmap.PAGESIZE


@pytest.fixture
def sparse_area() -> tuple[mmap.mmap, int, list[int]]:
    """A 4096-page anonymous area with every third page present."""
    n = 4096
    area = mmap.mmap(-1, n * PS)
    present = list(range(0, n, 3))
    for p in present:
        area[p * PS] = 1
    with ffi.from_buffer(area) as buf:
        addr = int(ffi.cast("uintptr_t", buf))
    return area, addr, present


@pytest.mark.parametrize("vec_len", [1, 7, 100, 4096])
def test_scan_resumes_until_the_range_is_done(sparse_area, vec_len: int) -> None:
    area, addr, present = sparse_area
    with Pagemap.open("self") as pm:
        res = pm.scan(addr, len(area), category_mask=PageCategory.PRESENT, vec_len=vec_len)
    assert res.page_indices(addr, PS).tolist() == present
    assert res.walk_end == addr + len(area)


@pytest.mark.parametrize("vec_len", [1, 7, 1365, 1366, 4096])
def test_scan_calls_marked_into_one_bitmap_give_every_page_once(sparse_area, vec_len: int) -> None:
    """One reused vector, one ioctl per result (1366 runs: 1366 fit exactly, 1365 do not)."""
    area, addr, present = sparse_area
    vec = np.empty(vec_len, dtype=REGION_DTYPE)
    hot = np.zeros(len(area) // PS, dtype=np.bool_)
    runs = calls = 0
    with Pagemap.open("self") as pm:
        for res in pm.scan_calls(addr, len(area), category_mask=PageCategory.PRESENT, vec=vec):
            assert np.shares_memory(res.regions, vec) or not len(res)
            calls += 1
            runs += len(res)
            res.mark(addr, PS, hot)
    assert np.flatnonzero(hot).tolist() == present
    assert runs == len(present)
    # A vector with room left ends the walk: no extra call for a stale
    # walk_end.  A full one may need one more call to learn the walk is done.
    full_vectors = -(-len(present) // vec_len)
    assert calls in (full_vectors, full_vectors + 1)
    if len(present) % vec_len:
        assert calls == full_vectors


def test_scan_max_pages_stops_early(sparse_area) -> None:
    area, addr, present = sparse_area
    with Pagemap.open("self") as pm:
        res = pm.scan(addr, len(area), category_mask=PageCategory.PRESENT, max_pages=10)
    assert res.page_indices(addr, PS).tolist() == present[:10]
    assert res.walk_end < addr + len(area)


def test_inverted_scan_finds_the_holes(sparse_area) -> None:
    area, addr, present = sparse_area
    with Pagemap.open("self") as pm:
        res = pm.scan(
            addr,
            len(area),
            category_mask=PageCategory.PRESENT,
            inverted=PageCategory.PRESENT,
            return_mask=PageCategory.PRESENT,
        )
    holes = res.page_indices(addr, PS)
    assert len(holes) == len(area) // PS - len(present)
    assert not np.isin(holes, present).any()
    assert (res.categories == 0).all()


def test_scan_errors_name_the_range() -> None:
    with Pagemap.open("self") as pm, pytest.raises(KernelError) as exc:
        pm.scan(0x1001, PS, category_mask=PageCategory.PRESENT)  # unaligned start
    assert exc.value.errno == errno.EINVAL and exc.value.op == "PAGEMAP_SCAN"
    assert "0x1001" in str(exc.value)


def test_pagemap_of_missing_pid() -> None:
    with pytest.raises(FileNotFoundError, match="pagemap"):
        Pagemap.open(2**22 + 12345)


def test_memfd_io_punch_and_data_ranges() -> None:
    fd = memfd_create("t", size=16 * PS)
    try:
        assert describe_fd(fd).kind is FdKind.MEMFD
        pwrite(fd, b"\xab" * (16 * PS), 0)
        punch_hole(fd, 4 * PS, 2 * PS)
        punch_hole(fd, 10 * PS, PS)
        assert data_ranges(fd) == [(0, 4 * PS), (6 * PS, 10 * PS), (11 * PS, 16 * PS)]
        assert pread(fd, PS, 4 * PS) == bytes(PS)  # a hole reads as zeros through the fd
        assert os.fstat(fd).st_size == 16 * PS  # KEEP_SIZE
        with pytest.raises(KernelError, match="end of file"):
            pread(fd, 2 * PS, 15 * PS)
    finally:
        os.close(fd)


def test_describe_fd_tells_uffd_from_regular_file(tmp_path) -> None:
    with Userfaultfd.create() as uffd:
        assert describe_fd(uffd.fd).kind is FdKind.USERFAULTFD
    with open(tmp_path / "f", "wb") as f:
        assert describe_fd(f.fileno()).kind is FdKind.REGULAR
    with pytest.raises(KernelError) as exc:
        describe_fd(9999)
    assert exc.value.errno == errno.EBADF


def test_scm_rights_roundtrip_and_truncation() -> None:
    a, b = socket.socketpair()
    fds = [memfd_create(f"m{i}") for i in range(3)]
    try:
        send_with_fds(a, b"hello", fds[:2])
        data, got = recv_with_fds(b, 64, 2)
        assert data == b"hello" and len(got) == 2
        assert all(describe_fd(fd).kind is FdKind.MEMFD for fd in got)
        for fd in got:
            os.close(fd)
        send_with_fds(a, b"too many", fds)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(KernelError, match="more than 2 file descriptors") as exc:
            recv_with_fds(b, 64, 2)
        assert exc.value.errno == errno.EMSGSIZE
        assert set(os.listdir("/proc/self/fd")) <= before, "truncated fds leaked"
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_pidfd_getfd_duplicates_a_child_fd() -> None:
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, pass_fds=[w]
    )
    try:
        pidfd = pidfd_open(child.pid)
        try:
            dup = pidfd_getfd(pidfd, w, pid=child.pid)
            os.write(dup, b"x")
            os.close(dup)
            assert os.read(r, 1) == b"x"
            with pytest.raises(KernelError) as exc:
                pidfd_getfd(pidfd, 999, pid=child.pid)
            assert exc.value.errno == errno.EBADF and exc.value.pid == child.pid
        finally:
            os.close(pidfd)
    finally:
        child.communicate(b"")
        os.close(r)
        os.close(w)
    with pytest.raises(ProcessLookupError):
        pidfd_open(child.pid)


def test_kernel_info_json_on_host() -> None:
    info = json.loads(wsd_cli("kernel-info", "--json"))
    rwp = "RWP" in info["kernel"]["features"]
    assert info["tracking_mode"] == ("rwp" if rwp else "wp-async")


def test_demo_runs_on_host() -> None:
    """``make demo-host``, shortened: it evicts, serves the metrics and verifies every page."""
    out = wsd_cli("demo", "--seconds", "8", "--size", "32M", "--phase-seconds", "4")
    assert "tracking mode wp-async" in out, out
    assert "data verified       OK: 8192 pages re-read at exit, 0 errors" in out, out
    evicted = re.search(r"evicted pages\s+(\d+)", out)
    assert evicted and int(evicted.group(1)) > 0, out
    assert re.search(r'wsd_evicted_pages_total\{vm_id="demo"\} [1-9]', out), out


def test_a_pools_detached_read_ends_keep_what_its_pipes_held() -> None:
    """A session that stays parked keeps its pipes' read ends alone, for a reattach."""
    fd = memfd_create("held", size=2 * PS)
    pool = PipePool()
    try:
        pwrite(fd, b"\x07" * 2 * PS, 0)
        with HeldPages(fd, [(0, 2 * PS)], PS, label=b"label", pool=pool):
            punch_hole(fd, 0, 2 * PS)
        ends = pool.detach_read_ends()
        assert not pool.read_ends and ends
        try:
            assert b"".join(peek_pipe(r) for r in ends) == b"label" + b"\x07" * 2 * PS
        finally:
            close_fds(ends)
    finally:
        pool.close()
        os.close(fd)


def test_emptying_a_pipe_frees_its_pages_with_its_writer_still_open() -> None:
    """``empty_pipe`` reads what is there and returns: a parked pipe's other
    holders (the fd store, a VMM) may keep it open for writing, and a
    blocking read would then wait for ever.  On hugetlbfs the punched page a
    pipe held goes back to the pool."""
    ps = 2 << 20
    with free_huge_pages(2) as free:
        if free < 2:
            pytest.skip(f"only {free} free 2 MiB huge pages, 2 needed (not root?)")
        fd = memfd_create("emptied", size=ps, hugetlb_page_size=ps)
        pool = PipePool()
        try:
            with map_shared(fd, ps) as m:
                m[0] = 7
            with HeldPages(fd, [(0, ps)], ps, pool=pool):
                punch_hole(fd, 0, ps)
            before = unreserved_huge_page_count(ps)
            assert before is not None
            for r in pool.read_ends:
                empty_pipe(r)  # the pool's write ends are still open
                assert peek_pipe(r) == b""
            assert unreserved_huge_page_count(ps) == before + 1
        finally:
            pool.close()
            os.close(fd)


@pytest.mark.parametrize("hugetlb", [False, True], ids=["shmem", "hugetlbfs"])
def test_a_refilled_pool_holds_the_same_bytes_without_the_punched_pages(hugetlb: bool) -> None:
    """``PipePool.refill`` writes back what its pipes held, and it fits in the
    pipes the references took (more than one here); on hugetlbfs the punched
    pages go back to the pool."""
    ps, count = ((2 << 20), 2) if hugetlb else (4096, 600)
    with free_huge_pages(count if hugetlb else 0) as free:
        if hugetlb and free < count:
            pytest.skip(f"only {free} free 2 MiB huge pages, {count} needed (not root?)")
        fd = memfd_create("refilled", size=count * ps, hugetlb_page_size=ps if hugetlb else None)
        pool = PipePool()
        try:
            with map_shared(fd, count * ps) as view:
                for k in range(count):
                    view[k * ps : (k + 1) * ps] = bytes([k % 251 + 1]) * ps
            with HeldPages(fd, [(0, count * ps)], ps, label=b"label" * 200, pool=pool):
                punch_hole(fd, 0, count * ps)
            held = b"".join(peek_pipe(r) for r in pool.read_ends)
            assert len(pool.read_ends) == (5 if hugetlb else 3)
            before = unreserved_huge_page_count(ps) if hugetlb else None
            pool.refill(held)
            assert pool.refilled
            assert b"".join(peek_pipe(r) for r in pool.read_ends) == held
            if before is not None:
                assert unreserved_huge_page_count(ps) == before + count
            pool.empty()
            assert all(peek_pipe(r) == b"" for r in pool.read_ends) and not pool.refilled
        finally:
            pool.close()
            os.close(fd)


@pytest.mark.parametrize("hugetlb", [False, True], ids=["shmem", "hugetlbfs"])
def test_pooled_held_pages_keep_their_final_bytes_until_released(hugetlb: bool) -> None:
    """With a pool and a label (wp-async under an fd store): the pipes hold the
    label and the pages' final bytes, reading does not empty them, release does."""
    ps = (2 << 20) if hugetlb else 4096
    with free_huge_pages(4 if hugetlb else 0) as free:
        if hugetlb and free < 4:
            pytest.skip(f"only {free} free 2 MiB huge pages, 4 needed (not root?)")
        fd = memfd_create("held", size=4 * ps, hugetlb_page_size=ps if hugetlb else None)
        pool = PipePool()
        try:
            view = map_shared(fd, 4 * ps)
            for k in range(4):
                view[k * ps : (k + 1) * ps] = bytes([k + 1]) * ps
            label = b"label:" + bytes(range(200))
            with HeldPages(fd, [(0, ps), (2 * ps, ps)], ps, label=label, pool=pool) as held:
                view[2 * ps] = 0xEE  # written before the punch: part of the final bytes
                punch_hole(fd, 0, 4 * ps)
                view.close()
                final = bytearray(2 * ps)
                held.read_into(final)
            want = b"\x01" * ps + b"\xee" + b"\x03" * (ps - 1)
            assert final == want
            # Read, and closed as a context: with a pool both leave the pages held.
            assert b"".join(peek_pipe(r) for r in pool.read_ends) == label + want
            assert b"".join(peek_pipe(r) for r in pool.read_ends) == label + want
            held.release()
            assert all(peek_pipe(r) == b"" for r in pool.read_ends)
            # Emptied, the pool serves the next chunk.
            with HeldPages(fd, [(ps, ps)], ps, pool=pool) as again:
                again.release()
        finally:
            pool.close()
            os.close(fd)


def test_held_pages_are_read_from_their_pipes_in_bounded_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pipe_read has no preemption point: a 1 MiB read on the fault service's
    CPU kept it from a fault for hundreds of µs (wsd.kernel.COPY_SLICE_BYTES)."""
    size = 2 << 20
    fd = memfd_create("held", size=size)
    try:
        want = os.urandom(size)
        pwrite(fd, want, 0)
        readv, read = os.readv, []

        def recording(fd: int, buffers: list[memoryview]) -> int:
            n = readv(fd, buffers)
            read.append(n)
            return n

        with HeldPages(fd, [(0, size)], PS) as held:
            punch_hole(fd, 0, size)
            final = bytearray(size)
            with monkeypatch.context() as m:
                m.setattr(os, "readv", recording)
                held.read_into(final)
        assert final == want
        assert max(read) == COPY_SLICE_BYTES and sum(read) == size
    finally:
        os.close(fd)
