"""Pipes a VMM keeps for wsd without an fd store: ``keep`` lines on the session's connection."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
from collections.abc import Iterator

import pytest

from wsd.evictor.held import Parking, ParkingFailed
from wsd.kernel import KernelError
from wsd.kernel.pins import _Pipe
from wsd.vmm.client import read_reply
from wsd.vmm.kept import KeptPipes, VmmKeeper, keep_line
from wsd.vmm.protocol import PROTOCOL_VERSION


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """wsd's end and the VMM's end of a session's connection."""
    wsd_end, vmm_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with wsd_end, vmm_end:
        yield wsd_end, vmm_end


@pytest.fixture
def pipes() -> Iterator[list[_Pipe]]:
    made = [_Pipe() for _ in range(3)]
    yield made
    for pipe in made:
        pipe.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_pipe(a: int, b: int) -> bool:
    return os.fstat(a).st_ino == os.fstat(b).st_ino


def kept_until_hang_up(vmm_end: socket.socket) -> KeptPipes:
    kept = KeptPipes()
    while kept.receive(vmm_end):
        pass
    return kept


def test_the_vmm_keeps_every_pipe_sent_in_order_past_wsd_hanging_up(connection, pipes) -> None:
    wsd_end, vmm_end = connection
    keeper = VmmKeeper("vm-1", wsd_end)
    keeper.keep([pipes[0].r], 0)
    keeper.keep([pipes[1].r, pipes[2].r], 1)
    keeper.close()
    wsd_end.close()
    kept = kept_until_hang_up(vmm_end)
    try:
        assert len(kept.parts) == 3
        assert all(same_pipe(p.r, fd) for p, fd in zip(pipes, kept.parts, strict=True))
    finally:
        kept.close()


def test_the_reply_is_read_to_its_newline_and_the_pipes_after_it_are_kept(
    connection, pipes
) -> None:
    """Both arrive before the VMM reads: a read past the reply's newline would
    close the pipes that came with the next line."""
    wsd_end, vmm_end = connection
    wsd_end.sendall(json.dumps({"type": "accepted", "version": 1}).encode() + b"\n")
    keeper = VmmKeeper("vm-1", wsd_end)
    keeper.keep([pipes[0].r], 0)
    keeper.close()
    wsd_end.close()
    assert read_reply(vmm_end) == {"type": "accepted", "version": 1}
    kept = kept_until_hang_up(vmm_end)
    try:
        assert len(kept.parts) == 1 and same_pipe(pipes[0].r, kept.parts[0])
    finally:
        kept.close()


def test_pipes_on_a_line_out_of_order_or_not_a_keep_line_are_closed(connection, pipes) -> None:
    wsd_end, vmm_end = connection
    before = open_fds()
    socket.send_fds(wsd_end, [keep_line("vm-1", 5)], [pipes[0].r])
    socket.send_fds(wsd_end, [b'{"type": "accepted"}\n'], [pipes[1].r])
    socket.send_fds(wsd_end, [b"no json\n"], [pipes[2].r])
    wsd_end.close()
    kept = kept_until_hang_up(vmm_end)
    assert kept.parts == []
    assert open_fds() == before - 1  # wsd's end


def test_a_reattach_gives_the_pipes_back_after_the_other_fds(connection, pipes) -> None:
    wsd_end, vmm_end = connection
    keeper = VmmKeeper("vm-1", wsd_end)
    keeper.keep([pipes[0].r, pipes[1].r], 0)
    keeper.close()
    wsd_end.close()
    kept = kept_until_hang_up(vmm_end)
    try:
        message, fds = kept.reattach({"type": "reattach"}, [10, 11])
        assert message == {"type": "reattach", "held": [2, 3]}
        assert fds == [10, 11, *kept.parts]
        nothing_kept = KeptPipes().reattach({"type": "reattach"}, [10, 11])
        assert nothing_kept == ({"type": "reattach"}, [10, 11])
    finally:
        kept.close()


def test_keep_lines_speak_the_handoff_protocol_version() -> None:
    line = json.loads(keep_line("vm:1", 3))
    assert line == {"type": "keep", "version": PROTOCOL_VERSION, "vm_id": "vm:1", "first": 3}


def test_parking_sends_the_vmm_only_the_pipes_it_does_not_have(connection, monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    wsd_end, vmm_end = connection
    parking = Parking("vm-1")
    assert not parking.available
    parking.vmm = VmmKeeper("vm-1", wsd_end)
    assert parking.available and not parking.systemd
    try:
        parking.pool.pipes.append(_Pipe())
        parking.park()
        parking.park()  # nothing new
        parking.pool.pipes.append(_Pipe())
        parking.park()
        assert parking.parked == 2
    finally:
        parking.close()
    wsd_end.close()
    kept = kept_until_hang_up(vmm_end)
    try:
        assert len(kept.parts) == 2
    finally:
        kept.close()


def test_pipes_the_vmm_cannot_be_sent_stop_the_punch(connection, monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    wsd_end, _ = connection
    keeper = VmmKeeper("vm-1", wsd_end)
    keeper.close()
    with pytest.raises(KernelError) as e:
        keeper.keep([0], 0)
    assert e.value.errno == errno.EPIPE
    parking = Parking("vm-1", vmm=VmmKeeper("vm-1", wsd_end))
    parking.pool.pipes.append(_Pipe())
    try:
        wsd_end.shutdown(socket.SHUT_WR)  # as a connection gone bad would refuse
        with pytest.raises(ParkingFailed, match=r"the VMM could not be sent pipes 0\+"):
            parking.park()
        assert parking.parked == 0
    finally:
        parking.close()


def test_a_vmm_whose_queue_is_full_gets_no_part_of_a_keep_line_and_later_all_of_it(
    connection, monkeypatch
) -> None:
    """wsd never waits for the VMM: a full queue fails the send (and the punch)
    whole, and the next try, once the VMM has read, sends the same pipes."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    wsd_end, vmm_end = connection
    wsd_end.setblocking(False)
    noise = b'{"type": "noise"}\n'
    with contextlib.suppress(BlockingIOError):
        while True:
            wsd_end.send(noise)
    parking = Parking("vm-1", vmm=VmmKeeper("vm-1", wsd_end))
    parking.pool.pipes.append(_Pipe())
    inode = os.fstat(parking.pool.read_ends[0]).st_ino
    kept = KeptPipes()
    try:
        with pytest.raises(ParkingFailed, match="EAGAIN"):
            parking.park()
        assert parking.parked == 0
        while select.select([vmm_end], [], [], 0)[0]:
            kept.receive(vmm_end)
        assert not kept.parts
        parking.park()
        assert parking.parked == 1
        parking.close()
        wsd_end.close()
        while kept.receive(vmm_end):
            pass
        assert [os.fstat(fd).st_ino for fd in kept.parts] == [inode]
    finally:
        parking.close()
        kept.close()
