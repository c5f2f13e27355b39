"""The control socket: protocol, server, client, commands, status and its table.

The daemon and its sessions are namespaces; what they hold is real where it
matters: ``RegionState`` driven through cycles, ``EvictorStats``, ``VmPolicy``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wsd.access import AccessPolicy
from wsd.control import Command, ControlError, ErrorCode, Request
from wsd.control.client import ControlUnreachable, request
from wsd.control.commands import ControlCommands
from wsd.control.eviction import EvictionRequest
from wsd.control.protocol import MAX_LINE_BYTES, encode, parse_reply, parse_request
from wsd.control.render import format_bytes, format_duration, format_status
from wsd.control.server import ControlServer
from wsd.control.status import take_status
from wsd.daemon import _prepare
from wsd.evictor import EvictorConfig
from wsd.evictor.context import EvictorStats
from wsd.evictor.policy import VmPolicy
from wsd.priority import LoopPriority
from wsd.storage import StoreStats
from wsd.storage.page import OpCounters
from wsd.tracker.mode import TrackingMode
from wsd.tracker.session import TrackedRegion
from wsd.tracker.state import Granularity, RegionState
from wsd.vmm.protocol import Region

MiB = 1 << 20
PAGES = 256  # 1 MiB of 4 KiB pages

# -- protocol ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"version":1,"command":"status"}', Request(Command.STATUS)),
        (b'{"version":1,"command":"pause","vm_id":"a"}', Request(Command.PAUSE, "a")),
        (b'{"version":1,"command":"resume","vm_id":"b.1"}', Request(Command.RESUME, "b.1")),
        (b'{"version":1,"command":"evict","vm_id":"c"}', Request(Command.EVICT, "c")),
        (
            b'{"version":1,"command":"evict","vm_id":"c","max_bytes":4096}',
            Request(Command.EVICT, "c", 4096),
        ),
    ],
)
def test_requests_parse(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected
    assert parse_request(encode(expected.to_json()).rstrip(b"\n")) == expected


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        (b"{not json", ErrorCode.BAD_JSON, "the request is not valid JSON"),
        (b"[1]", ErrorCode.INVALID, "must be a JSON object"),
        (b'{"command":"status"}', ErrorCode.BAD_VERSION, "'version' is None; this wsd speaks"),
        (b'{"version":true,"command":"status"}', ErrorCode.BAD_VERSION, "'version' is True"),
        (
            b'{"version":1,"command":"stop"}',
            ErrorCode.UNKNOWN_COMMAND,
            "'command' is 'stop'; known commands: status, pause, resume, evict",
        ),
        (b'{"version":1,"command":"pause"}', ErrorCode.INVALID, "pause needs 'vm_id'"),
        (b'{"version":1,"command":"pause","vm_id":"a b"}', ErrorCode.INVALID, "got 'a b'"),
        (
            b'{"version":1,"command":"evict","vm_id":"a","max_bytes":0}',
            ErrorCode.INVALID,
            "'max_bytes' is 0; it must be a positive integer up to 2**63 - 1, or absent",
        ),
        (
            b'{"version":1,"command":"evict","vm_id":"a","max_bytes":"1M"}',
            ErrorCode.INVALID,
            "'max_bytes' is '1M'",
        ),
        (
            b'{"version":1,"command":"status","vm_id":"a"}',
            ErrorCode.INVALID,
            "status takes no 'vm_id'",
        ),
        (
            b'{"version":1,"command":"pause","vm_id":"a","max_bytes":1}',
            ErrorCode.INVALID,
            "pause takes no 'max_bytes'",
        ),
    ],
)
def test_bad_requests_are_named(line: bytes, code: ErrorCode, message: str) -> None:
    with pytest.raises(ControlError) as e:
        parse_request(line)
    assert e.value.code == code
    assert message in e.value.message


def test_replies_carry_results_or_errors() -> None:
    assert parse_reply(b'{"version":1,"ok":true,"result":{"a":1}}') == {"a": 1}
    with pytest.raises(ControlError, match="no VM 'x'") as e:
        parse_reply(encode(ControlError(ErrorCode.UNKNOWN_VM, "no VM 'x'").reply()))
    assert e.value.code == "unknown_vm"
    with pytest.raises(ControlError, match="not a control reply"):
        parse_reply(b'{"type":"accepted"}')


# -- a daemon made of namespaces ------------------------------------------------------


def tracked(npages: int = PAGES, hot_pages: int = 64, cycles: int = 20) -> TrackedRegion:
    """The first ``hot_pages`` hot every cycle, all resident; the last 32 then evicted."""
    state = RegionState(npages, Granularity.PAGE_4K, started_at=0.0)
    hot = np.zeros(npages, dtype=np.bool_)
    hot[:hot_pages] = True
    for c in range(cycles):
        state.observe(hot, np.ones(npages, dtype=np.bool_), now=float(c + 1))
    state.note_evicted(np.arange(npages - 32, npages))
    region = Region(
        guest_phys_addr=0, host_virt_addr=0x7F00_0000_0000, size=npages * 4096, fd_index=1
    )
    return TrackedRegion(region, -1, state)


class FakeEvictor:
    def __init__(self, ctx: SimpleNamespace, reasons: list[str | None]) -> None:
        self.ctx = ctx
        self.reasons = reasons
        self.prepares = 0
        self.repairs = 0
        self.idle_bytes = 3 * 4096
        self.asked: list[int | None] = []

    async def prepare(self) -> None:
        self.prepares += 1

    async def repair(self) -> None:
        self.repairs += 1

    async def prepare_idle(self, max_bytes: int | None = None) -> int:
        self.asked.append(max_bytes)
        return self.idle_bytes


def fake_session(
    vm_id: str,
    *,
    store: object = object(),
    reasons: Any = None,
    owner_uid: int | None = None,
    closed: bool = False,
) -> SimpleNamespace:
    regions = [tracked()]
    vm = VmPolicy(EvictorConfig(), started_at=0.0)
    vm.note_refaults(25.0, 3)
    ctx = SimpleNamespace(
        stats=EvictorStats(evicted_bytes=32 * 4096, fetched_bytes=4096),
        vm=vm,
        store=store,
        config=EvictorConfig(),
    )
    tracker = SimpleNamespace(mode=TrackingMode.WP_ASYNC, regions=regions, cycles=20)
    return SimpleNamespace(
        vm_id=vm_id,
        tracker=tracker,
        ctx=ctx,
        evictor=FakeEvictor(ctx, [None] if reasons is None else reasons),
        last_hot=[np.packbits(t.state.ages == 0) for t in regions],
        paused=False,
        eviction=None,
        owner_uid=owner_uid,
        closed=closed,
    )


def fake_daemon(*sessions: SimpleNamespace) -> SimpleNamespace:
    counters = OpCounters(puts=3, failures=1)
    stats = StoreStats("file", 32, 32 * 4096, 32 * 4096, None, counters)
    return SimpleNamespace(
        clock=lambda: 30.0,
        started_at=5.0,
        settings=SimpleNamespace(
            config_path=Path("/etc/wsd/wsd.toml"),
            interval=1.0,
            socket=Path("/run/wsd/wsd.sock"),
            control_socket=Path("/run/wsd/control.sock"),
        ),
        metrics_state=SimpleNamespace(store_stats=stats, store_stats_at=29.5),
        store=SimpleNamespace(name="file"),
        decision=SimpleNamespace(mode=TrackingMode.WP_ASYNC, reason="no RWP", limitations=()),
        fault_service=LoopPriority(-10, 1, 0, 0),
        kernel=SimpleNamespace(release="6.18.0-test"),
        sessions={s.vm_id: s for s in sessions if not s.closed},
        draining={s.vm_id: s for s in sessions if s.closed},
    )


# -- status ------------------------------------------------------------------------


def test_status_reports_each_vm_from_its_live_state() -> None:
    b = fake_session("b")
    b.paused = True
    status = take_status(fake_daemon(b, fake_session("a")), pid=42)()
    d = status["daemon"]
    assert d["pid"] == 42 and d["uptime_seconds"] == 25.0
    assert d["config"] == "/etc/wsd/wsd.toml" and d["kernel"] == "6.18.0-test"
    assert d["mode"] == "wp-async" and d["storage"] == "file"
    assert d["fault_service"] == "SCHED_FIFO 1"
    assert status["store"]["pages"] == 32 and status["store"]["age_seconds"] == 0.5
    assert status["store"]["counters"]["failures"] == 1
    assert [v["vm_id"] for v in status["vms"]] == ["a", "b"]
    a, b_ = status["vms"]
    assert a["guest_bytes"] == PAGES * 4096
    assert a["resident_bytes"] == (PAGES - 32) * 4096
    assert a["evicted_bytes"] == 32 * 4096
    assert a["hot_bytes"] == 64 * 4096
    assert a["working_set"][:3] == [
        {"horizon_intervals": 1, "bytes": 64 * 4096, "window_seconds": 1.0},
        {"horizon_intervals": 4, "bytes": 64 * 4096, "window_seconds": 4.0},
        {"horizon_intervals": 16, "bytes": 64 * 4096, "window_seconds": 16.0},
    ]
    # 20 intervals seen: the 64-interval horizon has no estimate yet.
    assert a["working_set"][3]["bytes"] is None
    assert a["refaults_total"] == 3 and a["refaults_per_minute"] == 6.0
    assert a["regions"][0]["granularity"] == "4k"
    assert (a["eviction"], a["paused"]) == ("active", False)
    assert (b_["eviction"], b_["paused"]) == ("paused", True)
    json.dumps(status)  # all of it serialisable


@pytest.mark.asyncio
async def test_the_status_command_counts_working_sets_off_the_loop_as_of_the_request(
    idle_counting_threads: list[threading.Thread],
) -> None:
    session = fake_session("a")
    state = session.tracker.regions[0].state
    state.note_access([100, 101, 102])  # idle pages, hot now: the counts are not cached
    reply = ControlCommands(fake_daemon(session))(Request(Command.STATUS))  # type: ignore[arg-type]
    task = asyncio.ensure_future(reply)
    await asyncio.sleep(0)  # the daemon is read: a change from here on is not in the reply
    state.note_access(range(110, 200))
    (vm,) = (await task)["vms"]
    assert idle_counting_threads and threading.main_thread() not in idle_counting_threads
    assert vm["working_set"][0]["bytes"] == (64 + 3) * 4096


def test_status_says_why_a_vm_does_not_evict() -> None:
    off = fake_session("off", reasons=["wp-async tracking has no sync window"])
    none = fake_session("none", store=None)
    vms = take_status(fake_daemon(off, none), pid=1)()["vms"]
    assert [(v["eviction"], v["eviction_off_because"]) for v in vms] == [
        ("off", "no storage configured"),
        ("off", "wp-async tracking has no sync window"),
    ]


def test_a_failing_store_shows_as_failing_with_how_long() -> None:
    failing = fake_session("failing")
    failing.ctx.stats.storage_failing_since = 10.0
    failing.ctx.clock = lambda: 42.0
    status = take_status(fake_daemon(failing), pid=1)()
    (vm,) = status["vms"]
    assert vm["eviction"] == "failing"
    assert vm["eviction_off_because"] == (
        "the store failed a batch; retried with backoff for 32 s so far"
    )
    assert "failing: eviction failing: the store failed a batch" in format_status(status)


def test_a_vm_whose_session_ended_shows_as_draining_until_its_pages_are_back() -> None:
    ending = fake_session("ending", closed=True)
    status = take_status(fake_daemon(fake_session("live"), ending), pid=1)()
    assert [(v["vm_id"], v["eviction"]) for v in status["vms"]] == [
        ("ending", "draining"),
        ("live", "active"),
    ]
    assert "ending: draining: the session ended" in format_status(status)


def test_the_table_shows_every_vm_and_the_store() -> None:
    off = fake_session("vm-2", reasons=["no window"])
    text = format_status(take_status(fake_daemon(fake_session("vm-1"), off), pid=7)())
    lines = text.splitlines()
    assert lines[0] == "wsd 0.1.0, pid 7, up 25s, mode wp-async, kernel 6.18.0-test"
    assert lines[1] == "config /etc/wsd/wsd.toml, interval 1 s, storage file"
    header = lines[3].split()
    assert header[:8] == [
        "VM",
        "MODE",
        "EVICTION",
        "GRANULARITY",
        "GUEST",
        "RESIDENT",
        "EVICTED",
        "HOT",
    ]
    assert header[8:] == ["WSS@1", "WSS@4", "WSS@16", "WSS@64", "REFAULTS/MIN"]
    row = lines[4].split("  ")
    assert [c.strip() for c in row if c.strip()] == [
        "vm-1",
        "wp-async",
        "active",
        "4k",
        "1.0 MiB",
        "896.0 KiB",
        "128.0 KiB",
        "256.0 KiB",
        "256.0 KiB",
        "256.0 KiB",
        "256.0 KiB",
        "-",
        "6.0",
    ]
    assert "vm-2: eviction off: no window" in lines
    assert any(line.split()[:3] == ["file", "all", "32"] for line in lines)


def test_sizes_and_durations_read_well() -> None:
    assert [format_bytes(n) for n in (None, 0, 1023, 4096, 3 * MiB // 2, 1 << 40)] == [
        "-",
        "0 B",
        "1023 B",
        "4.0 KiB",
        "1.5 MiB",
        "1.0 TiB",
    ]
    assert [format_duration(s) for s in (3.2, 65, 3 * 3600 + 120)] == ["3s", "1m05s", "3h02m"]


# -- commands --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_unknown_vm_is_named_with_the_known_ones() -> None:
    commands = ControlCommands(fake_daemon(fake_session("b"), fake_session("a")))
    with pytest.raises(ControlError) as e:
        await commands(Request(Command.PAUSE, "c"))
    assert e.value.code == ErrorCode.UNKNOWN_VM
    assert e.value.message == "no VM 'c' is tracked (tracked VMs: a, b)"


@pytest.mark.asyncio
async def test_pause_and_resume_flip_the_flag_and_say_whether_it_changed() -> None:
    s = fake_session("a")
    commands = ControlCommands(fake_daemon(s))
    assert await commands(Request(Command.PAUSE, "a")) == {
        "vm_id": "a",
        "paused": True,
        "changed": True,
    }
    assert s.paused
    assert (await commands(Request(Command.PAUSE, "a")))["changed"] is False
    assert (await commands(Request(Command.RESUME, "a")))["paused"] is False
    assert not s.paused


@pytest.mark.parametrize(
    ("session", "message"),
    [
        (fake_session("a", store=None), "VM 'a' cannot evict: wsd runs without storage"),
        (
            fake_session("a", reasons=["wp-async: no window"]),
            "VM 'a' cannot evict: region 0: wp-async: no window",
        ),
    ],
)
@pytest.mark.asyncio
async def test_evict_refuses_a_vm_that_cannot_evict(session: Any, message: str) -> None:
    with pytest.raises(ControlError) as e:
        await ControlCommands(fake_daemon(session))(Request(Command.EVICT, "a"))
    assert e.value.code == ErrorCode.CANNOT_EVICT
    assert message in e.value.message


@pytest.mark.asyncio
async def test_evict_is_prepared_then_answered_after_the_next_commit() -> None:
    s = fake_session("a")
    commands = ControlCommands(fake_daemon(s))
    asking = asyncio.create_task(commands(Request(Command.EVICT, "a", 8192)))
    await asyncio.sleep(0)
    assert isinstance(s.eviction, EvictionRequest)
    with pytest.raises(ControlError, match="already under way"):
        await commands(Request(Command.EVICT, "a"))

    await _prepare(s)  # between windows: the request's pages, not the usual ones
    assert s.evictor.asked == [8192] and s.evictor.prepares == 0
    assert not asking.done()
    # The next window commits two of the three pages; one was touched.
    s.ctx.stats.evicted_pages += 2
    s.ctx.stats.evicted_bytes += 8192
    s.ctx.stats.skipped_touched += 1
    await _prepare(s)
    assert await asking == {
        "vm_id": "a",
        "max_bytes": 8192,
        "prepared_bytes": 3 * 4096,
        "evicted_pages": 2,
        "evicted_bytes": 8192,
        "skipped_touched_pages": 1,
    }
    assert s.eviction is None and s.evictor.prepares == 1


@pytest.mark.asyncio
async def test_evict_with_nothing_idle_answers_at_once() -> None:
    s = fake_session("a")
    s.evictor.idle_bytes = 0
    asking = asyncio.create_task(ControlCommands(fake_daemon(s))(Request(Command.EVICT, "a")))
    await asyncio.sleep(0)
    await _prepare(s)
    assert (await asking)["evicted_bytes"] == 0
    assert s.eviction is None


@pytest.mark.asyncio
async def test_a_paused_vm_prepares_nothing_unless_asked_but_is_repaired() -> None:
    s = fake_session("a")
    s.paused = True
    await _prepare(s)
    # Punch remnants and held-back pages of the last window cannot wait for
    # a resume: the remnants' zeros would outlive a crash.
    assert (s.evictor.prepares, s.evictor.repairs) == (0, 1)
    s.eviction = EvictionRequest("a", None)
    await _prepare(s)
    assert s.evictor.asked == [None]


@pytest.mark.asyncio
async def test_an_abandoned_eviction_says_the_session_ended() -> None:
    request = EvictionRequest("a", None)
    request.abandon("VM 'a''s session ended before the eviction was committed")
    with pytest.raises(ControlError, match="session ended") as e:
        await request.done
    assert e.value.code == ErrorCode.SESSION_ENDED


# -- server and client -------------------------------------------------------------------


async def talk(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        replies = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        return replies
    finally:
        writer.close()


async def echo(req: Request) -> dict[str, Any]:
    if req.vm_id == "boom":
        raise RuntimeError("boom")
    return {"command": str(req.command), "vm_id": req.vm_id}


@pytest.mark.asyncio
async def test_the_server_answers_each_line_in_order(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock", echo)
    server.listen()
    assert (tmp_path / "c.sock").stat().st_mode & 0o777 == 0o600
    serving = asyncio.create_task(server.serve())
    try:
        replies = await talk(
            tmp_path / "c.sock",
            b'{"version":1,"command":"status"}\n',
            b"nonsense\n",
            b'{"version":1,"command":"pause","vm_id":"boom"}\n',
            b'{"version":1,"command":"pause","vm_id":"x"}\n',
        )
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert replies[0] == {"version": 1, "ok": True, "result": {"command": "status", "vm_id": None}}
    assert replies[1]["error"]["code"] == "bad_json"
    assert replies[2]["error"] == {
        "code": "internal",
        "message": "wsd failed to carry out the request: boom",
    }
    assert replies[3]["result"] == {"command": "pause", "vm_id": "x"}
    assert not (tmp_path / "c.sock").exists()


@pytest.mark.asyncio
async def test_a_peer_the_policy_does_not_allow_is_refused(tmp_path: Path) -> None:
    only_someone_else = AccessPolicy(uids=frozenset({4242}))
    server = ControlServer(tmp_path / "c.sock", echo, access=only_someone_else)
    serving = asyncio.create_task(server.serve())
    try:
        while not (tmp_path / "c.sock").exists():
            await asyncio.sleep(0.01)
        [reply] = await talk(tmp_path / "c.sock", b'{"version":1,"command":"status"}\n')
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    assert "is not allowed to connect" in reply["error"]["message"]


@pytest.mark.asyncio
async def test_an_overlong_line_is_refused(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock", echo)
    server.listen()
    serving = asyncio.create_task(server.serve())
    try:
        [reply] = await talk(tmp_path / "c.sock", b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert reply["error"]["code"] == "too_large"


def test_the_client_says_when_no_wsd_is_there(tmp_path: Path) -> None:
    with pytest.raises(ControlUnreachable, match="wsd is not running: no control socket at"):
        request(tmp_path / "none.sock", Request(Command.STATUS), timeout=1)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed wsd leaves
    with pytest.raises(ControlUnreachable, match="nothing listens on"):
        request(stale, Request(Command.STATUS), timeout=1)


@pytest.mark.asyncio
async def test_the_client_gets_results_and_errors(tmp_path: Path) -> None:
    async def handler(req: Request) -> dict[str, Any]:
        if req.vm_id == "gone":
            raise ControlError(ErrorCode.UNKNOWN_VM, "no VM 'gone' is tracked")
        return {"ok": req.vm_id}

    server = ControlServer(tmp_path / "c.sock", handler)
    server.listen()
    serving = asyncio.create_task(server.serve())
    try:
        path = tmp_path / "c.sock"
        result = await asyncio.to_thread(request, path, Request(Command.PAUSE, "a"), timeout=5)
        assert result == {"ok": "a"}
        with pytest.raises(ControlError, match="no VM 'gone'"):
            await asyncio.to_thread(request, path, Request(Command.PAUSE, "gone"), timeout=5)
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
