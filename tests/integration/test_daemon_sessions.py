"""The daemon on the host kernel: hand-offs over the socket become tracked sessions."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import mmap
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from wsd import daemon as daemon_module
from wsd import recovery, resume
from wsd.daemon import Daemon, Settings
from wsd.evictor import pagemap
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultResult
from wsd.kernel import HeldPages, KernelError, Userfaultfd, memfd_create
from wsd.storage import PageNamespace, StorageError
from wsd.testing.life_events import evicting_settings, uffd_vmflags
from wsd.testing.puppet_vmm import PuppetError, PuppetVMM
from wsd.testing.running import running_daemon
from wsd.testing.supervisor import Supervisor
from wsd.tracker.session import VmTracker
from wsd.vmm.client import HandoffRefused, hand_off

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
INTERVAL = 0.2


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(Settings(socket=tmp_path / "wsd.sock", interval=INTERVAL)) as d:
        yield d


async def spawn(d: Daemon, vm_id: str, **kw: object) -> PuppetVMM:
    return await asyncio.to_thread(
        functools.partial(PuppetVMM.spawn, 16 << 20, handoff=d.settings.socket, vm_id=vm_id, **kw)  # type: ignore[arg-type]
    )


async def refused_as_duplicate(d: Daemon, vm_id: str) -> None:
    dup = await spawn(d, vm_id)
    try:
        assert dup.handoff_reply and dup.handoff_reply["error"]["code"] == "duplicate_vm"
    finally:
        dup.close()


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mmap(size: int, prot: int, fd: int, offset: int = 0) -> int:
    """A MAP_SHARED mapping of ``fd``, as a VMM maps guest memory; its address."""
    addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(addr)


async def test_two_vms_tracked_and_torn_down(daemon: Daemon) -> None:
    a = await spawn(daemon, "vm-a")
    b = await spawn(daemon, "vm-b")
    try:
        assert a.handoff_reply and a.handoff_reply["type"] == "accepted"
        assert a.handoff_reply["mode"] == str(daemon.decision.mode)
        assert set(daemon.sessions) == {"vm-a", "vm-b"}
        hot = list(range(0, a.npages, 10))
        session = daemon.sessions["vm-a"]
        start = session.tracker.cycles
        await until(lambda: session.tracker.cycles > start)  # a fresh interval starts
        begin = session.tracker.cycles
        await asyncio.to_thread(a.call, "write", pages=hot, version=1)
        await until(lambda: session.tracker.cycles >= begin + 2)
        # The writes may straddle a cycle boundary; every page written since
        # `begin` is younger than the cycles since then, and no other page is.
        ages = session.tracker.regions[0].state.ages
        assert np.flatnonzero(ages < session.tracker.cycles - begin).tolist() == hot
        timings = session.timings
        assert timings.scan.count >= 2 and timings.cycle.count >= 2
        assert 0 < timings.scan.sum <= timings.cycle.sum
        await refused_as_duplicate(daemon, "vm-a")
    finally:
        a.close()
    await until(lambda: "vm-a" not in daemon.sessions)
    assert "vm-b" in daemon.sessions
    b.close()
    await until(lambda: not daemon.sessions)


async def test_first_touch_of_unpopulated_memory_is_zero_filled(daemon: Daemon) -> None:
    p = await spawn(daemon, "vm-empty", fill=False)
    try:
        await asyncio.to_thread(p.call, "write", pages=[0, 1, 2], version=4)
        assert await asyncio.to_thread(p.call, "read", pages=[0, 1, 2]) == [4, 4, 4]
        session = daemon.sessions["vm-empty"]
        assert session.ctx.stats.zero_fills == 3
        latency = session.faults.latency[("", FaultResult.ZERO)]
        assert latency.count == 3 and latency.sum > 0
    finally:
        p.close()


async def test_preregistered_uffd_is_verified_and_tracked(daemon: Daemon) -> None:
    p = await spawn(daemon, "vm-pre", preregister="auto")
    try:
        assert p.handoff_reply and p.handoff_reply["type"] == "accepted", p.handoff_reply
        session = daemon.sessions["vm-pre"]
        begin = session.tracker.cycles
        await until(lambda: session.tracker.cycles > begin)
        begin = session.tracker.cycles
        await asyncio.to_thread(p.call, "write", pages=[3, 4], version=1)
        await until(lambda: session.tracker.cycles >= begin + 2)
        ages = session.tracker.regions[0].state.ages
        assert np.flatnonzero(ages < session.tracker.cycles - begin).tolist() == [3, 4]
    finally:
        p.close()


async def test_preregistered_without_the_needed_mode_is_refused(daemon: Daemon) -> None:
    p = await spawn(daemon, "vm-bad", preregister="MISSING")
    try:
        err = (p.handoff_reply or {})["error"]
        assert err["code"] == "unsupported" and err["field"] == "uffd.register_mode"
        assert "registered without" in err["message"]
    finally:
        p.close()
    assert "vm-bad" not in daemon.sessions


async def test_vmm_killed_mid_session_is_torn_down(daemon: Daemon) -> None:
    p = await spawn(daemon, "vm-kill")
    other = await spawn(daemon, "vm-stays")
    try:
        session = daemon.sessions["vm-kill"]
        p.proc.kill()
        await until(lambda: "vm-kill" not in daemon.sessions)
        assert session.closed
        # Closed after the released uffd was read for a moment (LINGER_SECONDS).
        await until(lambda: session.tracker.uffd.fd == -1)
        assert "vm-stays" in daemon.sessions
        cycles = daemon.sessions["vm-stays"].tracker.cycles
        await until(lambda: daemon.sessions["vm-stays"].tracker.cycles > cycles)
    finally:
        p.close()
        other.close()


async def test_region_not_mapped_in_the_vmm_is_refused(daemon: Daemon) -> None:
    memfd = memfd_create("unmapped", size=1 << 20)
    try:
        with Userfaultfd.create() as uffd:
            msg = {
                "type": "handoff",
                "version": 1,
                "vm_id": "vm-hole",
                "vmm_pid": os.getpid(),
                "regions": [
                    {
                        "guest_phys_addr": 0,
                        "host_virt_addr": 0x10000000000,
                        "size": 1 << 20,
                        "fd_index": 1,
                    }
                ],
            }
            with pytest.raises(HandoffRefused) as exc:
                await asyncio.to_thread(hand_off, daemon.settings.socket, msg, [uffd.fd, memfd])
        assert exc.value.code == "bad_region" and exc.value.field == "regions[0]"
        assert f"pid {os.getpid()} does not map its memfd" in str(exc.value)
        assert "nothing is mapped at 0x10000000000" in str(exc.value)
    finally:
        os.close(memfd)
    assert "vm-hole" not in daemon.sessions


async def test_a_region_mapped_from_another_memfd_is_refused_naming_it(daemon: Daemon) -> None:
    """Tracking one memfd's mapping while punching another's pages would lose them."""
    mapped, other = memfd_create("mapped", size=1 << 20), memfd_create("other", size=1 << 20)
    base = _mmap(1 << 20, mmap.PROT_READ | mmap.PROT_WRITE, mapped)
    region = {"guest_phys_addr": 0, "host_virt_addr": base, "size": 1 << 20, "fd_index": 1}
    msg = {"type": "handoff", "version": 1, "vm_id": "vm-mixed", "vmm_pid": os.getpid()}
    msg["regions"] = [region]
    try:
        with Userfaultfd.create() as uffd, pytest.raises(HandoffRefused) as exc:
            await asyncio.to_thread(hand_off, daemon.settings.socket, msg, [uffd.fd, other])
        assert exc.value.code == "bad_region" and exc.value.field == "regions[0]"
        assert f"{base:#x} maps another file (/memfd:mapped (deleted))" in str(exc.value)
    finally:
        _libc.munmap(base, 1 << 20)
        os.close(mapped)
        os.close(other)
    assert "vm-mixed" not in daemon.sessions


async def test_a_refused_hand_off_leaves_no_registration_behind(daemon: Daemon) -> None:
    """Region 0 is registered before region 1's UFFDIO_REGISTER fails (EPERM: the
    VMM maps it read-only, so its mapping may never write).  The VMM keeps its
    copy of the uffd, with the UNMAP events wsd negotiated: had wsd left region 0
    registered, the VMM's munmap of it would wait for good on an event nobody
    reads."""
    size = 1 << 20
    memfd = memfd_create("guest", size=2 * size)
    read_only = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY)
    base = _mmap(size, mmap.PROT_READ | mmap.PROT_WRITE, memfd)
    second = _mmap(size, mmap.PROT_READ, read_only, offset=size)
    region = {"guest_phys_addr": 0, "host_virt_addr": base, "size": size, "fd_index": 1}
    read_only_region = {"guest_phys_addr": size, "host_virt_addr": second, "size": size}
    read_only_region |= {"fd_index": 1, "offset": size}
    msg = {
        "type": "handoff",
        "version": 1,
        "vm_id": "vm-half",
        "vmm_pid": os.getpid(),
        "regions": [region, read_only_region],
    }
    try:
        with Userfaultfd.create() as uffd:
            with pytest.raises(HandoffRefused) as exc:
                await asyncio.to_thread(hand_off, daemon.settings.socket, msg, [uffd.fd, memfd])
            assert exc.value.code == "bad_region" and "regions[1]" in str(exc.value)
            assert "UFFDIO_REGISTER" in str(exc.value)
            unmap = asyncio.ensure_future(asyncio.to_thread(_libc.munmap, base, size))
            done, _ = await asyncio.wait([unmap], timeout=5)
            if not done:
                while not unmap.done():  # let the munmap finish, then fail
                    uffd.read_messages()
                    await asyncio.sleep(0.01)
            assert done, "munmap waited on an UNMAP event: region 0 is still registered"
            assert unmap.result() == 0
    finally:
        _libc.munmap(second, size)
        os.close(read_only)
        os.close(memfd)
    assert "vm-half" not in daemon.sessions


async def test_a_uffd_made_by_another_process_is_refused_naming_it(daemon: Daemon) -> None:
    """A child the VMM forks after mapping guest memory has it at the same
    addresses, so the uffd the child makes registers there without an error, but
    in the child.  Had wsd taken it, the VMM's accesses would go untrapped and its
    first touch of an evicted page would read zeros."""
    size = 1 << 20
    memfd = memfd_create("guest", size=size)
    base = _mmap(size, mmap.PROT_READ | mmap.PROT_WRITE, memfd)
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # makes a uffd, hands it over, and lives until told to go
        try:
            socket.send_fds(theirs, [b"u"], [Userfaultfd.create().fd])
            theirs.recv(1)
        finally:
            os._exit(0)
    try:
        _, (uffd_fd,), _, _ = socket.recv_fds(ours, 1, 1)
        region = {"guest_phys_addr": 0, "host_virt_addr": base, "size": size, "fd_index": 1}
        msg = {"type": "handoff", "version": 1, "vm_id": "vm-forked", "vmm_pid": os.getpid()}
        with pytest.raises(HandoffRefused) as exc:
            await asyncio.to_thread(
                hand_off, daemon.settings.socket, msg | {"regions": [region]}, [uffd_fd, memfd]
            )
        assert exc.value.code == "bad_fds", exc.value
        assert f"register pid {os.getpid()}'s mapping at {base:#x}" in str(exc.value)
        assert "another process's address space" in str(exc.value)
        assert uffd_vmflags(child, base, size) == set(), "wsd left the child's mapping registered"
        os.close(uffd_fd)
    finally:
        ours.send(b"x")
        os.waitpid(child, 0)
        ours.close()
        theirs.close()
        _libc.munmap(base, size)
        os.close(memfd)
    assert "vm-forked" not in daemon.sessions


def _handoff(vm_id: str, *regions: tuple[int, int, int]) -> dict[str, Any]:
    """A hand-off of 1 MiB regions (address, fd_index, offset) of this process."""
    return {
        "type": "handoff",
        "version": 1,
        "vm_id": vm_id,
        "vmm_pid": os.getpid(),
        "regions": [
            {"guest_phys_addr": k << 20, "host_virt_addr": a, "size": 1 << 20}
            | {"fd_index": fd, "offset": offset}
            for k, (a, fd, offset) in enumerate(regions)
        ],
    }


async def test_guest_memory_or_a_uffd_another_session_holds_is_refused_naming_it(
    daemon: Daemon,
) -> None:
    """Two regions on one memfd range would each be evicted by their own mapping's
    accesses, and the other's next touch of a punched page would read zeros; two
    sessions on one uffd would each drop the other's fault messages."""
    size = 1 << 20
    memfd = memfd_create("guest", size=2 * size)
    again = os.dup(memfd)
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    first, second, third = (
        _mmap(size, rw, memfd),
        _mmap(size, rw, memfd),
        _mmap(size, rw, memfd, size),
    )
    sock = None
    try:
        with Userfaultfd.create() as uffd, Userfaultfd.create() as other:

            async def refused(msg: dict[str, Any], fds: list[int]) -> str:
                with pytest.raises(HandoffRefused) as exc:
                    await asyncio.to_thread(hand_off, daemon.settings.socket, msg, fds)
                assert exc.value.code == "bad_fds", exc.value
                return str(exc.value)

            # One hand-off, one range of a memfd sent under two fd_indexes.
            message = await refused(
                _handoff("vm-twice", (first, 1, 0), (second, 2, 0)), [uffd.fd, memfd, again]
            )
            assert "regions[1] and regions[0] are backed by the same range of one memfd" in message
            reply, sock = await asyncio.to_thread(
                hand_off, daemon.settings.socket, _handoff("vm-1", (first, 1, 0)), [uffd.fd, memfd]
            )
            assert reply["type"] == "accepted"
            message = await refused(_handoff("vm-2", (second, 1, 0)), [other.fd, again])
            assert "regions[0]: its memfd" in message
            assert "is guest memory of VM 'vm-1' too (its regions[0])" in message
            message = await refused(_handoff("vm-3", (third, 1, size)), [uffd.fd, memfd])
            assert "the uffd is the one VM 'vm-1''s session reads" in message
            assert set(daemon.sessions) == {"vm-1"}
            # Another range of the same memfd is another VM's memory.
            reply, sock2 = await asyncio.to_thread(
                hand_off,
                daemon.settings.socket,
                _handoff("vm-4", (third, 1, size)),
                [other.fd, memfd],
            )
            sock2.close()
            assert reply["type"] == "accepted"
            sock.close()
            await until(lambda: not daemon.sessions and not daemon.draining)
    finally:
        if sock is not None:
            sock.close()
        for base in (first, second, third):  # may wait on the daemon: not on its loop
            await asyncio.to_thread(_libc.munmap, base, size)
        os.close(again)
        os.close(memfd)


async def test_a_hand_off_over_an_unreadable_generation_ceiling_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """Starting the VM's pages at 0 would let its earlier records replay (pagemap)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "vm-c.ceiling").write_text("garbage\n")
    settings = Settings(socket=tmp_path / "wsd.sock", interval=INTERVAL, state_dir=state)
    async with running_daemon(settings) as d:
        p = await spawn(d, "vm-c")
        try:
            err = (p.handoff_reply or {})["error"]
            assert err["code"] == "internal", err
            assert f"{state}/vm-c.ceiling: not a generation ceiling: 'garbage\\n'" in err["message"]
            assert "vm-c" not in d.sessions
            (state / "vm-c.ceiling").write_text("70000\n")
            again = await spawn(d, "vm-c")
            try:
                assert again.handoff_reply and again.handoff_reply["type"] == "accepted"
                tracker = d.sessions["vm-c"].tracker
                assert tracker.generation_ceiling == 70000
                assert (tracker.regions[0].state.generations == 69999).all()
            finally:
                again.close()
        finally:
            p.close()


class HeldDrain:
    """The daemon's store holds every ``get_many`` (so every drain) until released."""

    def __init__(self, d: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = asyncio.Event()
        assert d.store is not None
        get_many = d.store.get_many

        async def held(*args: Any, **kw: Any) -> Any:
            await self.release.wait()
            return await get_many(*args, **kw)

        monkeypatch.setattr(d.store, "get_many", held)


async def evicted(d: Daemon, vm_id: str, pages: int) -> None:
    state = d.sessions[vm_id].tracker.regions[0].state
    await until(lambda: state.evicted_pages >= pages, timeout=30)


async def test_a_vm_handed_off_again_while_its_last_session_drains_waits_for_the_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both would share the VM's storage namespaces and state files (keyed by vm_id).
    Without the wait, the new session's evictions overwrote the pages the old one
    was bringing back (its drain: "stale or unexpected generation"), and the old
    VMM's read of them never finished."""
    settings = evicting_settings(tmp_path, INTERVAL)
    async with running_daemon(settings) as d:
        first = await spawn(d, "vm-again")
        second = None
        try:
            await evicted(d, "vm-again", 64)
            drain = HeldDrain(d, monkeypatch)
            await asyncio.to_thread(first.call, "hang_up")
            await until(lambda: "vm-again" in d.draining)
            starting = asyncio.ensure_future(spawn(d, "vm-again"))
            await asyncio.sleep(1.0)
            assert not starting.done(), "a new session started while the last one drained"
            drain.release.set()
            second = await starting
            assert second.handoff_reply and second.handoff_reply["type"] == "accepted"
            assert "vm-again" not in d.draining
            record = recovery.load(settings.state_dir, "vm-again")  # type: ignore[arg-type]
            assert record.vmm_pid == second.pid
            await evicted(d, "vm-again", 64)
            versions = await asyncio.to_thread(
                second.call, "read", pages=list(range(second.npages))
            )
            assert versions == [0] * second.npages
            versions = await asyncio.to_thread(first.call, "read", pages=list(range(first.npages)))
            assert versions == [0] * first.npages
        finally:
            first.close()
            if second is not None:
                second.close()


async def test_a_vm_handed_off_again_is_refused_when_its_last_session_drains_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "LAST_SESSION_WAIT_SECONDS", 0.5)
    async with running_daemon(evicting_settings(tmp_path, INTERVAL)) as d:
        first = await spawn(d, "vm-slow")
        try:
            await evicted(d, "vm-slow", 64)
            drain = HeldDrain(d, monkeypatch)
            await asyncio.to_thread(first.call, "hang_up")
            await until(lambda: "vm-slow" in d.draining)
            refused = await spawn(d, "vm-slow")
            refused.close()
            err = (refused.handoff_reply or {})["error"]
            assert err["code"] == "duplicate_vm", err
            assert (
                "its last session ended and is still bringing its evicted pages back"
                in (err["message"])
            )
            drain.release.set()
            await until(lambda: "vm-slow" not in d.draining)
            again = await spawn(d, "vm-slow")
            again.close()
            assert again.handoff_reply and again.handoff_reply["type"] == "accepted"
        finally:
            first.close()


def _unreadable(*args: object, **kwargs: object) -> None:
    raise KernelError(errno.EIO, "tee", detail="injected")


@contextlib.asynccontextmanager
async def parked_after_a_failed_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm_id: str, *, held_back: bool = False
) -> AsyncIterator[tuple[Daemon, Supervisor, PuppetVMM]]:
    """A daemon under a test fd store, and a puppet whose session ended with
    pages the drain could not bring back (the tier down): it stays parked.

    ``held_back``: the tier works, but the last verified punches could not read
    their pipes back, so their pages are held in the pipes alone (wp-async)."""
    deadlines = {"fetch_deadline_seconds": 1.0, "tier_call_deadline_seconds": 0.5}
    settings = evicting_settings(tmp_path, INTERVAL, **deadlines)
    assert settings.state_dir is not None
    sup = Supervisor([], tmp_path)  # only its notify socket and fd store
    monkeypatch.setenv("NOTIFY_SOCKET", str(sup.notify_path))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(sup.close)
        d = await stack.enter_async_context(running_daemon(settings))
        assert d.store is not None
        with monkeypatch.context() as m:
            if held_back:
                # From the first verified punch on, which no other can follow.
                m.setattr(HeldPages, "read_into", _unreadable)
                m.setattr(Evictor, "put_back_held", lambda self: None)  # no re-read either
            vmm = await spawn(d, vm_id)
            stack.callback(vmm.close)
            await evicted(d, vm_id, 64)
            if held_back:
                assert d.sessions[vm_id].ctx.stats.held_back_pages >= 64
            else:

                async def failing(*args: Any, **kw: Any) -> Any:
                    raise StorageError("the tier is down (test)", backend="file")

                m.setattr(d.store, "get_many", failing)
            await asyncio.to_thread(vmm.call, "hang_up")
            await until(lambda: vm_id not in d.sessions)  # draining now, or done already
            await until(lambda: vm_id not in d.draining, timeout=30)
        assert recovery.load(settings.state_dir, vm_id).vmm_pid == vmm.pid
        listed = pagemap.load_vm(settings.state_dir, vm_id)
        assert listed is not None and sum(len(r.pages) for r in listed.regions) >= 64
        # wp-async: the pipes of its verified punches stay parked with it.
        sup.kill()  # no process: reads what was sent so far
        assert f"wsd.{vm_id}.held0" in sup.stored_names()
        yield d, sup, vmm


async def test_a_vm_parked_with_pages_in_storage_is_handed_off_anew_only_once_its_vmm_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose pages could not all come back stays parked.  While its VMM
    runs, only that VMM may take the pages back (a reattach); once it is gone, a
    new session of the VM unparks it, or its page map would be replayed over the
    new session's after a crash and the new memfd's holes served the old bytes."""
    async with parked_after_a_failed_drain(tmp_path, monkeypatch, "vm-parked") as (d, sup, first):
        state_dir = d.settings.state_dir
        assert state_dir is not None
        refused = await spawn(d, "vm-parked", fill=False)
        refused.close()
        err = (refused.handoff_reply or {})["error"]
        assert err["code"] == "duplicate_vm", err
        assert f"has a parked session of pid {first.pid}, which still runs" in err["message"]
        assert recovery.load(state_dir, "vm-parked").vmm_pid == first.pid
        first.close()
        second = await spawn(d, "vm-parked", fill=False)
        try:
            assert second.handoff_reply and second.handoff_reply["type"] == "accepted"
            # What a reattach after a crash would load: the new session's alone.
            record, vmap, _ = resume.load(state_dir, "vm-parked")
            assert record.vmm_pid == second.pid
            assert vmap is None or not any(len(r.pages) for r in vmap.regions)
            # Left in the store, the old pipes would be doubled by the new
            # session's, and a restart would take the session for a broken one.
            sup.kill()
            assert not [n for n in sup.stored_names() if ".held" in n], sup.stored_names()
        finally:
            second.close()


async def test_a_vm_parked_with_pages_in_storage_is_reattached_by_its_vmm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM of a parked session reattaches to the same wsd: it gets every page
    back, and the fd store holds each of the session's fds once."""
    async with parked_after_a_failed_drain(tmp_path, monkeypatch, "vm-back") as (d, sup, vmm):
        with capture_logs() as logs:
            reply = await asyncio.to_thread(vmm.call, "reattach")
            assert reply["type"] == "accepted" and reply["evicted_pages"] >= 64, reply
            versions = await asyncio.to_thread(vmm.call, "read", pages=list(range(vmm.npages)))
        assert versions == [0] * vmm.npages
        assert not [e for e in logs if e["log_level"] == "error"], logs
        await evicted(d, "vm-back", 64)  # with verified punches: its pipes parked
        sup.kill()
        stored = sup.stored_names()
        assert "wsd.vm-back.held0" in stored and len(stored) == len(set(stored)), stored


async def test_a_reattach_whose_pages_the_storage_does_not_hold_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage has none of a parked session's evicted pages (here they were
    discarded; after a restart, most often because ``[storage]`` changed): the
    session is taken back, and one error line says why its faults on those
    pages will wait, where each fetch would only say "page not found"."""
    async with parked_after_a_failed_drain(tmp_path, monkeypatch, "vm-lost") as (d, _, vmm):
        assert d.store is not None
        await d.store.discard(PageNamespace("vm-lost", 0, 4096))
        with capture_logs() as logs:
            reply = await asyncio.to_thread(vmm.call, "reattach")
            assert reply["type"] == "accepted" and reply["evicted_pages"] >= 64, reply
            await until(lambda: any("holds none" in e["event"] for e in logs))
        [said] = [e for e in logs if "holds none" in e["event"]]
        assert said["log_level"] == "error" and said["vm_id"] == "vm-lost", said
        assert said["storage"] == d.store.name and said["evicted_pages"] == reply["evicted_pages"]
        assert "was [storage] changed" in said["event"]


async def test_pages_held_back_when_a_vm_parked_are_put_back_by_its_reattach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held back: punched, their final bytes (a raced write's among them) in the
    pipes alone.  The reattach to the same wsd puts them back from the pipes, as
    a restart would from the store, and takes the pipes out of the store."""
    async with parked_after_a_failed_drain(tmp_path, monkeypatch, "vm-held", held_back=True) as (
        d,
        sup,
        vmm,
    ):
        reply = await asyncio.to_thread(vmm.call, "reattach")
        # Every page the drain left was held back, and is resident again.
        assert reply["type"] == "accepted" and reply["evicted_pages"] == 0, reply
        versions = await asyncio.to_thread(vmm.call, "read", pages=list(range(vmm.npages)))
        assert versions == [0] * vmm.npages
        sup.kill()
        stored = sup.stored_names()
        assert len(stored) == len(set(stored)), stored
        assert not d._parked_pipes


async def test_a_fault_the_kernel_has_no_memory_for_is_served_again_later(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UFFDIO_ZEROPAGE says ENOMEM (a cgroup at its limit): the thread waits and
    its fault is served again, instead of being dropped and waiting forever."""
    vmm = await spawn(daemon, "vm-nomem", fill=False)
    try:
        zeropage = Userfaultfd.zeropage
        calls = 0

        def short_of_memory(self: Userfaultfd, *args: Any, **kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls <= 3:
                raise KernelError(errno.ENOMEM, "UFFDIO_ZEROPAGE", detail="injected")
            zeropage(self, *args, **kwargs)

        monkeypatch.setattr(Userfaultfd, "zeropage", short_of_memory)
        await asyncio.wait_for(asyncio.to_thread(vmm.call, "write", pages=[5], version=3), 10)
        assert await asyncio.to_thread(vmm.call, "read", pages=[5]) == [3]
        assert calls == 4
    finally:
        vmm.close()


class HeldStart:
    """VmTracker.start held in its worker thread until released; the trackers it made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.trackers: list[VmTracker] = []
        start = VmTracker.start

        def held(*args: object, **kw: object) -> VmTracker:
            assert threading.current_thread() is not threading.main_thread()
            self.entered.set()
            assert self.release.wait(30)
            tracker = start(*args, **kw)  # type: ignore[arg-type]
            self.trackers.append(tracker)
            return tracker

        monkeypatch.setattr(VmTracker, "start", held)


async def test_a_tracker_starts_off_the_loop_and_a_second_hand_off_of_its_vm_meanwhile_is_refused(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arming a guest walks all of its memory: other VMs' faults must not wait for it."""
    held = HeldStart(monkeypatch)
    first = asyncio.create_task(spawn(daemon, "vm-a"))
    try:
        assert await asyncio.to_thread(held.entered.wait, 30)
        assert "vm-a" not in daemon.sessions  # the loop runs while the start is held
        await refused_as_duplicate(daemon, "vm-a")
    finally:
        held.release.set()
        a = await first
    try:
        assert a.handoff_reply and a.handoff_reply["type"] == "accepted"
        assert daemon.sessions["vm-a"].tracker is held.trackers[0]
    finally:
        a.close()
    await until(lambda: not daemon.sessions)


async def test_a_hand_off_cut_short_by_a_stop_closes_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldStart(monkeypatch)
    closed: list[VmTracker] = []
    close = VmTracker.close

    def spy(self: VmTracker) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(VmTracker, "close", spy)
    state = tmp_path / "state"
    settings = Settings(socket=tmp_path / "wsd.sock", interval=INTERVAL, state_dir=state)
    async with running_daemon(settings) as d:
        vmm = asyncio.create_task(spawn(d, "vm-a"))
        assert await asyncio.to_thread(held.entered.wait, 30)
        d.stop()
        await asyncio.sleep(0.2)
        held.release.set()
    assert not d.sessions
    assert held.trackers and closed == held.trackers
    assert not recovery.session_path(state, "vm-a").exists()  # parked, then unparked
    # wsd closed the connection without a reply, and the puppet, failing, exits:
    # its munmap of guest memory does not wait on an UNMAP event, since wsd
    # unregistered what it had registered (VmTracker.abandon).
    try:
        with pytest.raises(PuppetError):
            await asyncio.wait_for(vmm, 30)
    finally:
        for pid in os.listdir("/proc"):  # only if it hangs all the same
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"wsd.testing.puppet_vmm" in cmdline and str(tmp_path).encode() in cmdline:
                    os.kill(int(pid), signal.SIGKILL)
