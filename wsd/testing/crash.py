"""The crash soak: ``wsd run`` SIGKILLed again and again under a guest, no page lost.

A ``wsd run`` process runs under :class:`~wsd.testing.supervisor.Supervisor`
(systemd's fd store, stood in for) with the file tier and a state directory,
evicting everything idle for one interval.  ``wsd guest`` hammers its
self-checking pages on three threads the whole time.  wsd is killed at random
moments, so kills land in the middle of eviction batches, and restarted; each
restart must resume the session from the stored fds, the session description
and the page map, and serve the faults that queued while no wsd ran.  At the
end the guest re-reads and checks every page, and a clean stop must leave the
fd store and the state directory empty.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsd.evictor import pagemap
from wsd.guest.process import GuestProcess
from wsd.testing.hammer import STEEP_4K
from wsd.testing.supervisor import Supervisor

VM_ID = "crashy"
# How long the first kill may wait for the first eviction (see crash_soak).
FIRST_EVICTION_TIMEOUT = 180.0

CONFIG = """\
[daemon]
socket = "{tmp}/wsd.sock"
control_socket = "{tmp}/control.sock"
interval_seconds = {interval}
state_dir = "{tmp}/state"
{mode}
[storage]
kind = "file"
root = "{tmp}/pages"

[evictor]
min_idle_cycles = 1
max_idle_cycles = 1
max_pages_per_window = 1024
batch_pages = 128
promotion_target_percent_per_minute = 0.0001
prefetch_pages = 8

[metrics]
enabled = false
"""


@dataclass
class SoakResult:
    kills: int
    seconds: float
    in_storage_at_kill: list[int]
    resumed: int
    guest_ops: int
    pages: int
    pages_verified_at_exit: int
    verify_errors: int
    unverified: int
    stored_after_stop: list[str]
    state_left_after_stop: list[str]
    punches_put_back: int = 0
    """Restarts that found a verified punch in flight in its parked pipes and put its
    pages back (wp-async; see wsd.evictor.held)."""
    pipes_given_back: int = 0
    """Verified-punch pipes the guest kept and gave back with its reattaches (no
    fd store; see wsd.vmm.kept)."""
    stale_copies: int = 0
    """Pages the page map listed that a restart found resident: their stored copies
    were discarded (a kill after a put, before its punch, or after a fetch)."""
    log_problems: list[str] = field(default_factory=list)
    """wsd's error and warning lines, each traceback cut to its end, at most 40: what
    a failed soak prints, since its log dies with the test's temporary directory
    (in the 7.3 VM, with the VM)."""


def log_problems(text: str, limit: int = 40) -> list[str]:
    """The lines of a wsd log that report an error or a warning, or start a traceback.

    A JSON line's ``exception`` (a whole traceback) is cut to its last three
    lines, where the failing call and the exception are, and goes after the
    line's other fields.
    """
    marks = ('"level": "error"', '"level": "warning"', "Traceback", "[error", "[warning")
    out = []
    for raw in text.splitlines():
        if not any(m in raw for m in marks):
            continue
        line = raw
        with contextlib.suppress(ValueError, AttributeError):
            fields = json.loads(raw)
            trace = str(fields.pop("exception", "")).strip().splitlines()
            line = json.dumps(fields) + ("  ...  " + " | ".join(trace[-3:]) if trace else "")
        out.append(line[:1000])
        if len(out) == limit:
            break
    return out


def evicted_in_map(state: Path, vm_id: str) -> int:
    """Pages the page map lists as evicted (some may have been fetched back since)."""
    vm = pagemap.load_vm(state, vm_id)
    return 0 if vm is None else sum(len(r.pages) for r in vm.regions)


def crash_soak(
    tmp: Path,
    *,
    kills: int,
    seconds: float | None = None,
    gap: tuple[float, float] = (0.3, 2.0),
    size: str = "32M",
    interval: float = 0.2,
    mode: str | None = None,
    ready_timeout: float = 120.0,
    reattach: bool = False,
) -> SoakResult:
    """Kill wsd ``kills`` times (and for at least ``seconds``); check the guest lost nothing.

    ``reattach``: no fd store (wsd runs without ``$NOTIFY_SOCKET``); the guest
    gives each new wsd its session back with a ``reattach`` hand-off.
    """
    cfg = tmp / "wsd.toml"
    mode_line = f'mode = "{mode}"\n' if mode else ""
    cfg.write_text(CONFIG.format(tmp=tmp, interval=interval, mode=mode_line))
    argv = [sys.executable, "-m", "wsd", "run", "--config", str(cfg)]
    sup = Supervisor(argv, tmp, notify=not reattach)
    log_path = tmp / "service.log"

    def resumed() -> int:
        text = log_path.read_text() if log_path.exists() else ""
        return text.count('"session resumed"') + text.count("session resumed ")

    def restarted() -> None:
        sup.start(ready_timeout)
        if reattach:
            # Ready once the guest has given the new wsd its session back.
            deadline = time.monotonic() + ready_timeout
            while resumed() < len(in_storage):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"no reattach within {ready_timeout:g} s; the guest's exit status "
                        f"{guest.proc.poll()}, its stderr: {guest.stderr()[-3000:]}"
                    )
                time.sleep(0.1)

    rng = random.Random()
    in_storage: list[int] = []
    try:
        sup.start(ready_timeout)
        deadline = time.monotonic() + ready_timeout
        while not (tmp / "wsd.sock").exists():  # without READY=1 to wait for
            if time.monotonic() > deadline:
                raise AssertionError(f"wsd not listening after {ready_timeout:g} s")
            time.sleep(0.1)
        guest = GuestProcess.start(
            [
                "--socket",
                str(tmp / "wsd.sock"),
                "--vm-id",
                VM_ID,
                "--size",
                size,
                *STEEP_4K,
                *(["--reattach"] if reattach else []),
            ],
            ready_timeout=300,
        )
        began = time.monotonic()
        try:
            time.sleep(gap[1])
            # The first kill waits until something was evicted: a guest that
            # keeps the CPUs busy (under TCG, always) can hold eviction off
            # for a while; killing before would test nothing.  Evicted pages stay in
            # storage across restarts until fetched, so later kills find some.
            deadline = time.monotonic() + FIRST_EVICTION_TIMEOUT
            while not evicted_in_map(tmp / "state", VM_ID):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"nothing evicted within {FIRST_EVICTION_TIMEOUT:g} s of the guest's start"
                    )
                time.sleep(0.2)
            while len(in_storage) < kills or time.monotonic() - began < (seconds or 0):
                time.sleep(rng.uniform(*gap))
                sup.kill()
                in_storage.append(evicted_in_map(tmp / "state", VM_ID))
                stored = sorted(sup.stored_names())
                # wp-async parks the pipes of its verified punches (held0...).
                held = [n for n in stored if n.startswith(f"wsd.{VM_ID}.held")]
                expected = [] if reattach else [f"wsd.{VM_ID}.mem0", f"wsd.{VM_ID}.uffd"]
                if [n for n in stored if n not in held] != expected or len(held) > 8:
                    raise AssertionError(f"fd store after a kill: {stored}")
                # As a kill in the middle of writing the snapshot would leave it.
                cut_short = tmp / "state" / f".{VM_ID}.pagemap.npz.{len(in_storage):08d}.tmp"
                cut_short.write_bytes(b"PK\x03\x04")
                restarted()
                if cut_short.exists():
                    raise AssertionError(f"{cut_short.name} left after the session came back")
            time.sleep(gap[1])
            if guest.proc.poll() is not None:
                raise AssertionError(f"the guest died: {guest.stderr()}")
            # The final check reads every page back: wsd must be serving.
            code = guest.stop(600)
            if code != 0:
                raise AssertionError(f"guest exit {code}: {guest.stderr()}")
            elapsed = time.monotonic() - began
        finally:
            guest.close()
        report = guest.report()
        if sup.stop() != 0:
            raise AssertionError("wsd did not stop cleanly")
        log_text = log_path.read_text()
        return SoakResult(
            kills=len(in_storage),
            seconds=elapsed,
            in_storage_at_kill=in_storage,
            resumed=resumed(),
            guest_ops=report["ops"],
            pages=report["pages"],
            pages_verified_at_exit=report["final_check_pages"],
            verify_errors=report["verify_errors"],
            unverified=report["unverified"],
            stored_after_stop=sup.stored_names(),
            # The VM's generation ceiling outlives its session, by design.
            state_left_after_stop=sorted(
                p.name
                for p in (tmp / "state").iterdir()
                if p.name.lstrip(".").startswith(VM_ID) and p.name != f"{VM_ID}.ceiling"
            ),
            punches_put_back=log_text.count("pages held across a punch"),
            pipes_given_back=report.get("pipes_given_back", 0),
            stale_copies=sum(int(n) for n in re.findall(r'stale_copies"?[:=]\s*(\d+)', log_text)),
            log_problems=log_problems(log_text),
        )
    finally:
        sup.close()


def check(r: SoakResult) -> None:
    """What every soak must show."""
    print(f"\ncrash soak: {r}")
    assert r.verify_errors == 0 and r.unverified == 0
    assert r.pages_verified_at_exit == r.pages
    assert r.resumed == r.kills, r
    assert sum(1 for n in r.in_storage_at_kill if n > 0) >= r.kills // 2, r.in_storage_at_kill
    assert r.stored_after_stop == [] and r.state_left_after_stop == [], r
