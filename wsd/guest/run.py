"""One ``wsd guest`` run: memory, hand-off, workload, truth, report, exit code.

Exit codes: 0 clean stop (duration over, SIGTERM or SIGINT); 2 bad options or
no memory / no C compiler; 3 corruption (a page did not hold what the guest
last wrote); 4 the hand-off failed (wsd unreachable or refused); 1 anything
else (a bug).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from wsd.vmm.client import HandoffRefused
from wsd.vmm.kept import KeptPipes

from .config import GuestConfig, Pattern
from .hotset import HotSets
from .memory import GuestMemory, GuestSetupError
from .native import HelperBuildError, load_native
from .workload import TruthLog, Workload

__all__ = ["EXIT_CORRUPTION", "EXIT_HANDOFF", "EXIT_SETUP", "run"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_SETUP = 2
EXIT_CORRUPTION = 3
EXIT_HANDOFF = 4

# How long workers get to finish their batch at exit.  One still running after
# that is blocked in a userfaultfd fault nobody resolves (wsd gone or hung):
# the report says so and the process exits anyway.  Generous, because a batch
# whose pages are all evicted needs one fetch per page, and under emulation
# (the 7.3 test VM) a fetch can take a tenth of a second.
JOIN_TIMEOUT = 30.0


def _say(msg: str) -> None:
    print(f"wsd guest: {msg}", file=sys.stderr, flush=True)


class _Waker:
    """Self-pipe the main thread sleeps on; signal handlers and workers write to it.

    A signal handler must not touch a threading.Event (it could deadlock on the
    Event's lock held by the interrupted main thread), so it writes a byte.
    """

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signal: int | None = None
        self.closed = False

    def wake(self) -> None:
        if self.closed:  # a vcpu that was stuck in a fault came back late
            return
        with contextlib.suppress(BlockingIOError):
            os.write(self.w, b"!")

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum
        self.wake()

    def sleep(self, timeout: float | None) -> bool:
        """True if woken, False when ``timeout`` passed."""
        ready, _, _ = select.select([self.r], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            os.read(self.r, 4096)
        return True

    def close(self) -> None:
        self.closed = True
        os.close(self.r)
        os.close(self.w)


@contextlib.contextmanager
def _signals(waker: _Waker) -> Iterator[None]:
    old = {s: signal.signal(s, waker.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _SessionWatch:
    """Keeps the hand-off connection open and notices if wsd closes it.

    It also keeps the pipes wsd sends on it (:class:`KeptPipes`).  With
    ``reattach``, a closed connection means wsd died: it calls it with them
    every second until a restarted wsd takes the session back, then watches
    anew.
    """

    def __init__(
        self,
        sock: socket.socket,
        reattach: Callable[[KeptPipes], socket.socket] | None = None,
    ) -> None:
        self.sock = sock
        self.closed_by_wsd: float | None = None
        self.reattached = 0
        self.pipes_given_back = 0
        self._reattach = reattach
        self._closing = False
        self._thread = threading.Thread(target=self._watch, name="handoff-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        with contextlib.closing(KeptPipes()) as kept:
            while True:
                self.sock.settimeout(None)
                try:
                    while kept.receive(self.sock):
                        pass
                except OSError:
                    pass
                if self._closing:
                    return
                self.closed_by_wsd = time.monotonic()
                if self._reattach is None:
                    _say("wsd closed the hand-off connection: the session has ended (running on)")
                    return
                _say("wsd closed the hand-off connection: reattaching to the next wsd")
                if not self._reattached(self._reattach, kept):
                    return

    def _reattached(self, reattach: Callable[[KeptPipes], socket.socket], kept: KeptPipes) -> bool:
        """Reattach to the next wsd, trying every second; False: watch no more
        (closing, or a wsd that has the session already)."""
        while not self._closing:
            time.sleep(1.0)
            try:
                sock = reattach(kept)
            except HandoffRefused as e:
                if e.code == "duplicate_vm":
                    # A wsd under systemd took it back from its fd store.
                    _say("wsd has the session already (resumed from its fd store)")
                    return False
                _say(f"reattach failed, retrying: {e}")
                continue
            except OSError as e:
                _say(f"reattach failed, retrying: {e}")
                continue
            self.sock.close()
            self.sock = sock
            self.reattached += 1
            self.pipes_given_back += len(kept.parts)
            kept.close()  # the new wsd has them; it sends its own
            _say("reattached")
            return True
        return False

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(1.0)
        self.sock.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _notify_ready(fd: int, memory: GuestMemory, info: dict[str, Any]) -> None:
    msg = {
        "pid": os.getpid(),
        "base": memory.base,
        "size": memory.size,
        "page_size": memory.page_size,
        "pages": memory.npages,
        "memfd": memory.memfd,
        "uffd": memory.uffd,
        **info,
    }
    with contextlib.suppress(OSError), os.fdopen(fd, "w") as f:
        f.write(json.dumps(msg) + "\n")


def run(config: GuestConfig) -> int:
    """Run the guest until the duration ends or a signal arrives; returns the exit code."""
    try:
        config.check()
    except ValueError as e:
        _say(str(e))
        return EXIT_SETUP
    try:
        native = load_native()
        memory = GuestMemory(native, config.size, config.page_size, thp=config.thp)
    except (HelperBuildError, GuestSetupError) as e:
        _say(str(e))
        return EXIT_SETUP
    try:
        return _run(config, memory)
    finally:
        memory.close()


@dataclass
class _Session:
    """What a run decided or learned before its workload starts."""

    seed: int
    hotsets: HotSets
    fill_seconds: float
    reply: dict[str, Any] | None = None
    watch: _SessionWatch | None = None


def _run(config: GuestConfig, memory: GuestMemory) -> int:
    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
    hot_pages = config.hot.pages(memory.npages, memory.page_size)
    hotsets = HotSets(config.pattern, memory.npages, hot_pages, seed, config.zipf_s)
    t_fill = time.monotonic()
    memory.fill()  # before the hand-off: wsd starts with every page present
    session = _Session(seed, hotsets, time.monotonic() - t_fill)
    if config.handoff:
        try:
            memory.open_uffd(user_mode_only=config.user_mode_only)
        except OSError as e:
            hint = "" if config.user_mode_only else " (unprivileged: try --user-mode-only)"
            _say(f"cannot create the userfaultfd: {e}{hint}")
            return EXIT_SETUP
        try:
            session.reply, sock = memory.hand_off(
                config.socket, config.vm_id, dma_pinned=config.dma_pinned
            )
        except HandoffRefused as e:
            _say(str(e))
            return EXIT_HANDOFF
        except OSError as e:
            _say(f"cannot hand off to wsd at {config.socket}: {e}")
            return EXIT_HANDOFF
        # Open until we exit: closing it would end wsd's session.
        reattach = None
        if config.reattach:

            def reattach(kept: KeptPipes) -> socket.socket:
                return memory.hand_off(
                    config.socket, config.vm_id, reattach=kept, dma_pinned=config.dma_pinned
                )[1]

        session.watch = _SessionWatch(sock, reattach)
    try:
        return _run_workload(config, memory, session)
    finally:
        if session.watch:
            session.watch.close()


def _run_workload(config: GuestConfig, memory: GuestMemory, session: _Session) -> int:
    waker = _Waker()
    truth = TruthLog(config.truth, pattern=config.pattern, page_size=memory.page_size)
    workload = Workload(memory, config, session.hotsets, truth, on_stop=waker.wake)
    try:
        with _signals(waker):
            workload.start()
            if config.ready_fd is not None:
                info = {
                    "vm_id": config.vm_id,
                    "seed": session.seed,
                    "hot_pages": session.hotsets.hot_pages,
                    "handoff": session.reply,
                }
                _notify_ready(config.ready_fd, memory, info)
            _main_loop(config, workload, waker)
        workload.stop()
        stuck = workload.join(JOIN_TIMEOUT)
        checked = None
        if not stuck and workload.corruption is None and workload.failure is None:
            checked = workload.final_check()
    finally:
        truth.close()
        waker.close()

    code = EXIT_OK
    if workload.corruption is not None:
        _say(f"corruption: {workload.corruption.message()}")
        code = EXIT_CORRUPTION
    elif workload.failure is not None:
        _say(f"a vcpu thread failed: {workload.failure!r}")
        code = EXIT_BUG
    if config.report:
        report = _report(config, memory, workload, session)
        report.update(
            stuck_threads=stuck,
            stopped_by_signal=waker.signal,
            exit_code=code,
            final_check_pages=checked,
        )
        _write_json(config.report, report)
    if stuck:
        # Threads blocked in a fault nobody will resolve: don't wait on them.
        _say(f"{stuck} vcpu thread(s) still blocked in a page fault at exit")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main_loop(config: GuestConfig, workload: Workload, waker: _Waker) -> None:
    """Sleep until the end, advancing time-based phases; wake on signal or corruption."""
    start = workload.started
    deadline = start + config.duration if config.duration else None
    timed_phases = config.pattern is Pattern.PHASES and config.phase_passes is None
    next_phase = start + config.phase_seconds if timed_phases and config.phase_seconds else None
    progress = config.progress.open("a", buffering=1) if config.progress else None
    next_tick = start + 1.0 if progress else None
    try:
        while not workload.stopping and waker.signal is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if next_phase is not None and now >= next_phase:
                workload.advance_phase()
                next_phase += config.phase_seconds or 0.0
                continue
            if progress is not None and next_tick is not None and now >= next_tick:
                total = workload.totals()
                line = {"t": now, "ops": total.ops, "writes": total.writes}
                progress.write(json.dumps(line) + "\n")
                next_tick += 1.0
                continue
            wakes = [t for t in (deadline, next_phase, next_tick) if t is not None]
            waker.sleep(max(0.0, min(wakes) - now) if wakes else None)
    finally:
        if progress is not None:
            progress.close()


def _report(
    config: GuestConfig, memory: GuestMemory, workload: Workload, session: _Session
) -> dict[str, Any]:
    total = workload.totals()
    ended = workload.ended if workload.ended is not None else time.monotonic()
    seconds = max(ended - workload.started, 1e-9)
    return {
        "vm_id": config.vm_id,
        "pid": os.getpid(),
        "size": memory.size,
        "page_size": memory.page_size,
        "pages": memory.npages,
        "hugetlb": memory.hugetlb,
        "threads": config.threads,
        "pattern": str(config.pattern),
        "hot": str(config.hot),
        "hot_pages": session.hotsets.hot_pages,
        "write_ratio": config.write_ratio,
        "zipf_s": config.zipf_s if config.pattern is Pattern.ZIPF else None,
        "seed": session.seed,
        "handoff": session.reply,
        "handoff_closed_by_wsd": session.watch.closed_by_wsd if session.watch else None,
        "reattached": session.watch.reattached if session.watch else 0,
        "pipes_given_back": session.watch.pipes_given_back if session.watch else 0,
        "fill_seconds": session.fill_seconds,
        "started": workload.started,
        "ended": ended,
        "seconds": seconds,
        "ops": total.ops,
        "reads": total.reads,
        "writes": total.writes,
        "unverified": total.unverified,
        "passes": total.passes,
        "bytes": total.ops * memory.page_size,
        "ops_per_s": total.ops / seconds,
        "pass_seconds": workload.pass_times().as_json(),
        "phases": workload.phases(),
        "verify_errors": 0 if workload.corruption is None else 1,
        "corruption": workload.corruption.as_json() if workload.corruption else None,
    }
