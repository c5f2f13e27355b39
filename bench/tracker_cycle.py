"""CPU time of one wsd tracking cycle against the raw kernel work, and wsd's memory per GiB.

    .venv/bin/python bench/tracker_cycle.py [--sizes 1G,8G] [--cycles N] [--hot 0.1] [--json]

For each guest size: a puppet VMM (``wsd.testing.puppet_vmm``) owns a filled memfd guest
and a raw uffd; ``track_puppet`` starts a :class:`~wsd.tracker.session.VmTracker` on it
in the mode the kernel gives (``rwp`` on Linux 7.3, ``wp-async`` before).  The baseline
is ``bench/raw_cycle.c``, compiled with gcc into a temporary directory at run time.  It
inherits a dup of the same uffd (already negotiated and registered by wsd, so the two
share one uffd context), opens the puppet's pagemap, and does the cycle's ioctls bare:

* rwp: ``SET_MODE`` (sync), ``PAGEMAP_SCAN`` (``ACCESSED``), ``RWPROTECT`` (whole
  range), ``SET_MODE`` (async);
* wp-async: ``PAGEMAP_SCAN`` (``WRITTEN``, ``WP_MATCHING | CHECK_WPASYNC``).

C rather than ctypes because it is the true floor: no interpreter, one output vector
sized for the worst case (so one ``PAGEMAP_SCAN`` call), and no result conversion.

Cycles alternate, wsd then raw, on the same guest; before each, the same hot set
(``--hot`` of the pages, default 10%, random runs of ``--hot-run`` pages) is written.
wsd's cycle is timed with ``time.process_time()`` (user + system time of this process;
the puppet is another process and the C baseline times itself with
``CLOCK_PROCESS_CPUTIME_ID``).  It includes what wsd does beyond the ioctls: the
``PAGEMAP_SCAN`` resume loop, the hot bitmap, the ``SEEK_DATA``/``SEEK_HOLE`` residency
walk and the numpy state update.  ``hook`` is None, so the coroutine never suspends and
is driven without an event loop.  Every cycle checks that both sides saw exactly the hot
set.

How the hot set is written (``--guest-access``):

* ``remote`` (default): ``process_vm_writev`` of one byte per hot page into the
  puppet's mapping.  The kernel writes through the guest's page tables (a remote
  write fault, as a vhost or KVM access would take), and resolves the uffd-wp or RWP
  protection in async mode as for the guest's own write; the per-cycle hot-set check
  confirms that both modes see every page.  About 7 µs a page on the shared host.
* ``puppet``: the puppet's own ``touch`` op (``write=True``).  Faithful, but it builds
  the page's 4 KiB pattern in Python per page: about 85 µs a page on the shared host,
  18 s per cycle for 8 GiB, too slow for the default run.

Memory: the per-page arrays allocated (``RegionState.nbytes`` plus the evictor's
``RegionPolicy``) per GiB, and this process's VmRSS growth (and peak, VmHWM after
resetting it through ``/proc/self/clear_refs``) from just before ``track_puppet`` to
after the cycles, per GiB tracked.  The guest's memory lives in the puppet and is not
counted.

Scale (up to 64 GiB on a machine with less RAM): ``--sparse`` leaves the guest unfilled,
so only the hot set is ever allocated, and ``--evicted F`` marks that share of the cold
pages evicted in the tracker's state and the evictor's policy first (the bookkeeping an
evicted page costs; on a sparse guest they are holes, as evicted pages are)::

    .venv/bin/python bench/tracker_cycle.py --sparse --evicted 0.5 --hot 0.01 \
        --sizes 1G,4G,16G,64G --cycles 5

It assumes 4 KiB mappings: with shmem THP on (``shmem_enabled`` always, within_size or
force), RWPROTECT zaps PMD mappings, the rwp tracker co-registers MINOR, and nothing in
this bench serves the MINOR faults that follow.  It warns when it sees that setting.

A per-step breakdown of wsd's cycle follows (extra cycles with timing wrappers, not
mixed into the measurement above); ``--profile`` adds a cProfile of one cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import gc
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import wsd.kernel.pagemap as pagemap_mod
import wsd.kernel.uffd as uffd_mod
from wsd.evictor.policy import RegionPolicy
from wsd.kernel import ioctl_numbers as nr
from wsd.kernel import probe_kernel
from wsd.testing.arming import track_puppet
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.slowness import in_test_vm
from wsd.tracker.session import VmTracker

BENCH = Path(__file__).resolve().parent
# Pages marked evicted per call with --evicted: the evictor's batch size.
EVICT_BATCH = 1024
GiB = 1 << 30
MiB = 1 << 20
GOAL_OVERHEAD = 0.25
GOAL_MIB_PER_GIB = 2.0
PUPPET_TIMEOUT = 3600.0  # the 8 GiB fill and touches are slow under TCG


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_name(size: int) -> str:
    return f"{size / GiB:g}G" if size >= GiB else f"{size / MiB:g}M"


# ---------------------------------------------------------------------------
# the raw baseline


def build_raw(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("tracker_cycle: gcc is needed to build the raw baseline")
    exe = tmp / "raw_cycle"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(BENCH / "raw_cycle.c")], check=True
    )
    return exe


class RawCycle:
    """bench/raw_cycle.c running beside us: one cycle per request, on a dup of the uffd."""

    def __init__(self, exe: Path, mode: str, p: PuppetVMM) -> None:
        fd = os.dup(p.uffd_fd)
        try:
            self.proc = subprocess.Popen(
                [str(exe), mode, str(fd), str(p.pid), hex(p.base), str(p.size)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=[fd],
                text=True,
            )
        finally:
            os.close(fd)

    def cycle(self) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("c\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw_cycle exited with {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        assert self.proc.stdin
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("q\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------
# the guest's accesses


class RemoteWriter:
    """Write one zero byte at each of ``addrs`` in another process.

    Byte 0 of every puppet page is the low byte of its version, 0 here (this bench never
    uses the puppet's ``write`` op), so the pages' self-verifying patterns stay intact.
    The iovec array is built once, so writing allocates nothing in this process (whose
    RSS growth is measured).
    """

    IOV_MAX = 1024

    def __init__(self, pid: int, addrs: npt.NDArray[np.uint64]) -> None:
        self.pid = pid
        self._iov = np.empty((len(addrs), 2), dtype=np.uint64)
        self._iov[:, 0] = addrs
        self._iov[:, 1] = 1
        libc = ctypes.CDLL(None, use_errno=True)
        self._writev = libc.process_vm_writev
        self._writev.restype = ctypes.c_ssize_t
        self._writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong]
        self._writev.argtypes += [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        self._zeros = ctypes.create_string_buffer(self.IOV_MAX)
        self._local = (ctypes.c_uint64 * 2)(ctypes.addressof(self._zeros), 0)

    def write(self) -> None:
        iov = self._iov
        for first in range(0, len(iov), self.IOV_MAX):
            chunk = iov[first : first + self.IOV_MAX]
            n = len(chunk)
            self._local[1] = n
            got = self._writev(self.pid, ctypes.addressof(self._local), 1, chunk.ctypes.data, n, 0)
            if got != n:
                err = ctypes.get_errno()
                raise OSError(err, f"process_vm_writev wrote {got} of {n}: {os.strerror(err)}")


def hot_set(npages: int, fraction: float, run: int, seed: int) -> npt.NDArray[np.int64]:
    """About ``fraction`` of the pages, in random runs of ``run`` pages, ascending."""
    slots = npages // run
    k = max(1, round(npages * fraction / run))
    starts = np.random.default_rng(seed).choice(slots, size=k, replace=False)
    pages = (np.sort(starts)[:, None] * run + np.arange(run)).ravel()
    return pages.astype(np.int64)


# ---------------------------------------------------------------------------
# wsd's side


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a cycle with no hook) to completion."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the cycle suspended: this bench only drives hook-less cycles")


def wsd_cycle(tracker: VmTracker) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, hot pages) of one ``tracker.cycle()``."""
    w0 = time.perf_counter()
    c0 = time.process_time()
    hot = run_now(tracker.cycle())
    c1 = time.process_time()
    w1 = time.perf_counter()
    return c1 - c0, w1 - w0, sum(int(np.count_nonzero(h)) for h in hot)


def proc_status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


def malloc_trim() -> None:
    """Give freed heap back to the kernel (glibc), to tell live memory from allocator cache."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    except OSError:
        return False
    return True


class _TimedLibc:
    """Stands in for a wsd.kernel module's cffi ``libc`` and times its ioctls."""

    def __init__(self, real: Any, sink: dict[str, float], names: dict[int, str]) -> None:
        self._real = real
        self._sink = sink
        self._names = names

    def ioctl(self, fd: int, request: int, arg: Any) -> Any:
        t0 = time.process_time()
        r = self._real.ioctl(fd, request, arg)
        name = self._names.get(request, hex(request))
        self._sink[f"ioctl {name}"] += time.process_time() - t0
        self._sink[f"calls {name}"] += 1
        return r

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _timed(fn: Callable[..., Any], sink: dict[str, float], label: str) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            sink[label] += time.process_time() - t0

    return wrapper


@contextlib.contextmanager
def instrumented(tracker: VmTracker, sink: dict[str, float]) -> Iterator[None]:
    """Time the steps of ``tracker.cycle()``: instance and module attributes, restored after."""
    names = {
        nr.PAGEMAP_SCAN: "PAGEMAP_SCAN",
        nr.UFFDIO_RWPROTECT: "RWPROTECT",
        nr.UFFDIO_WRITEPROTECT: "WRITEPROTECT",
        nr.UFFDIO_SET_MODE: "SET_MODE",
    }
    # The modules' cffi ``libc`` globals, swapped for timing proxies while this runs.
    modules = (pagemap_mod, uffd_mod)
    saved_libc = [getattr(m, "libc") for m in modules]  # noqa: B009
    for m, real in zip(modules, saved_libc, strict=True):
        setattr(m, "libc", _TimedLibc(real, sink, names))  # noqa: B010
    patched: list[tuple[object, str]] = [(tracker, "_scan")]
    tracker._scan = _timed(tracker._scan, sink, "_scan")  # type: ignore[method-assign]
    real_mark = pagemap_mod.ScanResult.mark
    pagemap_mod.ScanResult.mark = _timed(real_mark, sink, "mark")  # type: ignore[method-assign]
    for t in tracker.regions:
        t.resident = _timed(t.resident, sink, "resident")  # type: ignore[method-assign]
        t.state.observe = _timed(t.state.observe, sink, "observe")  # type: ignore[method-assign]
        patched += [(t, "resident"), (t.state, "observe")]
    try:
        yield
    finally:
        pagemap_mod.ScanResult.mark = real_mark  # type: ignore[method-assign]
        for m, real in zip(modules, saved_libc, strict=True):
            setattr(m, "libc", real)  # noqa: B010
        for obj, attr in patched:
            delattr(obj, attr)


def breakdown_row(s: dict[str, float]) -> dict[str, float]:
    """Exclusive CPU seconds per step of one instrumented cycle."""
    k_scan = s["ioctl PAGEMAP_SCAN"]
    out = {
        "SET_MODE ioctls": s["ioctl SET_MODE"],
        f"PAGEMAP_SCAN ioctls (x{s['calls PAGEMAP_SCAN']:.0f})": k_scan,
        "scan wrapper (resume loop)": s["_scan"] - k_scan - s["mark"],
        "hot bitmap (runs -> bool array)": s["mark"],
        "resident (SEEK_DATA/SEEK_HOLE)": s["resident"],
        "observe (numpy state update)": s["observe"],
        "RWPROTECT ioctl (re-arm)": s["ioctl RWPROTECT"],
    }
    out["rest (cffi args, Python glue, timers)"] = s["total"] - sum(out.values())
    return out


# ---------------------------------------------------------------------------
# one guest size


@dataclass
class Result:
    size: int
    mode: str
    cycles: int
    hot_pages: int
    wsd_cpu_ms: list[float]
    wsd_wall_ms: list[float]
    raw_cpu_ms: list[float]
    raw_wall_ms: list[float]
    raw_regions: int
    state_bytes: int
    rss_before_kib: int
    rss_after_kib: int
    peak_kib: int | None
    rss_trimmed_kib: int = 0
    raw_steps_cpu_ms: dict[str, float] = field(default_factory=dict)
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    profile: str | None = None
    setup_s: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def gib(self) -> float:
        return self.size / GiB

    def summary(self) -> dict[str, Any]:
        wsd = np.array(self.wsd_cpu_ms)
        raw = np.array(self.raw_cpu_ms)
        rss = (self.rss_after_kib - self.rss_before_kib) * 1024
        peak = None if self.peak_kib is None else (self.peak_kib - self.rss_before_kib) * 1024
        return {
            "size": size_name(self.size),
            "mode": self.mode,
            "cycles": self.cycles,
            "hot_pages": self.hot_pages,
            "wsd_cpu_ms_median": float(np.median(wsd)),
            "wsd_cpu_ms_p90": float(np.percentile(wsd, 90)),
            "raw_cpu_ms_median": float(np.median(raw)),
            "raw_cpu_ms_p90": float(np.percentile(raw, 90)),
            "ratio": float(np.median(wsd) / np.median(raw)),
            "ratio_of_pairs_median": float(np.median(wsd / raw)),
            "wsd_wall_ms_median": float(np.median(self.wsd_wall_ms)),
            "raw_wall_ms_median": float(np.median(self.raw_wall_ms)),
            "state_bytes_per_gib": self.state_bytes / self.gib,
            "rss_delta_mib_per_gib": rss / MiB / self.gib,
            "peak_delta_mib_per_gib": None if peak is None else peak / MiB / self.gib,
            "trimmed_delta_mib_per_gib": (self.rss_trimmed_kib - self.rss_before_kib)
            * 1024
            / MiB
            / self.gib,
        }


def measure(size: int, exe: Path, a: argparse.Namespace) -> Result:
    t_setup = time.perf_counter()
    log(f"[{size_name(size)}] spawning and filling the puppet guest ...")
    p = PuppetVMM.spawn(size, fill=not a.sparse)
    raw: RawCycle | None = None
    tracker: VmTracker | None = None
    try:
        pages = hot_set(p.npages, a.hot, a.hot_run, a.seed)
        addrs = np.uint64(p.base) + pages.astype(np.uint64) * np.uint64(p.page_size)
        page_list = pages.tolist() if a.guest_access == "puppet" else []
        writer = RemoteWriter(p.pid, addrs)
        if a.sparse:
            # Allocate the hot set before wsd registers MISSING: nothing in this
            # bench serves a fault, and a write into a hole would wait forever.
            writer.write()

        def touch() -> None:
            if a.guest_access == "remote":
                writer.write()
            else:
                p.call("touch", timeout=PUPPET_TIMEOUT, pages=page_list, write=True)

        evicted = np.empty(0, dtype=np.int64)
        if a.evicted:
            # Chosen before the RSS baseline: the bench's temporaries are not wsd's.
            cold = np.setdiff1d(np.arange(p.npages, dtype=np.int64), pages)
            rng = np.random.default_rng(a.seed + 1)
            evicted = np.sort(rng.choice(cold, int(len(cold) * a.evicted), replace=False))
            del cold
        gc.collect()
        malloc_trim()
        before = proc_status_kib("VmRSS")["VmRSS"]
        have_peak = reset_peak_rss()
        tracker = track_puppet(p)
        mode = str(tracker.mode)
        # The evictor's per-page history; --evicted marks that share of the cold
        # pages evicted in the tracker and the policy (bookkeeping only: on a
        # sparse guest they are holes, as evicted pages are).
        policies = [RegionPolicy(t.npages) for t in tracker.regions]
        for k in range(0, len(evicted), EVICT_BATCH):  # in batches, as the evictor does
            tracker.regions[0].state.note_evicted(evicted[k : k + EVICT_BATCH])
            policies[0].note_evicted(evicted[k : k + EVICT_BATCH], 0)
        del evicted
        raw = RawCycle(exe, mode, p)
        setup_s = time.perf_counter() - t_setup
        log(f"[{size_name(size)}] {mode}: {len(pages)} hot pages, setup {setup_s:.1f} s")

        res = Result(size, mode, a.cycles, len(pages), [], [], [], [], 0, 0, before, 0, None)
        res.setup_s = setup_s
        raw_steps: dict[str, list[float]] = defaultdict(list)
        t_loop = time.perf_counter()
        for i in range(a.warmup + a.cycles):
            touch()
            cpu, wall, seen = wsd_cycle(tracker)
            if seen != len(pages):
                res.mismatches.append(f"cycle {i}: wsd saw {seen} hot pages of {len(pages)}")
            touch()
            r = raw.cycle()
            if r["hot_pages"] != len(pages):
                res.mismatches.append(
                    f"cycle {i}: raw saw {r['hot_pages']} hot pages of {len(pages)}"
                )
            if i < a.warmup:
                continue
            res.wsd_cpu_ms.append(cpu * 1e3)
            res.wsd_wall_ms.append(wall * 1e3)
            res.raw_cpu_ms.append(r["cpu_ns"] / 1e6)
            res.raw_wall_ms.append(r["wall_ns"] / 1e6)
            res.raw_regions = r["regions"]
            for k, v in r["steps_cpu_ns"].items():
                raw_steps[k].append(v / 1e6)
        log(f"[{size_name(size)}] {a.cycles} cycle pairs in {time.perf_counter() - t_loop:.1f} s")
        gc.collect()
        status = proc_status_kib("VmRSS", "VmHWM")
        res.rss_after_kib = status["VmRSS"]
        res.peak_kib = status["VmHWM"] if have_peak else None
        malloc_trim()
        res.rss_trimmed_kib = proc_status_kib("VmRSS")["VmRSS"]
        res.state_bytes = sum(t.state.nbytes for t in tracker.regions) + sum(
            pol.nbytes for pol in policies
        )
        res.raw_steps_cpu_ms = {k: float(np.median(v)) for k, v in raw_steps.items()}

        if a.breakdown_cycles:
            rows: list[dict[str, float]] = []
            for _ in range(a.breakdown_cycles):
                touch()
                sink: dict[str, float] = defaultdict(float)
                with instrumented(tracker, sink):
                    c0 = time.process_time()
                    run_now(tracker.cycle())
                    sink["total"] = time.process_time() - c0
                rows.append(breakdown_row(sink))
                touch()
                raw.cycle()  # keep the alternation
            # Keyed by position: the scan's label carries its call count, which may vary.
            res.breakdown_ms = {
                k: float(np.median([list(row.values())[i] for row in rows])) * 1e3
                for i, k in enumerate(rows[-1])
            }
            res.breakdown_ms["total (instrumented)"] = sum(res.breakdown_ms.values())
        if a.profile:
            touch()
            prof = cProfile.Profile()
            prof.enable()
            run_now(tracker.cycle())
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            res.profile = buf.getvalue()
        return res
    finally:
        if raw is not None:
            raw.close()
        if tracker is not None:
            tracker.close()
        p.close()


# ---------------------------------------------------------------------------
# report


def verdict(summaries: list[dict[str, Any]]) -> list[str]:
    lines = []
    if len(summaries) >= 2:
        # Fixed costs (first-cycle allocations, the baseline process) cancel out here.
        a, b = summaries[0], summaries[-1]
        ga, gb = parse_size(a["size"]) / GiB, parse_size(b["size"]) / GiB
        if gb != ga:
            slope = (b["rss_delta_mib_per_gib"] * gb - a["rss_delta_mib_per_gib"] * ga) / (gb - ga)
            lines.append(
                f"RSS growth per extra GiB between {a['size']} and {b['size']}: {slope:.2f} MiB/GiB"
            )
    for s in summaries:
        extra = s["ratio"] - 1
        cpu_ok = "met" if extra <= GOAL_OVERHEAD else "NOT met"
        mem = s["rss_delta_mib_per_gib"]
        state = s["state_bytes_per_gib"] / MiB
        mem_ok = "met" if max(mem, state) <= GOAL_MIB_PER_GIB else "NOT met"
        lines.append(
            f"{s['size']} {s['mode']}: wsd adds {extra:+.0%} CPU over the raw ioctls "
            f"(goal <= +{GOAL_OVERHEAD:.0%}): {cpu_ok}; memory {state:.2f} MiB/GiB state, "
            f"{mem:.2f} MiB/GiB RSS growth (goal <= {GOAL_MIB_PER_GIB:g}): {mem_ok} "
            f"(live after malloc_trim: {s['trimmed_delta_mib_per_gib']:.2f} MiB/GiB)"
        )
    return lines


def print_table(results: list[Result], a: argparse.Namespace) -> None:
    head = (
        f"{'size':>5} {'mode':<9} {'wsd cpu ms':>15} {'raw cpu ms':>15} {'ratio':>6} "
        f"{'wsd wall':>9} {'raw wall':>9} {'state B/GiB':>12} {'RSS MiB/GiB':>12} "
        f"{'peak MiB/GiB':>13}"
    )
    print(
        f"kernel {os.uname().release}, {os.cpu_count()} CPUs, hot {a.hot:.0%} in runs of "
        f"{a.hot_run} page(s), {a.cycles} cycles (+{a.warmup} warm-up) each side, "
        f"guest access: {a.guest_access}"
    )
    print("cpu columns: median/p90 per cycle; wall: median ms; ratio = median wsd / median raw")
    print(head)
    print("-" * len(head))
    summaries = []
    for r in results:
        s = r.summary()
        summaries.append(s)
        peak = s["peak_delta_mib_per_gib"]
        print(
            f"{s['size']:>5} {s['mode']:<9} "
            f"{s['wsd_cpu_ms_median']:>7.2f}/{s['wsd_cpu_ms_p90']:<7.2f} "
            f"{s['raw_cpu_ms_median']:>7.2f}/{s['raw_cpu_ms_p90']:<7.2f} "
            f"{s['ratio']:>6.2f} {s['wsd_wall_ms_median']:>9.2f} {s['raw_wall_ms_median']:>9.2f} "
            f"{s['state_bytes_per_gib']:>12.0f} {s['rss_delta_mib_per_gib']:>12.2f} "
            f"{'n/a' if peak is None else f'{peak:.2f}':>13}"
        )
    print()
    for line in verdict(summaries):
        print(line)
    for r in results:
        for m in r.mismatches:
            print(f"WARNING {size_name(r.size)}: {m}")
        if r.breakdown_ms:
            print()
            print(
                f"where wsd's cycle goes, {size_name(r.size)} {r.mode} "
                f"(CPU ms, median of {a.breakdown_cycles} instrumented cycles; "
                f"raw C steps beside):"
            )
            total = r.breakdown_ms["total (instrumented)"]
            for k, v in r.breakdown_ms.items():
                print(f"  {k:<40} {v:>8.2f}  {v / total:>5.0%}")
            steps = ", ".join(f"{k} {v:.2f}" for k, v in r.raw_steps_cpu_ms.items())
            print(f"  raw C (one PAGEMAP_SCAN, {r.raw_regions} regions): {steps}")
        if r.profile:
            print()
            print(f"cProfile of one cycle, {size_name(r.size)}:")
            print(r.profile)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1G,8G", help="guest sizes, comma-separated")
    ap.add_argument("--cycles", type=int, default=15, help="measured cycles per side")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured cycles per side first")
    ap.add_argument("--hot", type=float, default=0.1, help="fraction of pages written per cycle")
    ap.add_argument("--hot-run", type=int, default=1, help="hot pages come in runs this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--sparse",
        action="store_true",
        help="do not fill the guest: only the hot set is ever allocated (scale runs to 64G)",
    )
    ap.add_argument(
        "--evicted",
        type=float,
        default=0.0,
        help="share of the cold pages marked evicted (tracker and policy bookkeeping)",
    )
    ap.add_argument("--guest-access", choices=["remote", "puppet"], default="remote")
    ap.add_argument("--breakdown-cycles", type=int, default=3, help="0: no per-step breakdown")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra cycle")
    ap.add_argument("--json", action="store_true", help="machine-readable output only")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]

    t0 = time.perf_counter()
    k = probe_kernel()  # once before any RSS baseline: its one-time costs are not per GiB
    if k.thp_shmem_enabled in ("always", "within_size", "force"):
        log(f"WARNING: shmem THP is {k.thp_shmem_enabled}; this bench assumes 4 KiB mappings")
    results = []
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        exe = build_raw(Path(tmp))
        for size in sizes:
            results.append(measure(size, exe, a))
            gc.collect()
    log(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        out = {
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "vm_guest": in_test_vm(),
            "args": vars(a),
            "results": [{**r.summary(), "detail": asdict(r)} for r in results],
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print_table(results, a)
    if any(r.mismatches for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
