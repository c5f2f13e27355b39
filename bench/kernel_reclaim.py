"""wsd against what a user would do instead: memory.high stepped down, swap on zram.

    .venv/bin/python bench/kernel_reclaim.py [--size 256M] [--seconds 60] [--tier zstd|file]
                                             [--patterns uniform,zipf,phases] [--json FILE]
    .venv/bin/python -m vmtest run --timeout 3000 -- \\
        .venv/bin/python bench/kernel_reclaim.py --size 64M --seconds 40     # 7.3 VM, rwp

Needs root, a cgroup v2 memory controller and a free zram device.  For each
pattern, in one run:

1. bench/value.py's ``measure`` (its baselines without wsd and its run with
   wsd), with a seed chosen here;
2. the same ``wsd guest`` workload (same flags, same seed, ``--no-handoff``)
   in a fresh cgroup v2 child with swap on zram, while ``memory.high`` is
   stepped down TMO/senpai style: first ``max`` (the reference throughput),
   then to leave less and less of the guest's memory resident, down to what
   wsd saved in step 1 and past it.  Each step settles, then holds its limit
   for a window in which throughput (``--progress``) and the cgroup's PSI
   (``memory.pressure``) are read.

Memory saved, on both sides, is the guest's size minus the memfd's resident
bytes.  For the kernel that is the cgroup's ``memory.stat`` ``shmem``: the
guest's RAM is the only shmem charged there, and a shmem page moved to swap
leaves the shmem count (it is in swap, or in the swap cache, not in the
memfd).  ``/proc/PID/smaps`` would miss resident pages the guest has not
mapped, and ``memory.current`` also counts the guest process's own heap,
which the kernel reclaims as well (shown as "cgroup saved").  Neither side
counts its compressed copy (wsd's zstd tier, zram's pool; zram's is shown).

Figures, per pattern: the most memory the kernel saved at a throughput of at
least 95% of its reference and at least wsd's own throughput ratio ("at equal
throughput"), and the kernel's throughput with wsd's saving ("at equal memory
saved").  Everything set up is torn down at the end, also on failure: guest
killed, cgroup removed, controller and mount as before, swapoff, zram reset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import value  # bench/value.py

from wsd.guest.config import parse_size
from wsd.guest.process import GuestProcess
from wsd.kernel import probe_kernel

MIB = 1 << 20
PAGE = mmap.PAGESIZE
ZRAM = Path("/sys/block/zram0")
JOIN_ENV = "WSD_BENCH_JOIN_CGROUP"
# GuestProcess.start execs the interpreter itself, so the guest joins its cgroup
# from sitecustomize: Python runs it at startup, before wsd.guest creates (and
# so charges) the memfd.  A memcg charge stays where it was made; moving the
# guest in later would leave its RAM charged outside.
SITECUSTOMIZE = f"""\
import os
import signal
_procs = os.environ.pop({JOIN_ENV!r}, None)
if _procs:
    with open(_procs, "w") as _f:
        _f.write(str(os.getpid()))
"""
# Shares of the guest to save, stepping memory.high down; wsd's saving is added.
GRID = (0.25, 0.5, 0.7, 0.8, 0.85, 0.9)
MADV_PAGEOUT = 21


class Unavailable(RuntimeError):
    """This host cannot run the comparison; the message says exactly why."""


# --- what this host offers -------------------------------------------------------------------


def cgroup2_mounts() -> list[Path]:
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, fstype, *_ = line.split()
        if fstype == "cgroup2":
            out.append(Path(where))
    return out


def memory_controller_problem() -> str | None:
    """None if cgroup v2 can have the memory controller, else why not."""
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy, count, enabled = line.split()
        if name != "memory":
            continue
        if enabled != "1":
            return "the memory controller is disabled (cgroup_disable=memory?)"
        if hierarchy != "0":
            where = [
                ln.split()[1]
                for ln in Path("/proc/mounts").read_text().splitlines()
                if ln.split()[2] == "cgroup" and "memory" in ln.split()[3].split(",")
            ]
            return (
                f"the memory controller is bound to cgroup v1 hierarchy {hierarchy} "
                f"(mounted at {', '.join(where) or '?'}, {count} cgroups); a controller "
                "serves one hierarchy at a time, so cgroup v2 cannot have it (no memory.high, "
                "no per-cgroup memory.pressure) unless that v1 hierarchy is emptied and "
                "unmounted, which this benchmark will not do to the machine's own cgroups"
            )
        return None
    # Recent kernels list in /proc/cgroups only the controllers cgroup v1 can have:
    # without CONFIG_MEMCG_V1 (Debian's 7.3) memory is missing there although
    # cgroup v2 has it.  memory_cgroup() then checks cgroup.controllers.
    return None


def zram_problem() -> str | None:
    if not ZRAM.exists():
        # Loaded as a module in the 7.3 VM; built in on the host.
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            subprocess.run(["modprobe", "zram", "num_devices=1"], check=True, capture_output=True)
    if not ZRAM.exists():
        return "no /sys/block/zram0 (CONFIG_ZRAM, or modprobe zram failed)"
    if int((ZRAM / "disksize").read_text()) != 0:
        return "zram0 is already set up (disksize != 0): in use by someone else"
    return None


def zram_algorithms() -> list[str]:
    return (ZRAM / "comp_algorithm").read_text().replace("[", "").replace("]", "").split()


def zram_stats() -> tuple[int, int]:
    """(bytes stored, bytes of RAM zram uses for them)."""
    f = (ZRAM / "mm_stat").read_text().split()
    return int(f[0]), int(f[2])


# --- set up, and always torn down --------------------------------------------------------------


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def teardown(what: str, fn: Callable[..., object], *args: object) -> None:
    """Run one teardown step; a failure is said loudly, and the others still run."""
    try:
        fn(*args)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        print(f"TEARDOWN FAILED: {what}: {detail} -- undo by hand", file=sys.stderr)


@contextlib.contextmanager
def zram_swap(size: int, algorithm: str) -> Iterator[str]:
    """zram0 as the highest-priority swap; yields the algorithm it really uses."""
    with contextlib.ExitStack() as undo:
        undo.callback(teardown, "zram0 reset", (ZRAM / "reset").write_text, "1")
        (ZRAM / "comp_algorithm").write_text(algorithm)
        used = next(a[1:-1] for a in (ZRAM / "comp_algorithm").read_text().split() if "[" in a)
        params = ZRAM / "algorithm_params"
        if used == "zstd" and params.exists():
            # wsd's tier compresses at level 1; zram's zstd default is 3.
            with contextlib.suppress(OSError):
                params.write_text("algo=zstd level=1")
                used = "zstd level 1"
        (ZRAM / "disksize").write_text(str(size))
        run("mkswap", "/dev/zram0")
        run("swapon", "--priority", "32767", "/dev/zram0")
        undo.callback(teardown, "swapoff /dev/zram0", run, "swapoff", "/dev/zram0")
        yield used


@dataclass
class Cgroup:
    path: Path

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)

    def stat(self, key: str) -> int:
        for line in self.read("memory.stat").splitlines():
            k, v = line.split()
            if k == key:
                return int(v)
        raise KeyError(key)

    def current(self) -> int:
        return int(self.read("memory.current"))

    def pressure_us(self) -> tuple[int, int] | None:
        """Total microseconds of memory pressure, some and full (None without PSI)."""
        try:
            lines = self.read("memory.pressure").splitlines()
        except OSError:
            return None
        some, full = (int(ln.rsplit("total=", 1)[1]) for ln in lines[:2])
        return some, full


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[Cgroup]:
    """A child of the cgroup v2 root with the memory controller, removed afterwards."""
    with contextlib.ExitStack() as undo:
        mounts = cgroup2_mounts()
        if mounts:
            root = mounts[0]
        else:
            root = Path(tempfile.mkdtemp(prefix="wsd-cgroup2-"))
            undo.callback(teardown, f"rmdir {root}", os.rmdir, root)
            run("mount", "-t", "cgroup2", "none", str(root))
            undo.callback(teardown, f"umount {root}", run, "umount", str(root))
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            raise Unavailable(f"no memory controller in cgroup v2 at {root}")
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
            undo.callback(
                teardown,
                f"-memory in {root}/cgroup.subtree_control",
                (root / "cgroup.subtree_control").write_text,
                "-memory",
            )
        child = root / name
        child.mkdir()
        undo.callback(teardown, f"rmdir {child}", os.rmdir, child)
        yield Cgroup(child)


def check_shmem_swaps() -> str:
    """Page a 16 MiB memfd of this process out with MADV_PAGEOUT; does it reach zram?"""
    libc = ctypes.CDLL(None, use_errno=True)
    n = 4096
    fd = os.memfd_create("wsd-bench-shmem-check")
    try:
        os.ftruncate(fd, n * PAGE)
        with mmap.mmap(fd, n * PAGE) as m:
            for i in range(n):
                m[i * PAGE : i * PAGE + 16] = i.to_bytes(16, "little")
            before = zram_stats()[0]
            m.madvise(MADV_PAGEOUT)
            vec = (ctypes.c_ubyte * n)()
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n * PAGE), vec)
            resident = sum(b & 1 for b in vec)
            stored = zram_stats()[0] - before
            intact = all(m[i * PAGE : i * PAGE + 16] == i.to_bytes(16, "little") for i in range(n))
            del vec
    finally:
        os.close(fd)
    return (
        f"shmem to zram: {n - resident}/{n} pages of a memfd paged out (MADV_PAGEOUT), "
        f"{stored / MIB:.1f} MiB into zram, read back {'intact' if intact else 'CORRUPT'}"
    )


# --- one kernel run --------------------------------------------------------------------------


@dataclass
class Step:
    target_saved: int | None  # None: memory.high = max, the reference
    high: int | None
    saved: float  # guest minus resident shmem, mean over the window
    current: float  # memory.current, mean over the window
    ops_per_s: float
    psi_some: float | None  # % of the window
    psi_full: float | None
    zram_stored: int
    zram_used: int


@dataclass
class KernelRun:
    zram_algorithm: str
    steps: list[Step] = field(default_factory=list)
    verify_errors: int = 0

    def ratio(self, s: Step) -> float:
        return s.ops_per_s / self.steps[0].ops_per_s

    def best_saved(self, min_ratio: float) -> Step:
        """The step that saved most with at least ``min_ratio`` of the reference throughput."""
        ok = [s for s in self.steps if self.ratio(s) >= min_ratio] or self.steps[:1]
        return max(ok, key=lambda s: s.saved)


def ops_between(progress: Path, start: float, end: float) -> float:
    """Operations per second between two CLOCK_MONOTONIC times (the guest's own)."""
    lines = [json.loads(x) for x in progress.read_text().splitlines() if x.endswith("}")]
    inside = [x for x in lines if start <= x["t"] <= end]
    if len(inside) < 2:
        raise RuntimeError(f"only {len(inside)} progress lines in the window")
    ops = inside[-1]["ops"] - inside[0]["ops"]
    return float(ops / (inside[-1]["t"] - inside[0]["t"]))


async def step(
    cg: Cgroup,
    guest_bytes: int,
    target: int | None,
    progress: Path,
    *,
    settle: float,
    window: float,
) -> Step:
    if target is None:
        await asyncio.to_thread(cg.write, "memory.high", "max")
    want = guest_bytes - (target or 0)
    high: int | None = None
    end = time.monotonic() + settle
    while time.monotonic() < end:
        if target is not None:
            # Keep the guest's resident RAM at ``want``: whatever else the kernel
            # takes (the guest's heap) moves the limit, not the goal.  Writing
            # memory.high reclaims at once, in this thread, as senpai's writes do.
            excess = cg.stat("shmem") - want
            high = max(cg.current() - excess, 8 * MIB)
            await asyncio.to_thread(cg.write, "memory.high", str(high))
        await asyncio.sleep(0.5)
    psi0 = cg.pressure_us()
    t0 = time.monotonic()
    saved, current = [], []
    while time.monotonic() - t0 < window:
        await asyncio.sleep(0.5)
        saved.append(guest_bytes - cg.stat("shmem"))
        current.append(cg.current())
    t1 = time.monotonic()
    psi1 = cg.pressure_us()
    some = full = None
    if psi0 is not None and psi1 is not None:
        some = 100 * (psi1[0] - psi0[0]) / 1e6 / (t1 - t0)
        full = 100 * (psi1[1] - psi0[1]) / 1e6 / (t1 - t0)
    stored, used = zram_stats()
    return Step(
        target_saved=target,
        high=high,
        saved=statistics.fmean(saved),
        current=statistics.fmean(current),
        ops_per_s=ops_between(progress, t0, t1),
        psi_some=some,
        psi_full=full,
        zram_stored=stored,
        zram_used=used,
    )


async def kernel_run(
    pattern: str, a: argparse.Namespace, seed: int, wd: Path, wsd_saved: float
) -> KernelRun:
    wd.mkdir()
    join = wd / "join"
    join.mkdir()
    (join / "sitecustomize.py").write_text(SITECUSTOMIZE)
    window = max(a.window, a.phase_seconds) if pattern == "phases" else a.window
    with contextlib.ExitStack() as undo:
        algorithm = undo.enter_context(zram_swap(4 * parse_size(a.size), a.zram_algorithm))
        cg = undo.enter_context(memory_cgroup(f"wsd-kernel-reclaim-{os.getpid()}"))
        env = {
            **os.environ,
            JOIN_ENV: str(cg.path / "cgroup.procs"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(join), os.environ.get("PYTHONPATH")])),
        }
        progress = wd / "progress.jsonl"
        argv = [*value.guest_args(pattern, a, seed), "--no-handoff", "--progress", str(progress)]
        guest = await asyncio.to_thread(
            lambda: GuestProcess.start(argv, workdir=wd / "guest", ready_timeout=300, env=env)
        )
        undo.callback(guest.close)
        assert guest.ready is not None
        member = Path(f"/proc/{guest.pid}/cgroup").read_text()
        if f"0::/{cg.path.name}\n" not in member:
            raise RuntimeError(f"the guest did not join {cg.path}: {member!r}")
        size = guest.ready.size
        if (shmem := cg.stat("shmem")) < 0.95 * size:
            raise RuntimeError(
                f"only {shmem / MIB:.1f} MiB of shmem charged to the cgroup for a "
                f"{size / MIB:.0f} MiB guest: its RAM is charged elsewhere"
            )
        out = KernelRun(algorithm)
        out.steps.append(await step(cg, size, None, progress, settle=a.settle, window=window))
        print(f"    kernel reference: {out.steps[0].ops_per_s:.0f} ops/s", flush=True)
        mine = round(wsd_saved / PAGE) * PAGE
        for target in sorted({round(f * size / PAGE) * PAGE for f in GRID} | {mine}):
            # Past a collapse the deeper steps only cost time, but wsd's saving is
            # always measured: it is half of the comparison.
            if out.ratio(out.steps[-1]) < a.stop_ratio and target != mine:
                continue
            s = await step(cg, size, target, progress, settle=a.settle, window=window)
            out.steps.append(s)
            print(
                f"    kernel: saved {s.saved / MIB:.1f} MiB, throughput {out.ratio(s):.3f}",
                flush=True,
            )
        await asyncio.to_thread(guest.stop, 300)
        report = guest.report()
        out.verify_errors = int(report["verify_errors"]) + int(report["unverified"])
    return out


# --- side by side ------------------------------------------------------------------------------


@dataclass
class Comparison:
    pattern: str
    seed: int
    wsd: value.PatternResult
    kernel: KernelRun
    # The kernel's most memory saved at >= 95% of its reference throughput, and
    # at >= wsd's own throughput ratio.
    kernel_saved_at_95: float
    kernel_saved_at_wsd_throughput: float
    # The kernel's throughput ratio (and real saving) at wsd's saving.
    kernel_ratio_at_wsd_saved: float
    kernel_saved_at_wsd_target: float
    verdict: str


def compare(pattern: str, seed: int, w: value.PatternResult, k: KernelRun) -> Comparison:
    at95 = k.best_saved(0.95)
    at_wsd = k.best_saved(w.throughput_ratio)
    mine = round(w.reclaimed_bytes_mean / PAGE) * PAGE
    same = next(s for s in k.steps if s.target_saved == mine)
    short = same.saved < 0.98 * w.reclaimed_bytes_mean
    verdict = (
        f"at equal throughput (>= wsd's {w.throughput_ratio:.3f}) wsd saved "
        f"{mib(w.reclaimed_bytes_mean)} MiB, the kernel {mib(at_wsd.saved)} MiB; "
        f"at equal memory saved ({mib(w.reclaimed_bytes_mean)} MiB) wsd's throughput is "
        f"{w.throughput_ratio:.3f}, the kernel's {k.ratio(same):.3f}"
        + (f" (its saving fell short: {mib(same.saved)} MiB)" if short else "")
    )
    return Comparison(
        pattern=pattern,
        seed=seed,
        wsd=w,
        kernel=k,
        kernel_saved_at_95=at95.saved,
        kernel_saved_at_wsd_throughput=at_wsd.saved,
        kernel_ratio_at_wsd_saved=k.ratio(same),
        kernel_saved_at_wsd_target=same.saved,
        verdict=verdict,
    )


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MIB:.1f}"


def show(results: list[Comparison]) -> None:
    for c in results:
        k, w = c.kernel, c.wsd
        print(
            f"\n{c.pattern} (seed {c.seed}): value.py baseline {w.baseline_ops_per_s:.0f} ops/s; "
            f"wsd ({w.mode}) throughput {w.throughput_ratio:.3f}, saved "
            f"{mib(w.reclaimed_bytes_mean)} MiB"
        )
        print(
            f"  kernel, memory.high + zram ({k.zram_algorithm}); reference (memory.high=max) "
            f"{k.steps[0].ops_per_s:.0f} ops/s = {k.steps[0].ops_per_s / w.baseline_ops_per_s:.3f}"
            " of value.py's baseline"
        )
        print(
            f"  {'target MiB':>10} {'high MiB':>10} {'saved MiB':>10} {'cgroup':>7} {'thruput':>8} "
            f"{'PSI some%':>9} {'full%':>6} {'zram in/RAM MiB':>16}"
        )
        for s in k.steps:
            psi = (
                f"{s.psi_some:9.2f} {s.psi_full:6.2f}"
                if s.psi_some is not None and s.psi_full is not None
                else f"{'n/a':>9} {'n/a':>6}"
            )
            print(
                f"  {mib(s.target_saved) if s.target_saved is not None else 'max':>10} "
                f"{mib(s.high):>10} {mib(s.saved):>10} {mib(k.steps[0].current - s.current):>7} "
                f"{k.ratio(s):8.3f} {psi} "
                f"{mib(s.zram_stored):>7}/{mib(s.zram_used):<8}"
            )
        if k.verify_errors:
            print(f"  GUEST DATA ERRORS under kernel reclaim: {k.verify_errors}")
    print(
        f"\n{'pattern':8} {'wsd thru':>8} {'wsd saved':>9} | {'kernel saved MiB at thru':>24} | "
        f"{'kernel thru at wsd saved':>24}"
    )
    print(
        f"{'':8} {'':>8} {'MiB':>9} | {'>=0.95':>11} {'>=wsd':>12} | {'thru':>11} {'(saved)':>12}"
    )
    for c in results:
        print(
            f"{c.pattern:8} {c.wsd.throughput_ratio:8.3f} {mib(c.wsd.reclaimed_bytes_mean):>9} | "
            f"{mib(c.kernel_saved_at_95):>11} {mib(c.kernel_saved_at_wsd_throughput):>12} | "
            f"{c.kernel_ratio_at_wsd_saved:11.3f} {mib(c.kernel_saved_at_wsd_target):>12}"
        )
    for c in results:
        print(f"{c.pattern}: {c.verdict}")
    print(
        "throughput: wsd against value.py's baseline run, the kernel against its own "
        "memory.high=max step; saved = guest minus resident memfd, neither counts its "
        "compressed copy"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--seconds", type=float, default=60.0, help="value.py's runs")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--phase-seconds", type=float, default=15.0)
    ap.add_argument("--tier", choices=["zstd", "file"], default="zstd")
    ap.add_argument("--patterns", default="uniform,zipf,phases")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds for each step to settle")
    ap.add_argument(
        "--window", type=float, default=8.0, help="seconds measured per step (phases: a phase)"
    )
    ap.add_argument(
        "--stop-ratio", type=float, default=0.5, help="stop stepping down below this throughput"
    )
    ap.add_argument(
        "--zram-algorithm", default="zstd", help="if zram offers it, else lz4, else lzo-rle"
    )
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    k = probe_kernel()
    print(f"kernel {k.release}; guest {a.size}; tier {a.tier}; value.py runs {a.seconds:g} s")

    if os.geteuid() != 0:
        print("not root: cannot set up zram, swap or cgroups", file=sys.stderr)
        return 2
    if problem := zram_problem():
        print(f"kernel reclaim cannot be measured here: {problem}", file=sys.stderr)
        return 2
    offered = zram_algorithms()
    algorithm = next(x for x in (a.zram_algorithm, "lz4", "lzo-rle", offered[0]) if x in offered)
    if algorithm != a.zram_algorithm:
        print(f"zram offers no {a.zram_algorithm} here ({' '.join(offered)}): using {algorithm}")
    a.zram_algorithm = algorithm
    zswap = Path("/sys/module/zswap/parameters/enabled")
    if zswap.exists() and zswap.read_text().strip() == "Y":
        print("zswap is enabled: swapped pages are compressed by zswap before zram sees them")
    with zram_swap(64 * MIB, algorithm) as used:
        print(f"zram0 ({used}): {check_shmem_swaps()}")
    if problem := memory_controller_problem():
        print(f"kernel reclaim cannot be measured here: {problem}", file=sys.stderr)
        return 2
    if not Path("/proc/pressure/memory").exists():
        print("no PSI (psi=1 on the kernel command line): the PSI columns stay n/a")

    async def all_patterns() -> list[Comparison]:
        out = []
        with tempfile.TemporaryDirectory(prefix="wsd-kernel-reclaim-") as tmp:
            for pattern in a.patterns.split(","):
                seed = int.from_bytes(os.urandom(4), "little")
                w = await value.measure(pattern, a, Path(tmp), seed)
                print(f"  {pattern}: wsd done, saved {mib(w.reclaimed_bytes_mean)} MiB", flush=True)
                kr = await kernel_run(
                    pattern, a, seed, Path(tmp) / f"{pattern}-kernel", w.reclaimed_bytes_mean
                )
                out.append(compare(pattern, seed, w, kr))
        return out

    # SIGTERM unwinds like Ctrl-C, so the teardown still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(all_patterns())
    value.show([c.wsd for c in results])
    show(results)
    if a.json:
        a.json.write_text(json.dumps([asdict(c) for c in results], indent=2))
    return 1 if any(c.wsd.verify_errors or c.kernel.verify_errors for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
