"""The guest's vCPUs: worker threads that drive the C access loop.

Each worker picks a batch of pages (a shuffled pass over the current hot set,
or zipf samples), decides read or write per access with its own numpy RNG,
and calls ``wsdg_access`` with the GIL released.  A worker blocked in a
userfaultfd fault therefore stops only itself.

Phases: ``Workload.advance_phase`` computes the next hot set, writes its truth
record (with the monotonic time *before* publication) and then publishes it.
Workers pick it up at their next batch (at most 4 MiB of accesses later), so
accesses of the old phase may continue for about a millisecond after the
recorded time, and none of the new phase happen before it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .config import GuestConfig, Pattern
from .hotset import HotSets, Pages
from .memory import GuestMemory

__all__ = ["Corruption", "Counts", "Phase", "TruthLog", "Workload", "describe_found"]

BATCH_BYTES = 4 << 20
_MASK64 = (1 << 64) - 1


@dataclass
class Counts:
    ops: int = 0
    reads: int = 0
    writes: int = 0
    unverified: int = 0
    passes: int = 0

    def add(self, other: Counts) -> None:
        self.ops += other.ops
        self.reads += other.reads
        self.writes += other.writes
        self.unverified += other.unverified
        self.passes += other.passes


@dataclass
class PassTimes:
    """Wall time of complete passes over the hot set."""

    count: int = 0
    total: float = 0.0
    min: float = float("inf")
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def merge(self, other: PassTimes) -> None:
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def as_json(self) -> dict[str, float] | None:
        if not self.count:
            return None
        return {
            "count": self.count,
            "mean": self.total / self.count,
            "min": self.min,
            "max": self.max,
        }


@dataclass(frozen=True)
class Phase:
    number: int
    hot: Pages
    started: float


@dataclass(frozen=True)
class Corruption:
    """A page that did not hold what the guest last wrote to it."""

    page: int
    expected_version: int
    expected_version_max: int
    word: int
    value: int
    found: str
    by_write: bool
    thread: int

    def message(self) -> str:
        expected = f"version {self.expected_version}"
        if self.expected_version_max != self.expected_version:
            expected += f" (or {self.expected_version_max}, if a write was in flight)"
        return (
            f"page {self.page}: expected {expected}, found {self.found}"
            f" (word {self.word} = {self.value:#018x}, seen by a"
            f" {'write' if self.by_write else 'read'} on vcpu {self.thread})"
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message()}


def describe_found(data: bytes, page: int, word: int, value: int, npages: int) -> str:
    """What a corrupt page holds, in words: zeros, another version or page, or garbage."""
    # Only on the way out, and the puppet module pulls in half of wsd: import here.
    from wsd.testing.puppet_vmm import _GOLDEN, decode_page  # noqa: PLC0415

    if not any(data):
        return "all zeros"
    whole = decode_page(data, len(data))
    if whole is not None:
        index, version = whole
        return f"version {version}" if index == page else f"page {index} version {version}"
    body = 0 if word == 0 else (word + 1) * int(_GOLDEN) & _MASK64
    key = value ^ body
    index, version = key >> 24, key & 0xFFFFFF
    if value == 0:
        what = "zeros"
    elif index < npages:
        what = f"page {index} version {version}" if index != page else f"version {version}"
    else:
        return "garbage"
    return f"a mixed page whose word {word} holds {what}"


class TruthLog:
    """JSON lines, one per phase: its number, start time and exact sorted hot set."""

    def __init__(self, path: Path | None, *, pattern: Pattern, page_size: int) -> None:
        self._file: IO[str] | None = path.open("w", buffering=1) if path else None
        self.pattern = pattern
        self.page_size = page_size

    def record(self, phase: Phase) -> None:
        if self._file is None:
            return
        rec = {
            "phase": phase.number,
            "t": phase.started,
            "pattern": str(self.pattern),
            "page_size": self.page_size,
            "hot_count": len(phase.hot),
            "hot": phase.hot.tolist(),
        }
        self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _Worker:
    tid: int
    res: Any  # struct wsdg_result *, with its diag buffer
    diag: Any
    counts: dict[int, Counts] = field(default_factory=dict)
    passes: PassTimes = field(default_factory=PassTimes)
    thread: threading.Thread | None = None

    def at(self, phase: int) -> Counts:
        c = self.counts.get(phase)
        if c is None:
            c = self.counts[phase] = Counts()
        return c


class Workload:
    """``config.threads`` workers over ``memory``; stop with :meth:`stop`."""

    def __init__(
        self,
        memory: GuestMemory,
        config: GuestConfig,
        hotsets: HotSets,
        truth: TruthLog,
        *,
        on_stop: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.memory = memory
        self.config = config
        self.hotsets = hotsets
        self.truth = truth
        self.clock = clock
        self._on_stop = on_stop
        self._ffi = memory.native.ffi
        self._lib = memory.native.lib
        self._batch = max(1, BATCH_BYTES // memory.page_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [self._new_worker(t) for t in range(config.threads)]
        self._phases: list[Phase] = []
        self._passes_in_phase = [0] * config.threads
        self._seeds = np.random.SeedSequence(hotsets.seed).spawn(config.threads)
        self.corruption: Corruption | None = None
        self.failure: BaseException | None = None
        self.started = 0.0
        self.ended: float | None = None

    def _new_worker(self, tid: int) -> _Worker:
        res = self._ffi.new("struct wsdg_result *")
        diag = self._ffi.new("uint8_t[]", self.memory.page_size)
        res.diag = diag
        return _Worker(tid, res, diag)

    # -- control ---------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._begin_phase_locked(0)
        self.started = self._phases[0].started
        for w in self._workers:
            w.thread = threading.Thread(
                target=self._run, args=(w,), name=f"vcpu-{w.tid}", daemon=True
            )
            w.thread.start()

    @property
    def phase(self) -> Phase:
        return self._phases[-1]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def advance_phase(self) -> Phase:
        with self._lock:
            return self._begin_phase_locked(self._phases[-1].number + 1)

    def _begin_phase_locked(self, number: int) -> Phase:
        hot = self.hotsets.hot(number)
        phase = Phase(number, hot, self.clock())
        self.truth.record(phase)  # on disk before any access of the phase
        self._phases.append(phase)
        self._passes_in_phase = [0] * len(self._workers)
        return phase

    def stop(self) -> None:
        if self.ended is None:
            self.ended = self.clock()
        self._stop.set()
        self._on_stop()

    def join(self, timeout: float) -> int:
        """Wait for the workers; returns how many are still running (blocked in a fault)."""
        deadline = time.monotonic() + timeout
        for w in self._workers:
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for w in self._workers if w.thread is not None and w.thread.is_alive())

    # -- workers ---------------------------------------------------------

    def _run(self, w: _Worker) -> None:
        try:
            rng = np.random.default_rng(self._seeds[w.tid])
            if self.hotsets.pattern is Pattern.ZIPF:
                self._run_zipf(w, rng)
            else:
                self._run_passes(w, rng)
        except BaseException as e:  # a bug: stop the guest rather than run short of a vcpu
            with self._lock:
                if self.failure is None:
                    self.failure = e
            self.stop()

    def _ops(self, rng: np.random.Generator, n: int) -> Any:
        return (rng.random(n) < self.config.write_ratio).view(np.uint8)

    def _run_passes(self, w: _Worker, rng: np.random.Generator) -> None:
        while not self._stop.is_set():
            phase = self._phases[-1]
            order = rng.permutation(phase.hot)
            ops = self._ops(rng, len(order))
            pages_p = self._ffi.from_buffer("uint64_t[]", order)
            ops_p = self._ffi.from_buffer("uint8_t[]", ops)
            counts = w.at(phase.number)
            t0 = time.perf_counter()
            for first in range(0, len(order), self._batch):
                if self._stop.is_set() or self._phases[-1] is not phase:
                    break
                n = min(self._batch, len(order) - first)
                if not self._access(w, pages_p + first, ops_p + first, n, counts):
                    return
            else:
                w.passes.add(time.perf_counter() - t0)
                counts.passes += 1
                self._pass_done(w, phase)

    def _run_zipf(self, w: _Worker, rng: np.random.Generator) -> None:
        counts = w.at(0)
        while not self._stop.is_set():
            pages = self.hotsets.sample(rng, self._batch)
            ops = self._ops(rng, self._batch)
            pages_p = self._ffi.from_buffer("uint64_t[]", pages)
            ops_p = self._ffi.from_buffer("uint8_t[]", ops)
            if not self._access(w, pages_p, ops_p, self._batch, counts):
                return

    def _access(self, w: _Worker, pages: Any, ops: Any, n: int, counts: Counts) -> bool:
        """One C call over ``n`` pages; False (and the guest stopping) on corruption."""
        res = w.res
        bad = self._lib.wsdg_access(self.memory.guest, pages, ops, n, res)
        done = n if bad < 0 else bad
        writes, unverified = int(res.writes), int(res.unverified)
        res.writes = res.unverified = 0
        counts.ops += done
        counts.writes += writes
        counts.reads += done - writes
        counts.unverified += unverified
        if bad < 0:
            return True
        data = bytes(self._ffi.buffer(w.diag, self.memory.page_size))
        page, word, value = int(res.page), int(res.word), int(res.found)
        found = describe_found(data, page, word, value, self.memory.npages)
        corruption = Corruption(
            page, int(res.lo), int(res.hi), word, value, found, bool(res.write), w.tid
        )
        with self._lock:
            if self.corruption is None:
                self.corruption = corruption
        self.stop()
        return False

    def final_check(self) -> int:
        """Read every page once, after the workers stopped; pages verified.

        Evicted pages come back through wsd while this runs, so a page that was
        evicted and never touched again is checked too.  A bad page is recorded
        in :attr:`corruption` like one found by a worker.
        """
        w = self._new_worker(len(self._workers))
        pages = np.arange(self.memory.npages, dtype=np.uint64)
        ops = np.zeros(len(pages), dtype=np.uint8)
        pages_p = self._ffi.from_buffer("uint64_t[]", pages)
        ops_p = self._ffi.from_buffer("uint8_t[]", ops)
        counts = Counts()
        for first in range(0, len(pages), self._batch):
            n = min(self._batch, len(pages) - first)
            if not self._access(w, pages_p + first, ops_p + first, n, counts):
                break
        return counts.ops - counts.unverified

    def _pass_done(self, w: _Worker, phase: Phase) -> None:
        every = self.config.phase_passes
        if self.hotsets.pattern is not Pattern.PHASES or every is None:
            return
        with self._lock:
            if self._phases[-1] is not phase:
                return
            self._passes_in_phase[w.tid] += 1
            if min(self._passes_in_phase) >= every:
                self._begin_phase_locked(phase.number + 1)

    # -- results ---------------------------------------------------------

    def phases(self) -> list[dict[str, Any]]:
        end = self.ended if self.ended is not None else self.clock()
        out = []
        for i, phase in enumerate(self._phases):
            ended = self._phases[i + 1].started if i + 1 < len(self._phases) else end
            total = Counts()
            for w in self._workers:
                total.add(w.counts.get(phase.number, Counts()))
            seconds = max(ended - phase.started, 1e-9)
            out.append(
                {
                    "phase": phase.number,
                    "started": phase.started,
                    "ended": ended,
                    "seconds": seconds,
                    "hot_pages": len(phase.hot),
                    **asdict(total),
                    "ops_per_s": total.ops / seconds,
                }
            )
        return out

    def totals(self) -> Counts:
        total = Counts()
        for w in self._workers:
            for c in w.counts.values():
                total.add(c)
        return total

    def pass_times(self) -> PassTimes:
        times = PassTimes()
        for w in self._workers:
            times.merge(w.passes)
        return times
