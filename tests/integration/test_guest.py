"""``wsd guest``: workloads, truth, self-verification, and the hand-off to a stub wsd.

Guests run as child processes (GuestProcess); the C helper is built once into
the per-user cache the first time a test needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from wsd.guest import HotSpec, Pattern, parse_hot, parse_size
from wsd.guest.cli import add_parser, config_from_args
from wsd.guest.hotset import HotSets
from wsd.guest.native import load_native
from wsd.guest.process import GuestError, GuestProcess
from wsd.guest.workload import describe_found
from wsd.kernel import (
    FdKind,
    Feature,
    PageCategory,
    Pagemap,
    RegisterMode,
    Userfaultfd,
    describe_fd,
    pidfd_getfd,
    pidfd_open,
    probe_api,
    punch_hole,
)
from wsd.testing.hammer import free_huge_pages
from wsd.testing.puppet_vmm import page_pattern
from wsd.vmm.protocol import ErrorCode, HandoffError, HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

pytestmark = pytest.mark.integration
MIB = 1 << 20
PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def native() -> Any:
    return load_native()


_started: list[GuestProcess] = []


@pytest.fixture(autouse=True)
def reap_guests() -> Iterator[None]:
    """Kill every guest a test started, so that a failed test leaves none running."""
    yield
    while _started:
        _started.pop().kill()


def guest(tmp_path: Path, *args: str) -> GuestProcess:
    g = GuestProcess.start(list(args), workdir=tmp_path)
    _started.append(g)
    return g


def run_guest(tmp_path: Path, *args: str, timeout: float = 60) -> GuestProcess:
    g = guest(tmp_path, *args)
    assert g.wait(timeout) == 0, g.stderr()
    return g


# ---------------------------------------------------------------------------
# options and building blocks


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64K", 64 << 10), ("256M", 256 * MIB), ("1G", 1 << 30), ("1.5GiB", 3 << 29)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("0.1", HotSpec(fraction=0.1)),
        ("10%", HotSpec(fraction=0.1)),
        ("1", HotSpec(fraction=1.0)),
        ("25M", HotSpec(nbytes=25 * MIB)),
        ("8192", HotSpec(nbytes=8192)),
    ],
)
def test_hot_specs(text: str, spec: HotSpec) -> None:
    assert parse_hot(text) == spec


@pytest.mark.parametrize("bad", ["0", "-1", "150%", "lots", "1.5X"])
def test_bad_hot_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_hot(bad)


def test_c_pattern_is_the_puppet_pattern(native: Any) -> None:
    """The C fill writes exactly wsd.testing.puppet_vmm.page_pattern, page by page."""
    ffi, lib = native.ffi, native.lib
    npages = 8
    buf = bytearray(npages * PAGE)
    versions = np.zeros(npages, dtype=np.uint32)
    locks = np.zeros(npages, dtype=np.uint8)
    g = ffi.new("struct wsdg_guest *")
    g.base = ffi.from_buffer("uint8_t[]", buf)
    g.versions = ffi.from_buffer("uint32_t[]", versions)
    g.locks = ffi.from_buffer("uint8_t[]", locks)
    g.page_size = PAGE
    lib.wsdg_fill(g, 0, npages, 7)
    for i in range(npages):
        assert buf[i * PAGE : (i + 1) * PAGE] == page_pattern(i, 7, PAGE)
    assert versions.tolist() == [7] * npages


def check(native: Any, data: bytes, index: int, lo: int, span: int) -> int:
    return int(native.lib.wsdg_check(native.ffi.from_buffer(data), len(data), index, lo, span))


def test_c_check_accepts_the_right_versions_only(native: Any) -> None:
    page = page_pattern(5, 10, PAGE)
    assert check(native, page, 5, 10, 0) == -1
    assert check(native, page, 5, 9, 1) == -1  # a write of 10 may be in flight after 9
    assert check(native, page, 5, 11, 1) == 0  # stale: older than the published version
    assert check(native, page, 6, 10, 1) == 0  # another page's bytes
    assert check(native, bytes(PAGE), 5, 0, 1) == 0  # zeros, even at version 0
    torn = page_pattern(5, 11, PAGE)[: PAGE // 2] + page[PAGE // 2 :]
    assert check(native, torn, 5, 10, 1) == -1  # a write in flight
    assert check(native, torn, 5, 10, 0) == 0  # not while holding the lock
    stale_tail = page[: PAGE // 2] + page_pattern(5, 9, PAGE)[PAGE // 2 :]
    assert check(native, stale_tail, 5, 10, 1) == PAGE // 16
    # Versions wrap at 24 bits in the pattern.
    assert check(native, page_pattern(5, 0, PAGE), 5, 0xFFFFFF, 1) == -1


def test_corruption_descriptions() -> None:
    good = page_pattern(3, 4, PAGE)
    assert describe_found(bytes(PAGE), 3, 0, 0, 100) == "all zeros"
    assert describe_found(page_pattern(3, 2, PAGE), 3, 0, 0, 100) == "version 2"
    assert describe_found(page_pattern(9, 4, PAGE), 3, 0, 0, 100) == "page 9 version 4"
    half = good[: PAGE // 2] + bytes(PAGE // 2)
    assert describe_found(half, 3, PAGE // 16, 0, 100) == "a mixed page whose word 256 holds zeros"


def test_hot_sets_are_deterministic_and_exact() -> None:
    a = HotSets(Pattern.PHASES, 1000, 100, seed=4)
    b = HotSets(Pattern.PHASES, 1000, 100, seed=4)
    for phase in range(3):
        hot = a.hot(phase)
        assert len(np.unique(hot)) == 100 and hot.max() < 1000
        assert (hot == b.hot(phase)).all()
    assert not (a.hot(0) == a.hot(1)).all()
    z = HotSets(Pattern.ZIPF, 1000, 50, seed=4, zipf_s=0.99)
    samples = z.sample(np.random.default_rng(0), 100_000)
    counts = np.bincount(samples.astype(np.int64), minlength=1000)
    top = np.sort(np.argsort(counts)[-10:])
    assert set(top) <= set(z.hot(0).tolist()), "the most sampled pages are the top ranks"


def test_add_parser_hooks_into_a_subcommand_parser() -> None:
    ap = argparse.ArgumentParser(prog="wsd")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["guest", "--size", "4M", "--hot", "25%", "--pattern", "phases"])
    config = config_from_args(args)
    assert callable(args.func)
    assert (config.size, config.hot, config.pattern) == (4 * MIB, HotSpec(0.25), Pattern.PHASES)
    assert config.handoff and config.socket == Path("/run/wsd/wsd.sock")


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wsd.guest", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--socket", "--hot", "--pattern", "--truth", "--no-handoff", "--hugetlb"):
        assert option in out


# ---------------------------------------------------------------------------
# workloads without wsd


def test_uniform_run_reports_ops_and_exact_hot_set(tmp_path: Path) -> None:
    g = run_guest(tmp_path, "--no-handoff", "--size", "32M", "--duration", "2", "--seed", "1")
    r = g.report()
    assert r["ops"] > 0 and r["reads"] > 0 and r["writes"] > 0
    assert r["verify_errors"] == 0 and r["corruption"] is None and r["exit_code"] == 0
    assert r["bytes"] == r["ops"] * PAGE and r["passes"] > 0
    assert r["pass_seconds"]["count"] == r["passes"]
    [truth] = g.truth()
    assert truth.phase == 0 and len(truth.hot) == round(0.1 * 32 * MIB / PAGE) == r["hot_pages"]
    assert (np.diff(truth.hot) > 0).all() and truth.hot[-1] < 32 * MIB // PAGE
    assert r["started"] == truth.t
    assert (truth.hot == HotSets(Pattern.UNIFORM, 8192, 819, seed=1).hot(0)).all()


def test_hot_set_in_bytes(tmp_path: Path) -> None:
    g = run_guest(tmp_path, "--no-handoff", "--size", "32M", "--hot", "4M", "--duration", "0.5")
    assert len(g.truth()[0].hot) == 1024


def test_zipf_runs(tmp_path: Path) -> None:
    g = run_guest(
        tmp_path,
        "--no-handoff",
        "--size",
        "32M",
        "--pattern",
        "zipf",
        "--zipf-s",
        "0.99",
        "--duration",
        "1",
    )
    r = g.report()
    assert r["ops"] > 0 and r["verify_errors"] == 0 and r["zipf_s"] == 0.99
    assert len(g.truth()[0].hot) == 819


def test_phases_move_the_hot_set_every_n_seconds(tmp_path: Path) -> None:
    g = run_guest(
        tmp_path,
        "--no-handoff",
        "--size",
        "16M",
        "--pattern",
        "phases",
        "--phase-seconds",
        "0.3",
        "--duration",
        "1.6",
        "--threads",
        "2",
    )
    r = g.report()
    truth = g.truth()
    assert [t.phase for t in truth] == list(range(len(truth))) and 5 <= len(truth) <= 7
    gaps = np.diff([t.t for t in truth])
    assert (gaps > 0.25).all() and (gaps < 0.6).all()
    assert len({tuple(t.hot.tolist()) for t in truth}) == len(truth)
    assert [p["phase"] for p in r["phases"]] == [t.phase for t in truth]
    assert all(p["ops"] > 0 for p in r["phases"][:-1])
    assert r["verify_errors"] == 0


def test_phases_by_passes(tmp_path: Path) -> None:
    g = run_guest(
        tmp_path,
        "--no-handoff",
        "--size",
        "8M",
        "--pattern",
        "phases",
        "--phase-passes",
        "3",
        "--duration",
        "1",
    )
    phases = g.report()["phases"]
    assert len(phases) > 3
    assert all(p["passes"] == 3 for p in phases[:-1])


def test_concurrent_writers_never_report_false_corruption(tmp_path: Path) -> None:
    """Tiny hot set, half writes, two threads: the same pages are read while rewritten."""
    g = run_guest(
        tmp_path,
        "--no-handoff",
        "--size",
        "4M",
        "--hot",
        "16K",
        "--threads",
        "2",
        "--write-ratio",
        "0.5",
        "--duration",
        "2",
    )
    r = g.report()
    assert r["verify_errors"] == 0 and r["writes"] > 1000


def test_sigterm_stops_cleanly_with_a_report(tmp_path: Path) -> None:
    g = guest(tmp_path, "--no-handoff", "--size", "8M")  # --duration 0: until a signal
    time.sleep(0.3)
    assert g.stop() == 0
    r = g.report()
    assert r["stopped_by_signal"] == signal.SIGTERM and r["ops"] > 0


def test_hugetlb(tmp_path: Path) -> None:
    with free_huge_pages(8) as free:
        if free < 8:
            pytest.skip(f"needs 8 free 2 MiB huge pages, {free} free (vm.nr_hugepages; not root?)")
        args = ("--no-handoff", "--size", "16M", "--hugetlb", "--hot", "0.5", "--duration", "1")
        g = run_guest(tmp_path, *args)
    r = g.report()
    assert r["page_size"] == 2 * MIB and r["hugetlb"] and r["ops"] > 0
    assert r["verify_errors"] == 0 and len(g.truth()[0].hot) == 4


# ---------------------------------------------------------------------------
# corruption


def inject_until_caught(g: GuestProcess, inject: Callable[[int], object]) -> int:
    """Damage guest memory through its memfd until the guest exits; its exit code.

    One injection can be undone by the guest itself: a writer that checked the
    page just before the damage landed rewrites every word of it.  That race is
    real and not the guest's fault, so inject again (every 50 ms) until the guest
    reports.  The guest is reaped whatever happens.
    """
    assert g.ready is not None
    pidfd = pidfd_open(g.pid)
    memfd = pidfd_getfd(pidfd, g.ready.memfd)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            inject(memfd)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return g.wait(0.05)
        raise AssertionError("the guest did not notice the damage within 30 s")
    finally:
        os.close(memfd)
        os.close(pidfd)
        g.kill()


@pytest.mark.parametrize("write_ratio", ["0", "0.5"])
def test_a_punched_hot_page_is_corruption_naming_the_page(tmp_path: Path, write_ratio: str) -> None:
    g = guest(tmp_path, "--no-handoff", "--size", "8M", "--write-ratio", write_ratio)
    victim = int(g.truth()[0].hot[len(g.truth()[0].hot) // 2])
    # shmem: the page now reads zeros.  With writers, one may be midway through the
    # page when the punch lands and finish the rest of it: zeros below, its words above.
    zeros = ("all zeros",) if write_ratio == "0" else ("all zeros", "a mixed page whose word")
    assert inject_until_caught(g, lambda fd: punch_hole(fd, victim * PAGE, PAGE)) == 3
    assert f"page {victim}: expected version" in g.stderr()
    r = g.report()
    assert r["verify_errors"] == 1 and r["exit_code"] == 3
    found = r["corruption"]["found"]
    assert r["corruption"]["page"] == victim and found.startswith(zeros), found
    assert found == "all zeros" or found.endswith("holds zeros"), found


def test_a_stale_page_is_corruption(tmp_path: Path) -> None:
    """Write back a page's first version after the guest has rewritten it."""
    g = guest(tmp_path, "--no-handoff", "--size", "4M", "--hot", "8K", "--write-ratio", "1")
    victim = int(g.truth()[0].hot[0])
    time.sleep(0.2)  # thousands of writes of each hot page
    stale = page_pattern(victim, 0, PAGE)
    assert inject_until_caught(g, lambda fd: os.pwrite(fd, stale, victim * PAGE)) == 3
    c = g.report()["corruption"]
    assert c["page"] == victim and c["found"].startswith(("version 0", "a mixed page"))


# ---------------------------------------------------------------------------
# the hand-off, to a stub wsd


class StubWsd:
    """Accepts hand-offs and keeps the fds; or refuses them all with ``refuse``."""

    def __init__(self, refuse: HandoffError | None = None) -> None:
        self.refuse = refuse
        self.requests: list[HandoffRequest] = []
        self.fds: list[list[int]] = []
        self.peers: list[PeerCred] = []
        self.ended: list[str] = []

    async def __call__(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        if self.refuse is not None:
            for fd in fds:
                os.close(fd)
            raise self.refuse
        self.requests.append(req)
        self.fds.append(fds)
        self.peers.append(peer)

        async def close() -> None:
            self.ended.append(req.vm_id)

        return Accepted(accepted_reply(req, "stub"), close)

    def close(self) -> None:
        for fds in self.fds:
            for fd in fds:
                os.close(fd)


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Any]:
    servers: list[tuple[asyncio.Task[None], StubWsd]] = []

    def start(stub: StubWsd) -> Path:
        path = tmp_path / "wsd.sock"
        srv = HandoffServer(path, stub)
        srv.listen()
        servers.append((asyncio.create_task(srv.serve()), stub))
        return path

    yield start
    for task, stub in servers:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stub.close()


async def start_guest(tmp_path: Path, *args: str) -> GuestProcess:
    g = await asyncio.to_thread(GuestProcess.start, list(args), workdir=tmp_path / "guest")
    _started.append(g)
    return g


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.parametrize("flag", [None, "--user-mode-only", "--dma-pinned"])
async def test_handoff_sends_uffd_memfd_and_region_and_keeps_running(
    tmp_path: Path, serve: Any, flag: str | None
) -> None:
    stub = StubWsd()
    path = serve(stub)
    extra = [flag] if flag else []
    g = await start_guest(
        tmp_path, "--socket", str(path), "--vm-id", "vm-7", "--size", "8M", *extra
    )
    try:
        assert g.ready is not None
        assert g.ready.handoff == {
            "type": "accepted",
            "version": 1,
            "vm_id": "vm-7",
            "mode": "stub",
        }
        [req] = stub.requests
        assert req.vm_id == "vm-7" and req.vmm_pid == g.pid == stub.peers[0].pid
        assert req.uffd.fd_index == 0 and req.uffd.state == "raw"
        [region] = req.regions
        assert (region.host_virt_addr, region.size, region.page_size) == (
            g.ready.base,
            8 * MIB,
            PAGE,
        )
        assert (region.guest_phys_addr, region.offset, region.fd_index) == (0, 0, 1)
        assert region.dma_pinned == (flag == "--dma-pinned")
        uffd, memfd = stub.fds[0]
        assert describe_fd(uffd).kind is FdKind.USERFAULTFD
        info = describe_fd(memfd)
        assert info.kind is FdKind.MEMFD and info.size == 8 * MIB
        # The same file the guest maps: its bytes are the guest's pattern.
        page = int(g.truth()[0].hot[0])
        assert int.from_bytes(os.pread(memfd, 8, page * PAGE), "little") >> 24 == page
        # The guest keeps its own copy of the uffd (RWP-FACTS fact 9).
        assert g.ready.uffd is not None
        assert "anon_inode:[userfaultfd]" in os.readlink(f"/proc/{g.pid}/fd/{g.ready.uffd}")
        await asyncio.sleep(0.5)
        assert g.proc.poll() is None and stub.ended == []
        assert await asyncio.to_thread(g.stop) == 0
        await wait_for(lambda: stub.ended == ["vm-7"])  # its exit closed the session
        r = g.report()
        assert r["handoff"]["mode"] == "stub" and r["ops"] > 0 and r["verify_errors"] == 0
        assert r["handoff_closed_by_wsd"] is None
    finally:
        g.close()


@pytest.mark.asyncio
async def test_refused_handoff_exits_with_wsds_message(tmp_path: Path, serve: Any) -> None:
    path = serve(StubWsd(HandoffError(ErrorCode.UNSUPPORTED, "no tracking on this kernel")))
    with pytest.raises(GuestError) as exc:
        await start_guest(tmp_path, "--socket", str(path), "--size", "4M")
    assert exc.value.returncode == 4
    assert "unsupported: no tracking on this kernel" in exc.value.stderr


def test_no_wsd_listening_exits_non_zero(tmp_path: Path) -> None:
    with pytest.raises(GuestError) as exc:
        GuestProcess.start(["--socket", str(tmp_path / "none.sock"), "--size", "4M"])
    assert exc.value.returncode == 4 and "cannot hand off to wsd" in exc.value.stderr


@dataclass(frozen=True)
class TrackingMode:
    """How wsd arms a range and what its scan reports, in one of its two modes."""

    name: str
    features: Feature
    register: RegisterMode
    category: PageCategory
    write_ratio: str  # wp-async sees only writes: make every access one

    def arm(self, uffd: Userfaultfd, base: int, size: int) -> None:
        if self.register is RegisterMode.RWP:
            uffd.rwprotect(base, size, protect=True)
        else:
            uffd.writeprotect(base, size, protect=True)


MODES = [
    TrackingMode(
        "wp-async",
        Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM,
        RegisterMode.WP,
        PageCategory.WRITTEN,
        "1",
    ),
    TrackingMode(
        "rwp", Feature.RWP | Feature.RWP_ASYNC, RegisterMode.RWP, PageCategory.ACCESSED, "0.3"
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
async def test_the_tracked_pages_each_interval_are_exactly_the_hot_set(
    tmp_path: Path, serve: Any, mode: TrackingMode
) -> None:
    """What wsd's tracker sees in each interval of a uniform guest: its hot set, exactly."""
    missing = mode.features & ~probe_api().features
    if missing:
        pytest.skip(f"kernel lacks {missing!r} for {mode.name} tracking")
    stub = StubWsd()
    path = serve(stub)
    g = await start_guest(
        tmp_path,
        "--socket",
        str(path),
        "--size",
        "16M",
        "--write-ratio",
        mode.write_ratio,
        "--threads",
        "2",
        "--seed",
        "3",
    )
    try:
        assert g.ready is not None
        base, size = g.ready.base, g.ready.size
        hot = g.truth()[0].hot
        uffd = Userfaultfd(os.dup(stub.fds[0][0]))
        with uffd, Pagemap.open(g.pid) as pm:
            uffd.api(mode.features)
            uffd.register(base, size, mode.register)
            for _ in range(3):
                mode.arm(uffd, base, size)
                await asyncio.sleep(0.25)
                seen = pm.scan(base, size, category_mask=mode.category)
                assert np.array_equal(seen.page_indices(base, PAGE), hot)
        assert await asyncio.to_thread(g.stop) == 0
        assert g.report()["verify_errors"] == 0
    finally:
        g.close()


def test_results_outlive_a_temporary_workdir() -> None:
    g = GuestProcess.start(["--no-handoff", "--size", "4M", "--duration", "0.2"])
    assert g.wait(60) == 0
    g.close()
    assert not g.workdir.exists()
    assert g.report()["ops"] > 0 and len(g.truth()) == 1 and g.stderr() == ""


def test_report_is_json_lines_truth(tmp_path: Path) -> None:
    g = run_guest(tmp_path, "--no-handoff", "--size", "4M", "--duration", "0.2")
    lines = g.truth_path.read_text().splitlines()
    rec = json.loads(lines[0])
    assert set(rec) == {"phase", "t", "pattern", "page_size", "hot_count", "hot"}
    assert rec["hot_count"] == len(rec["hot"])
