"""What ``wsd attach`` does (:mod:`.cli` has its options): adopt the VMM's RAM,
hand it to wsd, and hold the session until the VMM exits or we are stopped."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path

from wsd.cmdline import Exit, Failures, attempt, socket_path
from wsd.vmm.client import HandoffRefused

from .adopt import Attached, attach
from .discover import NotAttachable

__all__ = ["attach_and_hold"]

RETRY_SECONDS = 1.0


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


_FAILURES: Failures = (
    (NotAttachable, 1),
    (HandoffRefused, 1),
    ((FileNotFoundError, ConnectionRefusedError), 2),
)


def attach_and_hold(args: argparse.Namespace) -> int:
    """Adopt the VMM's RAM, then hold the session in the foreground; the exit status."""
    vm_id = args.vm_id or f"qemu-{args.pid}"

    def adopt() -> tuple[Path, Attached]:
        path = socket_path(args, "socket")
        return path, attach(args.pid, path, vm_id, memfd_name=args.memfd_name)

    try:
        adopted = attempt("wsd attach", adopt, _FAILURES)
    except KeyboardInterrupt:
        print("wsd attach: interrupted", file=sys.stderr)
        return 130
    if isinstance(adopted, Exit):
        return adopted.code
    path, done = adopted
    ram = done.ram
    banner = (
        f"{vm_id}: wsd tracks {ram.size / (1 << 20):.1f} MiB of pid {args.pid} ({done.name}) in "
        f"{len(ram.regions)} region(s), mode {done.reply.get('mode')}; userfaultfd is fd "
        f"{done.uffd_in_vmm} in the VMM"
    )
    return _hold(done, path, banner, reattach=not args.no_reattach, detach_wait=args.detach_wait)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _hold(done: Attached, path: Path, banner: str, *, reattach: bool, detach_wait: float) -> int:
    """Hold the session's connection until the VMM exits or we are stopped.

    When wsd closes it without being asked, wsd died (or stopped): as a VMM
    must, give the session to the next wsd (``reattach``), retrying every
    second, until one takes it or says there is nothing to take.  Stopped,
    close the session and, once wsd has let go of the RAM, the uffd that was
    injected into the VMM (``detach_wait``).
    """
    pid, vm_id = done.sources.pid, done.message["vm_id"]
    try:
        signal.signal(signal.SIGTERM, _raise_exit)
        pidfd = os.pidfd_open(pid)
    except BaseException:
        done.conn.close()
        raise
    try:
        # Printed once ^C and SIGTERM end the session cleanly.
        print(banner, flush=True)
        while True:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(done.conn.fileno(), select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if pidfd in ready:
                print(f"{vm_id}: pid {pid} exited; session over", flush=True)
                return 0
            try:
                if done.kept.receive(done.conn):
                    continue
            except OSError:
                pass  # reset: wsd died
            if not reattach:
                _say(f"wsd attach: wsd closed the session of {vm_id}")
                return 1
            _say(f"wsd attach: wsd closed the session of {vm_id}: reattaching to the next wsd")
            code = _reattach(done, path, pidfd)
            if code is not None:
                return code
            _say(f"{vm_id}: reattached")
    except (KeyboardInterrupt, SystemExit) as e:
        _say(f"{vm_id}: detached; wsd puts the evicted pages back")
        done.conn.close()
        if detach_wait > 0:
            try:
                _say(f"{vm_id}: {done.close_uffd_once_released(detach_wait)}")
            except KeyboardInterrupt:
                _say(f"{vm_id}: the userfaultfd stays open in the VMM as fd {done.uffd_in_vmm}")
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    finally:
        os.close(pidfd)
        done.conn.close()
        done.kept.close()


def _reattach(done: Attached, path: Path, pidfd: int) -> int | None:
    """Retry until a wsd takes the session back (None) or it is over (an exit code)."""
    vm_id = done.message["vm_id"]
    while True:
        if select.select([pidfd], [], [], RETRY_SECONDS)[0]:
            print(f"{vm_id}: pid {done.sources.pid} exited; session over", flush=True)
            return 0
        try:
            done.reattach(path)
            return None
        except HandoffRefused as e:
            if e.code == "duplicate_vm":
                # A wsd under systemd resumed it from its fd store already.
                _say(f"{vm_id}: wsd resumed the session by itself (systemd fd store)")
                return 0
            if e.code in ("no_session", "unsupported"):
                _say(f"wsd attach: {e}")
                return 1
            _say(f"wsd attach: reattach refused, retrying: {e}")
        except (OSError, NotAttachable) as e:
            if not os.path.exists(f"/proc/{done.sources.pid}"):
                continue  # the pidfd says so at the next turn
            if not isinstance(e, FileNotFoundError | ConnectionRefusedError):
                _say(f"wsd attach: reattach failed, retrying: {e}")
