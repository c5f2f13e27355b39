"""Fuzzing the control protocol's parser and dispatcher: whatever the line, one precise reply.

Each input goes through :meth:`ControlServer.reply`, which is everything the
server does with a line once it has read it: parse, check who may address
a VM, carry out the command against a daemon made of fakes (the ones
tests/unit/test_control.py builds).  Every input must give one reply that is
JSON, with a documented error code other than ``internal``, a message of at
most 400 characters naming the field it blames, and never an exception.

Two peers send: wsd's own user (privileged) and an allowed VMM user, who may
read ``status`` but not address a VM.

The case counts add up to 6,200 (about 15 s of one CPU);
tests/integration/test_control_socket_fuzz.py sends 1,200 more through a real
daemon's socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control import fake_daemon, fake_session

from wsd.access import AccessPolicy, PeerCred
from wsd.control import Command, ErrorCode
from wsd.control.commands import ControlCommands
from wsd.control.protocol import CONTROL_VERSION, parse_request
from wsd.control.server import ControlServer
from wsd.daemon import _prepare

# No example database: CI runs are fresh, and the fuzz must not write into the tree.
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
MAX_ERROR_CHARS = 400
OWN_UID = os.getuid()
VMM_UID = 4242 if OWN_UID != 4242 else 4243
OPERATOR = PeerCred(pid=1000, uid=OWN_UID, gid=OWN_UID)
VMM_USER = PeerCred(pid=2000, uid=VMM_UID, gid=VMM_UID)
POLICY = AccessPolicy(uids=frozenset({0, OWN_UID, VMM_UID}), own_uid=OWN_UID)
# "a" evicts; "nostore" runs without storage; "off" has no region it may evict.
KNOWN_VMS = ["a", "nostore", "off"]


class Harness:
    """A control server over a fake daemon, and one event loop for every case."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.evictable = fake_session("a")
        sessions = [
            self.evictable,
            fake_session("nostore", store=None),
            fake_session("off", reasons=["wp-async: no window"]),
        ]
        self.server = ControlServer(
            # Never listened on: the fuzz drives reply() directly.
            Path("/nonexistent/control.sock"),
            ControlCommands(fake_daemon(*sessions)),
            access=POLICY,
        )
        self.codes: dict[str, int] = {}

    def reply(self, line: bytes, peer: PeerCred) -> dict[str, Any]:
        return self.runner.run(self._reply(line, peer))

    async def _reply(self, line: bytes, peer: PeerCred) -> dict[str, Any]:
        asking = asyncio.create_task(self.server.reply(line, peer))
        await asyncio.sleep(0)
        if not asking.done() and self.evictable.eviction is not None:
            # As the daemon's cycle task would: store, then commit and answer.
            await _prepare(self.evictable)
            await _prepare(self.evictable)
        reply = await asyncio.wait_for(asking, 5)
        # On the wire, then back: the reply must survive encoding.
        out: dict[str, Any] = json.loads(json.dumps(reply))
        return out

    def check(self, line: bytes, peer: PeerCred) -> dict[str, Any]:
        """The reply to ``line``, checked to be one well-formed answer."""
        reply = self.reply(line, peer)
        assert reply["version"] == CONTROL_VERSION and isinstance(reply["ok"], bool), reply
        if reply["ok"]:
            assert isinstance(reply["result"], dict), reply
            self.codes["ok"] = self.codes.get("ok", 0) + 1
            return reply
        error = reply["error"]
        code = ErrorCode(error["code"])  # documented codes only
        assert code is not ErrorCode.INTERNAL, error
        message = error["message"]
        assert message.strip() and len(message) <= MAX_ERROR_CHARS, message[:500]
        assert names_what_it_blames(code, message, line), (code, message)
        self.codes[code.value] = self.codes.get(code.value, 0) + 1
        return reply


def names_what_it_blames(code: ErrorCode, message: str, line: bytes) -> bool:
    """The message names the field (or, for a VM, the id) it refuses."""
    if code is ErrorCode.BAD_JSON:
        return message.startswith("the request is not valid JSON: ")
    if code is ErrorCode.BAD_VERSION:
        return "'version'" in message
    if code is ErrorCode.UNKNOWN_COMMAND:
        return "'command'" in message
    if code is ErrorCode.FORBIDDEN:
        return "'vm_id'" in message
    data = json.loads(line)
    if code is ErrorCode.INVALID:
        if not isinstance(data, dict):
            return "must be a JSON object" in message
        # A field given (an unknown or a malformed one) or one missing.
        return any(repr(key)[:40] in message for key in [*data, *KEYS])
    # unknown_vm, cannot_evict, busy: about the VM the request named.
    return repr(data["vm_id"]) in message


def check_parse_field(line: bytes) -> None:
    """A parse error's ``field`` is the one its message names."""
    try:
        parse_request(line)
    except Exception as e:
        field = getattr(e, "field", None)
        assert field is None or repr(field)[:40] in str(e), (field, str(e))


@pytest.fixture
def harness() -> Iterator[Harness]:
    with asyncio.Runner() as runner:
        yield Harness(runner)


def encode(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- requests ---------------------------------------------------------------------

VM_IDS = st.one_of(
    st.sampled_from(KNOWN_VMS),
    st.text(alphabet=string.ascii_letters + string.digits + "_.:@-", max_size=20).map(
        lambda rest: f"v{rest}"
    ),
)
HOSTILE_INTS = st.one_of(
    st.integers(),
    st.integers(-(1 << 80), 1 << 80),
    st.sampled_from([0, -1, 1, 4095, 2**31, 2**63, 2**64 - 1, 2**64, 10**30, 10**300]),
)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    HOSTILE_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["status", "pause", "resume", "evict", "a", "x" * 5000]),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=4,
)
KEYS = ["version", "command", "vm_id", "max_bytes"]
PEERS = st.sampled_from([OPERATOR, VMM_USER])


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    command = draw(st.sampled_from(list(Command)))
    msg: dict[str, Any] = {"version": 1, "command": str(command)}
    if command is not Command.STATUS:
        msg["vm_id"] = draw(VM_IDS)
    if command is Command.EVICT and draw(st.booleans()):
        msg["max_bytes"] = draw(st.integers(1, 1 << 40))
    return msg


@st.composite
def mutated_request(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one to three things broken."""
    msg = draw(valid_request())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "set", "unknown", "many-unknown", "vm_id"]))
        if kind == "drop":
            msg.pop(draw(st.sampled_from(KEYS)), None)
        elif kind == "set":
            msg[draw(st.sampled_from(KEYS))] = draw(JSON_VALUE)
        elif kind == "unknown":
            msg[draw(st.text(min_size=1, max_size=12) | st.just("k" * 5000))] = draw(JSON_VALUE)
        elif kind == "many-unknown":
            msg.update({f"k{i}": i for i in range(draw(st.sampled_from([2, 4, 500])))})
        else:
            msg["vm_id"] = draw(st.text(max_size=100) | st.sampled_from(["", "a" * 65, "a b"]))
    return msg


@settings(FUZZ, max_examples=600)
@given(msg=valid_request(), peer=PEERS)
def test_valid_requests_are_carried_out_or_refused_precisely(
    harness: Harness, msg: dict[str, Any], peer: PeerCred
) -> None:
    reply = harness.check(encode(msg), peer)
    vm_id = msg.get("vm_id")
    if msg["command"] == "status":
        assert reply["ok"], reply
    elif peer is VMM_USER:
        assert reply["error"]["code"] == "forbidden", reply
    elif vm_id not in KNOWN_VMS:
        assert reply["error"]["code"] == "unknown_vm", reply
    elif msg["command"] == "evict" and vm_id != "a":
        assert reply["error"]["code"] == "cannot_evict", reply
    else:
        assert reply["ok"], reply


@settings(FUZZ, max_examples=2200)
@given(msg=mutated_request(), peer=PEERS)
def test_mutated_requests_get_one_precise_reply(
    harness: Harness, msg: dict[str, Any], peer: PeerCred
) -> None:
    line = encode(msg)
    check_parse_field(line)
    harness.check(line, peer)


@settings(FUZZ, max_examples=800)
@given(value=JSON_VALUE, peer=PEERS)
def test_any_json_value_gets_one_precise_reply(
    harness: Harness, value: object, peer: PeerCred
) -> None:
    harness.check(encode(value), peer)


@settings(FUZZ, max_examples=1200)
@given(raw=st.binary(max_size=200), peer=PEERS)
def test_any_bytes_get_one_precise_reply(harness: Harness, raw: bytes, peer: PeerCred) -> None:
    check_parse_field(raw)
    harness.check(raw, peer)


@st.composite
def damaged_encoding(draw: st.DrawFn) -> bytes:
    """A valid request's bytes, truncated, with bytes flipped or non-UTF-8 spliced in."""
    raw = bytearray(encode(draw(valid_request())))
    how = draw(st.sampled_from(["truncate", "flip", "splice"]))
    at = draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        return bytes(raw[:at])
    if how == "flip":
        raw[at] ^= draw(st.integers(1, 255))
        return bytes(raw)
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]))
    return bytes(raw[:at] + junk + raw[at:])


@settings(FUZZ, max_examples=1400)
@given(raw=damaged_encoding(), peer=PEERS)
def test_damaged_requests_get_one_precise_reply(
    harness: Harness, raw: bytes, peer: PeerCred
) -> None:
    check_parse_field(raw)
    harness.check(raw, peer)


# -- the edges a generator rarely reaches --------------------------------------------


def _request(**over: Any) -> bytes:
    msg: dict[str, Any] = {"version": 1, "command": "evict", "vm_id": "a"}
    msg.update(over)
    return encode(msg)


@pytest.mark.parametrize(
    ("line", "code", "text"),
    [
        (b"[" * 100_000 + b"]" * 100_000, ErrorCode.BAD_JSON, "recursion"),
        (b'{"max_bytes": ' + b"9" * 5000 + b"}", ErrorCode.BAD_JSON, "4300 digits"),
        (_request(max_bytes=10**4000), ErrorCode.INVALID, "'max_bytes' is 1000000"),
        (_request(max_bytes=2**63), ErrorCode.INVALID, "up to 2**63 - 1"),
        (_request().replace(b'"a"}', b'"a","max_bytes":NaN}'), ErrorCode.BAD_JSON, "NaN is not"),
        (_request().replace(b"1,", b"Infinity,"), ErrorCode.BAD_JSON, "Infinity is not"),
        (_request().decode().encode("utf-16"), ErrorCode.BAD_JSON, "utf-8"),
        (_request().decode().encode("utf-32"), ErrorCode.BAD_JSON, "utf-8"),
        ("\ufeff".encode() + _request(), ErrorCode.BAD_JSON, "BOM"),
        (_request(vm_id="\ud800"), ErrorCode.INVALID, "'vm_id'"),
        (_request().replace(b"1,", b"1.0,"), ErrorCode.BAD_VERSION, "'version' is 1.0"),
        (_request(version=True), ErrorCode.BAD_VERSION, "'version' is True"),
        (_request(command="x" * 60_000), ErrorCode.UNKNOWN_COMMAND, "(60002 chars)"),
        (_request(command=["evict"]), ErrorCode.UNKNOWN_COMMAND, "'command' is ['evict']"),
        (_request(vm_id="a" * 60_000), ErrorCode.INVALID, "(60002 chars)"),
        (_request(max_bytes=True), ErrorCode.INVALID, "'max_bytes' is True"),
        (_request(max_bytes=4096.0), ErrorCode.INVALID, "'max_bytes' is 4096.0"),
        (_request(max_bytes=-1), ErrorCode.INVALID, "'max_bytes' is -1"),
        (_request(**{"x" * 60_000: 1}), ErrorCode.INVALID, "evict takes no 'xxxx"),
        (_request(**{f"k{i}": i for i in range(2000)}), ErrorCode.INVALID, "(and 1997 more)"),
        (_request(vm_id="zz"), ErrorCode.UNKNOWN_VM, "no VM 'zz' is tracked"),
        (_request(vm_id="nostore"), ErrorCode.CANNOT_EVICT, "without storage"),
        (b"", ErrorCode.BAD_JSON, "Expecting value"),
        (b"\x00", ErrorCode.BAD_JSON, "Expecting value"),
    ],
    ids=lambda v: v.value if isinstance(v, ErrorCode) else None,
)
def test_hostile_edges(harness: Harness, line: bytes, code: ErrorCode, text: str) -> None:
    check_parse_field(line)
    reply = harness.check(line, OPERATOR)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code.value, reply
    assert text in reply["error"]["message"], reply


def test_an_unknown_vm_lists_a_few_of_the_tracked_ones() -> None:
    sessions = [fake_session(f"vm-{i:03}") for i in range(300)]
    server = ControlServer(
        Path("/nonexistent/control.sock"),
        ControlCommands(fake_daemon(*sessions)),
        access=POLICY,
    )
    reply = asyncio.run(server.reply(_request(command="pause", vm_id="gone"), OPERATOR))
    message = reply["error"]["message"]
    assert message == (
        "no VM 'gone' is tracked (tracked VMs: vm-000, vm-001, vm-002, vm-003, vm-004, "
        "vm-005, vm-006, vm-007 and 292 more)"
    )


# -- who may address a VM ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["pause", "resume", "evict"])
def test_an_allowed_vmm_user_may_not_address_any_vm(harness: Harness, command: str) -> None:
    before = harness.evictable.paused
    reply = harness.check(_request(command=command), VMM_USER)
    assert reply["error"]["code"] == "forbidden"
    assert reply["error"]["message"] == (
        f"{command} of 'vm_id' 'a': peer pid 2000 (uid {VMM_UID}) may not address it; "
        f"only root, wsd's own user (uid {OWN_UID}) and the user its VMM runs as may "
        "pause, resume or evict a VM"
    )
    assert harness.evictable.paused == before and harness.evictable.eviction is None
    # Unknown VMs too: the refusal does not tell which VMs exist.
    reply = harness.check(_request(command=command, vm_id="zz"), VMM_USER)
    assert reply["error"]["code"] == "forbidden"
    assert harness.server.refused["forbidden"] == 2


def test_a_vmm_user_may_address_the_vms_its_vmm_runs_and_no_other() -> None:
    mine = fake_session("mine", owner_uid=VMM_UID)
    theirs = fake_session("theirs", owner_uid=VMM_UID + 1)
    commands = ControlCommands(fake_daemon(mine, theirs))
    server = ControlServer(
        Path("/nonexistent/control.sock"), commands, access=POLICY, owner_of=commands.owner_uid
    )
    reply = asyncio.run(server.reply(_request(command="pause", vm_id="mine"), VMM_USER))
    assert reply["ok"] is True and mine.paused
    for vm_id in ("theirs", "unknown"):
        reply = asyncio.run(server.reply(_request(command="pause", vm_id=vm_id), VMM_USER))
        assert reply["error"]["code"] == "forbidden", reply
        assert "may not address it" in reply["error"]["message"]
    assert not theirs.paused
    # wsd's own user may address every VM.
    reply = asyncio.run(server.reply(_request(command="pause", vm_id="theirs"), OPERATOR))
    assert reply["ok"] is True and theirs.paused


def test_an_allowed_vmm_user_may_read_the_status(harness: Harness) -> None:
    reply = harness.check(encode({"version": 1, "command": "status"}), VMM_USER)
    assert [vm["vm_id"] for vm in reply["result"]["vms"]] == sorted(KNOWN_VMS)


@pytest.mark.parametrize("uid", [0, OWN_UID])
def test_root_and_wsd_own_user_may_address_every_vm(harness: Harness, uid: int) -> None:
    peer = PeerCred(pid=3000, uid=uid, gid=uid)
    assert harness.check(_request(command="pause"), peer)["result"]["paused"] is True
    assert harness.check(_request(command="resume"), peer)["result"]["paused"] is False
    assert harness.check(_request(), peer)["result"]["vm_id"] == "a"
