"""Fault-to-resume latency of wsd's MISSING fault path against a minimal C handler.

    .venv/bin/python bench/fault_latency.py [--pages N] [--rounds R] [--quick] [--json]

The guest is ``bench/fault_c.c`` (compiled with gcc into a temporary directory at run
time), a C process that maps a memfd ``MAP_SHARED`` and creates a raw userfaultfd.  It
hands both fds over (SCM_RIGHTS), then touches pages on request, one at a time, reading
one byte of each, and times every read with ``clock_gettime(CLOCK_MONOTONIC)`` before and
after: for a page that is a hole that is the whole round trip (fault, message, handler,
``UFFDIO_COPY``, wake, resume).  The touches are C so that nothing on the guest side is
Python.

Handlers, each on a fresh guest, interleaved round by round:

* ``C``: ``fault_c handler``, another process that polls the uffd (negotiated and
  registered for MISSING by this script, which is setup, not measured), reads the
  messages and ``UFFDIO_COPY``\\ s one prepared page to each faulting address.  The pages
  were never populated, so every touch faults.
* ``py``: the Python floor.  This process serves the faults on the same uvloop, with
  the same ``add_reader``, priority and pinning as wsd and wsd's own kernel layer
  (``Userfaultfd.read_messages``, ``Userfaultfd.copy`` of one prepared page), and does
  nothing else: no tracker, no page state, no tier.  What separates it from ``C`` is
  what any handler written in Python on this loop pays; what separates wsd from it is
  wsd's own work per fault.
* ``wsd-zstd``, ``wsd-file``: the real wsd pieces in this process, on uvloop: a
  :class:`~wsd.tracker.session.VmTracker` started on the guest's raw uffd as for a
  hand-off (``wp-async`` on a host without RWP), a ``VmContext`` with the zstd tier
  (``allow_volatile_store``) or the file tier (in a temporary directory, ``--dir``), a
  ``FaultService`` fed by ``wsd.testing.running.serving_faults`` (``add_reader`` on the
  uffd, as the daemon does).  The guest's memory is filled (alternately text-like and
  random pages, no zero pages) with ``pwrite`` on the memfd, one tracking cycle runs, and
  the pages to touch are evicted beforehand with ``Evictor.evict_batch`` on the quiescent
  guest.  Every touch is then a fetch-back: ``get`` from the tier, ``UFFDIO_COPY``.
* ``wsd-zstd+evict``, ``wsd-file+evict``: the same, while a task keeps evicting the
  other ``--evict-pages`` pages of the guest, the toucher never touches, by the daemon's
  path: per step ``Evictor.prepare_idle`` stores the oldest idle pages,
  ``EVICT_STEP_BATCHES`` batches of ``--batch`` pages (``--batches-in-flight`` of them
  at once, the evictor's default unless given), then ``VmTracker.cycle`` with
  ``Evictor.commit`` punches and wakes them in its window.  The bench records when each
  step started and ended (``time.monotonic_ns``, the same clock as the toucher's), and
  reports the latencies of the touches that started during a step (``n`` says how many).
  Until 2026-11-29 this task called ``Evictor.evict_batch`` per batch (one batch at a
  time, no tracking cycle), which only tests and this bench's setup use.

Priorities: as the daemon does, the event loop thread (fault service) is raised to
``SCHED_FIFO`` where allowed, else to nice -10 (``wsd.priority``), and eviction's
background threads run at nice 0; the C handler process gets the loop's policy and
nice value too, so that both handlers compete with the toucher at the same priority.

Placement (``--placements``): ``same`` pins the handler (the C handler process, or every
thread of this process for wsd) and the toucher to CPU 0; ``cross`` pins the handler to
CPU 0 and the toucher to CPU 1.  Same placement for C and wsd in the same round.

Reported per handler and placement: p50 and p99 over all rounds' touches (warm-up
touches excluded), the spread of the per-round p50, and the ratio wsd/C of p50 and p99.
The issue's goal: wsd p50 <= 3x C, and p99 <= 3x C while an eviction batch is in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import uvloop

from wsd.collector import freeze_startup_objects
from wsd.evictor import EvictorConfig
from wsd.evictor.context import VmContext
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import Feature, PageFault, RegisterMode, Userfaultfd, probe_kernel
from wsd.priority import LoopPriority, raise_fault_service
from wsd.storage import FileStoreConfig, PageStore, ZstdStoreConfig
from wsd.storage.registry import open_backend
from wsd.testing.arming import track_memory
from wsd.testing.running import serving_faults
from wsd.tracker.mode import choose_mode
from wsd.tracker.session import VmTracker

BENCH = Path(__file__).resolve().parent
PAGE = 4096
MiB = 1 << 20
GOAL_RATIO = 3.0
EVICT_STEP_BATCHES = 4
"""Batches each eviction step of the ``+evict`` handlers stores, then punches."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the C side


def build_c(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench: gcc is needed to build bench/fault_c.c")
    exe = tmp / "fault_c"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(BENCH / "fault_c.c")], check=True
    )
    return exe


class CGuest:
    """``fault_c guest``: a C process owning a memfd mapping and a raw uffd, touching on request.

    ``memfd`` and ``uffd`` are this process's copies of its fds (the guest keeps its own).
    """

    def __init__(self, exe: Path, size: int, cpu: int | None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with parent, child:
            self.proc = subprocess.Popen(
                [str(exe), "guest", str(child.fileno()), str(size)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=[child.fileno()],
            )
            child.close()
            msg, fds, _, _ = socket.recv_fds(parent, 8, 2)
        if len(fds) != 2 or len(msg) != 8:
            self.proc.kill()
            raise RuntimeError(f"fault_c guest handed over {fds!r}, {msg!r}")
        self.memfd, self.uffd = fds
        self.base = int.from_bytes(msg, sys.byteorder)
        self.size = size
        self.npages = size // PAGE
        self.pid = self.proc.pid
        if cpu is not None:
            os.sched_setaffinity(self.pid, {cpu})
        self._buf = b""

    def missing_uffd(self) -> Userfaultfd:
        """A copy of the guest's uffd, negotiated and registered for MISSING faults."""
        uffd = Userfaultfd(os.dup(self.uffd))
        uffd.api(Feature.MISSING_SHMEM)
        uffd.register(self.base, self.size, RegisterMode.MISSING)
        return uffd

    def send_touch(self, first: int, count: int, stride: int = 1) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(f"t {first} {count} {stride}\n".encode())
        self.proc.stdin.flush()

    def read_result(self) -> npt.NDArray[np.int64]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fault_c guest exited with {self.proc.wait()}")
        return self._parse(line)

    async def touch_async(self, first: int, count: int, stride: int = 1) -> npt.NDArray[np.int64]:
        """Touch while this loop serves the faults; the answer is read with add_reader."""
        assert self.proc.stdout
        loop = asyncio.get_running_loop()
        fd = self.proc.stdout.fileno()
        done: asyncio.Future[bytes] = loop.create_future()
        chunks: list[bytes] = []

        def readable() -> None:
            data = os.read(fd, 1 << 20)
            if not data:
                done.set_exception(RuntimeError("fault_c guest closed its stdout"))
            else:
                chunks.append(data)
                if data.endswith(b"\n"):
                    done.set_result(b"".join(chunks))
            if done.done():
                loop.remove_reader(fd)

        loop.add_reader(fd, readable)
        try:
            self.send_touch(first, count, stride)
            line = await done
        finally:
            loop.remove_reader(fd)
        return self._parse(line)

    @staticmethod
    def _parse(line: bytes) -> npt.NDArray[np.int64]:
        """Two halves: the start times of the touches, then their latencies (ns)."""
        values = np.array(line.split(), dtype=np.int64)
        return values.reshape(2, -1)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.proc.stdin
            self.proc.stdin.write(b"q\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.memfd)
        os.close(self.uffd)


def fill(memfd: int, first: int, npages: int, seed: int = 0) -> None:
    """Alternately text-like and random pages (no zero pages), with pwrite on the memfd."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"the quick brown fox jumps over a lazy dog 0123456789 ", np.uint8)
    chunk = 4096
    for start in range(first, first + npages, chunk):
        n = min(chunk, first + npages - start)
        pages = rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
        text = words[rng.integers(0, len(words), size=(n, PAGE))]
        pages[0::2] = text[0::2]
        os.pwrite(memfd, pages.tobytes(), start * PAGE)


def pin_process(cpu: int | None) -> None:
    """Pin every thread of this process (threads created later inherit it)."""
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


# ---------------------------------------------------------------------------
# wsd's side


def start_tracker(g: CGuest, vm_id: str) -> VmTracker:
    """A VmTracker on the guest's raw uffd, as for a hand-off."""
    return track_memory(vm_id, pid=g.pid, base=g.base, size=g.size, uffd_fd=g.uffd, memfd=g.memfd)


def add_batches_in_flight(p: argparse.ArgumentParser) -> None:
    """``--batches-in-flight``: the evictor's ``batches_in_flight`` for wsd's eviction."""
    p.add_argument(
        "--batches-in-flight",
        type=int,
        default=EvictorConfig().batches_in_flight,
        help="the evictor's batches_in_flight while evicting (its default)",
    )


async def open_tier(tier: str, root: Path, budget: int) -> tuple[PageStore, EvictorConfig]:
    if tier == "zstd":
        store = await open_backend(ZstdStoreConfig(budget_bytes=budget))
        return store, EvictorConfig(allow_volatile_store=True)
    store = await open_backend(FileStoreConfig(root=root))
    return store, EvictorConfig()


def fault_service(ctx: VmContext) -> tuple[FaultService, set[asyncio.Task[None]]]:
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    return FaultService(ctx, spawn), tasks


async def evict_range(ev: Evictor, t: Any, first: int, count: int, batch: int) -> None:
    for start in range(first, first + count, batch):
        pages = np.arange(start, min(start + batch, first + count), dtype=np.int64)
        done = await ev.evict_batch(0, t, pages)
        if done != len(pages):
            raise RuntimeError(f"evict_batch evicted {done} of {len(pages)} pages")


# ---------------------------------------------------------------------------
# one round of each handler


@dataclass
class Args:
    pages: int
    warmup: int
    evict_pages: int
    batch: int
    batches_in_flight: int
    dir: Path
    priority: LoopPriority
    """Of the handlers: wsd's loop thread and the C handler process."""


@dataclass
class Sample:
    latencies: npt.NDArray[np.int64]
    evict_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_c(exe: Path, a: Args, handler_cpu: int | None, toucher_cpu: int | None) -> Sample:
    g = CGuest(exe, (a.warmup + a.pages) * PAGE, toucher_cpu)
    try:
        with g.missing_uffd() as uffd:
            h = subprocess.Popen(
                [str(exe), "handler", str(uffd.fd)], stdin=subprocess.PIPE, pass_fds=[uffd.fd]
            )
        try:
            os.setpriority(os.PRIO_PROCESS, h.pid, a.priority.nice)
            if a.priority.realtime:
                os.sched_setscheduler(h.pid, os.SCHED_FIFO, os.sched_param(a.priority.realtime))
            if handler_cpu is not None:
                os.sched_setaffinity(h.pid, {handler_cpu})
            g.send_touch(0, a.warmup)
            g.read_result()
            g.send_touch(a.warmup, a.pages)
            _, lat = g.read_result()
        finally:
            assert h.stdin
            h.stdin.close()
            h.wait(timeout=10)
    finally:
        g.close()
    return Sample(lat)


async def run_py(exe: Path, a: Args, handler_cpu: int | None, toucher_cpu: int | None) -> Sample:
    """The Python floor: this loop serves the faults with one prepared page and nothing else.

    The same uvloop, ``add_reader``, priority and pinning as wsd, and wsd's own
    kernel layer (``read_messages``, ``copy``), but no tracker, no page state, no
    tier: what any handler written this way pays before doing any work of its own.
    """
    pin_process(handler_cpu)
    g = CGuest(exe, (a.warmup + a.pages) * PAGE, toucher_cpu)
    loop = asyncio.get_running_loop()
    page = os.urandom(PAGE)
    mask = ~(PAGE - 1)
    try:
        with g.missing_uffd() as uffd:

            def readable() -> None:
                for msg in uffd.read_messages():
                    if isinstance(msg, PageFault):
                        with contextlib.suppress(FileExistsError):
                            uffd.copy(msg.address & mask, page)

            loop.add_reader(uffd.fd, readable)
            try:
                await g.touch_async(0, a.warmup)
                _, lat = await g.touch_async(a.warmup, a.pages)
            finally:
                loop.remove_reader(uffd.fd)
    finally:
        g.close()
        pin_process(None)
    return Sample(lat)


async def run_wsd(
    exe: Path,
    a: Args,
    tier: str,
    *,
    with_eviction: bool,
    handler_cpu: int | None,
    toucher_cpu: int | None,
) -> Sample:
    pin_process(handler_cpu)
    touch_pages = a.warmup + a.pages
    npages = touch_pages + (a.evict_pages if with_eviction else 0)
    g = CGuest(exe, npages * PAGE, toucher_cpu)
    root = Path(tempfile.mkdtemp(prefix="fault-latency-", dir=a.dir))
    store: PageStore | None = None
    tracker: VmTracker | None = None
    try:
        fill(g.memfd, 0, npages)
        tracker = start_tracker(g, f"bench-{tier}")
        store, cfg = await open_tier(tier, root / "pages", 4 * npages * PAGE)
        cfg = cfg.model_copy(
            update={"batch_pages": a.batch, "batches_in_flight": a.batches_in_flight}
        )
        ctx = VmContext(tracker.vm_id, tracker, store, cfg)
        faults, tasks = fault_service(ctx)
        await tracker.cycle()
        t = tracker.regions[0]
        ev = Evictor(ctx)
        await evict_range(ev, t, 0, touch_pages, a.batch)
        spans: list[tuple[int, int]] = []
        stop = asyncio.Event()

        async def keep_evicting() -> None:
            # The daemon's path: a prepare stores the oldest idle pages (the
            # toucher's were fetched since, so younger), then a tracking cycle
            # punches them in its window.
            step = EVICT_STEP_BATCHES * a.batch * PAGE
            while not stop.is_set():
                t0 = time.monotonic_ns()
                if not await ev.prepare_idle(step):
                    break
                await tracker.cycle(ev.commit)
                spans.append((t0, time.monotonic_ns()))

        with serving_faults(tracker, faults) as unhandled:
            await g.touch_async(0, a.warmup)
            evicting = asyncio.create_task(keep_evicting()) if with_eviction else None
            if evicting is not None:
                await asyncio.sleep(0)  # let the first batch start
            starts, lat = await g.touch_async(a.warmup, a.pages)
            stop.set()
            if evicting is not None:
                await evicting
            while tasks:
                await asyncio.sleep(0.001)
        if unhandled:
            raise RuntimeError(f"{len(unhandled)} faults nobody handled")
        if ctx.stats.fetched_pages != touch_pages:
            raise RuntimeError(f"fetched {ctx.stats.fetched_pages} pages, not {touch_pages}")
        extra = {"steps": len(spans), "evict_pages_done": ctx.stats.evicted_pages - touch_pages}
        if with_eviction:
            inside = np.zeros(len(starts), dtype=bool)
            for s, e in spans:
                inside |= (starts >= s) & (starts < e)
            extra["touches"] = len(lat)
            return Sample(lat[inside], len(spans), extra)
        return Sample(lat, 0, extra)
    finally:
        if tracker is not None:
            tracker.close()
        if store is not None:
            await store.close()
        g.close()
        shutil.rmtree(root, ignore_errors=True)
        pin_process(None)


# ---------------------------------------------------------------------------
# the run


HANDLERS = ("C", "py", "wsd-zstd", "wsd-file", "wsd-zstd+evict", "wsd-file+evict")


def placements(names: list[str]) -> Iterator[tuple[str, int | None, int | None]]:
    for name in names:
        if name == "same":
            yield name, 0, 0
        elif name == "cross":
            yield name, 0, 1
        elif name == "none":
            yield name, None, None
        else:
            raise SystemExit(f"unknown placement {name!r} (same, cross, none)")


def nowait_reads(directory: Path) -> bool:
    """Whether files in ``directory`` take ``preadv(RWF_NOWAIT)`` (the file tier's inline get)."""
    with tempfile.TemporaryFile(dir=directory) as f:
        f.write(bytes(PAGE))
        f.flush()
        try:
            os.preadv(f.fileno(), [bytearray(PAGE)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                return False
            raise
    return True


@contextlib.contextmanager
def ext4_scratch(size_mib: int) -> Iterator[Path]:
    """A fresh ext4 file system of ``size_mib`` MiB on a loop device over /dev/shm.

    For where the usual directories refuse ``RWF_NOWAIT`` reads (the 7.3 VM's
    ``/tmp`` is an overlayfs): the file tier then serves faults as it would on a
    host's ext4.  Needs root, ``mkfs.ext4`` and loop devices.
    """
    work = Path(tempfile.mkdtemp(prefix="fault-latency-ext4-", dir="/dev/shm"))
    image, mnt = work / "image", work / "mnt"
    mnt.mkdir()
    try:
        with image.open("wb") as f:
            f.truncate(size_mib * MiB)
        if not Path("/dev/loop-control").exists():  # the VM's kernel loads it on demand only
            subprocess.run(["modprobe", "loop"], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pct(x: npt.NDArray[np.int64], q: float) -> float:
    return float(np.percentile(x, q)) / 1000.0 if len(x) else float("nan")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    priority = raise_fault_service()  # this is the loop thread, as in Daemon.run
    freeze_startup_objects()  # as in Daemon.run too
    a = Args(
        args.pages,
        args.warmup,
        args.evict_pages,
        args.batch,
        args.batches_in_flight,
        args.dir,
        priority,
    )
    k = probe_kernel()
    mode = choose_mode(k).mode
    log(
        f"kernel {os.uname().release}, tracking mode {mode}, {os.cpu_count()} CPUs, "
        f"handlers at {priority}"
    )
    if any("file" in h for h in args.handlers) and not nowait_reads(args.dir):
        log(
            f"note: {args.dir} refuses RWF_NOWAIT reads (tmpfs, overlayfs): the file tier's "
            "inline get is off, every fetch takes a worker's round trip; --dir on ext4, XFS "
            "or btrfs measures what such a deployment gets"
        )
    with tempfile.TemporaryDirectory(prefix="fault-latency-build-") as tmp:
        exe = build_c(Path(tmp))
        results: dict[tuple[str, str], list[Sample]] = {}
        for r in range(args.rounds):
            for pname, hcpu, tcpu in placements(args.placements):
                for h in args.handlers:
                    started = time.monotonic()
                    if h == "C":
                        s = await asyncio.to_thread(run_c, exe, a, hcpu, tcpu)
                    elif h == "py":
                        s = await run_py(exe, a, hcpu, tcpu)
                    else:
                        tier = "zstd" if "zstd" in h else "file"
                        s = await run_wsd(
                            exe,
                            a,
                            tier,
                            with_eviction=h.endswith("+evict"),
                            handler_cpu=hcpu,
                            toucher_cpu=tcpu,
                        )
                    results.setdefault((pname, h), []).append(s)
                    log(
                        f"round {r + 1}/{args.rounds} {pname:5} {h:15} "
                        f"p50 {pct(s.latencies, 50):8.1f} µs  p99 {pct(s.latencies, 99):8.1f} µs"
                        f"  n {len(s.latencies)}  {s.extra or ''}"
                        f"  ({time.monotonic() - started:.1f} s)"
                    )
    rows: dict[str, Any] = {}
    for (pname, h), samples in results.items():
        lat = np.concatenate([s.latencies for s in samples])
        rows[f"{pname}/{h}"] = {
            "placement": pname,
            "handler": h,
            "n": len(lat),
            "p50_us": pct(lat, 50),
            "p99_us": pct(lat, 99),
            "round_p50_us": [pct(s.latencies, 50) for s in samples],
            "round_p99_us": [pct(s.latencies, 99) for s in samples],
            "evict_steps": [s.evict_steps for s in samples],
        }
    for row in rows.values():
        base = rows.get(f"{row['placement']}/C")
        if base is not None:
            row["ratio_p50"] = row["p50_us"] / base["p50_us"]
            row["ratio_p99"] = row["p99_us"] / base["p99_us"]
    return {
        "kernel": os.uname().release,
        "mode": str(mode),
        "args": {**vars(a), "dir": str(a.dir), "priority": str(a.priority)},
        "rows": rows,
    }


def print_table(out: dict[str, Any]) -> None:
    print(
        f"kernel {out['kernel']}, mode {out['mode']}, "
        f"+evict with {out['args']['batches_in_flight']} batches in flight"
    )
    print(
        f"{'placement':9} {'handler':15} {'n':>6} {'p50 µs':>8} {'p99 µs':>8} "
        f"{'p50/C':>6} {'p99/C':>6}  per-round p50 µs"
    )
    for row in out["rows"].values():
        spread = "/".join(f"{x:.1f}" for x in row["round_p50_us"])
        print(
            f"{row['placement']:9} {row['handler']:15} {row['n']:6d} {row['p50_us']:8.1f} "
            f"{row['p99_us']:8.1f} {row.get('ratio_p50', float('nan')):6.2f} "
            f"{row.get('ratio_p99', float('nan')):6.2f}  {spread}"
        )
    for pname in dict.fromkeys(r["placement"] for r in out["rows"].values()):
        for tier in ("zstd", "file"):
            quiet = out["rows"].get(f"{pname}/wsd-{tier}")
            busy = out["rows"].get(f"{pname}/wsd-{tier}+evict")
            if quiet and "ratio_p50" in quiet:
                met = "met" if quiet["ratio_p50"] <= GOAL_RATIO else "NOT met"
                print(f"goal {pname} wsd-{tier} p50 <= 3x C: {quiet['ratio_p50']:.2f}x, {met}")
            if busy and "ratio_p99" in busy:
                met = "met" if busy["ratio_p99"] <= GOAL_RATIO else "NOT met"
                print(
                    f"goal {pname} wsd-{tier} p99 during eviction <= 3x C: "
                    f"{busy['ratio_p99']:.2f}x, {met}"
                )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (and docs/benchmarks.md) for what is measured.",
    )
    p.add_argument("--pages", type=int, default=3000, help="measured touches per round")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured touches first")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every handler, interleaved")
    p.add_argument(
        "--evict-pages",
        type=int,
        default=32768,
        help="pages the +evict runs evict beside the touches (at most; default 128 MiB)",
    )
    p.add_argument("--batch", type=int, default=1024, help="pages per eviction batch (batch_pages)")
    add_batches_in_flight(p)
    p.add_argument("--placements", default="same,cross", help="comma-separated: same,cross,none")
    p.add_argument("--handlers", default=",".join(HANDLERS), help="comma-separated subset")
    p.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file tier lives"
    )
    p.add_argument(
        "--ext4",
        type=int,
        metavar="MIB",
        help="put the file tier on a new ext4 of MIB MiB (a loop device on /dev/shm; root)",
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1000 touches")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.pages, args.evict_pages = 1, 1000, 8192
    args.placements = args.placements.split(",")
    args.handlers = args.handlers.split(",")
    for h in args.handlers:
        if h not in HANDLERS:
            raise SystemExit(f"unknown handler {h!r}: {', '.join(HANDLERS)}")
    if (os.cpu_count() or 1) < 2 and "cross" in args.placements:
        raise SystemExit("cross placement needs 2 CPUs")
    with contextlib.ExitStack() as stack:
        if args.ext4:
            args.dir = stack.enter_context(ext4_scratch(args.ext4))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(main_async(args))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
