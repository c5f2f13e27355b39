"""Fuzzing the hand-off message parser: whatever the bytes, a request or a precise error.

Every input either parses into a :class:`HandoffRequest` or raises a
:class:`HandoffError` whose reply is JSON, whose code is a documented one and
whose message is short and names the field it blames.  Nothing else may
escape :func:`parse_request`: the server turns anything else into a
connection that dies without a reply.

The case counts add up to 8,800 (about 50 s of one CPU);
tests/integration/test_handoff_socket_fuzz.py sends 1,500 more through a real
socket with real fds, for over 10,000 in a CI run.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd.vmm.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REGIONS,
    ErrorCode,
    HandoffError,
    HandoffRequest,
    parse_request,
)

# No example database: CI runs are fresh, and the fuzz must not write into the tree.
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_ERROR_CHARS = 400
HOST = 0x7F0000000000


def outcome(raw: bytes) -> HandoffRequest | HandoffError:
    """Parse ``raw`` and check that a refusal is well formed."""
    try:
        return parse_request(raw)
    except HandoffError as e:
        reply = json.loads(json.dumps(e.reply()))
        assert reply["type"] == "error" and reply["version"] == 1
        assert ErrorCode(reply["error"]["code"]) is e.code
        assert e.message.strip(), "an error must say what was wrong"
        assert len(e.message) <= MAX_ERROR_CHARS, f"error message too long: {e.message[:200]}"
        if e.field is not None:
            # The field it blames is named where a reader looks: in the message.
            head = e.field.split("[")[0].split(".")[0]
            assert head in e.message, (e.field, e.message)
        return e


# -- valid messages ----------------------------------------------------------------


# Cheaper to draw than st.from_regex, which would double the time of every case.
VM_IDS = st.text(alphabet=string.ascii_letters + string.digits + "_.:@-", max_size=20).map(
    lambda rest: f"v{rest}"
)


@st.composite
def valid_message(draw: st.DrawFn) -> dict[str, Any]:
    """A hand-off that must be accepted: sorted, aligned, non-overlapping regions."""
    page = draw(st.sampled_from([4096, 2 << 20, 1 << 30]))
    firecracker = draw(st.booleans())
    regions: list[dict[str, Any]] = []
    gpa = draw(st.integers(0, 8)) * page
    hva = HOST
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, 16)) * page
        if firecracker:
            # Firecracker keeps guest memory in one file laid out by guest address.
            region: dict[str, Any] = {"base_host_virt_addr": hva, "size": size, "offset": gpa}
            if page != 4096 or draw(st.booleans()):
                region["page_size"] = page
        else:
            region = {
                "guest_phys_addr": gpa,
                "host_virt_addr": hva,
                "size": size,
                "fd_index": 1,
                "offset": gpa,
                "page_size": page,
            }
            if draw(st.booleans()):
                region["dma_pinned"] = draw(st.booleans())
        regions.append(region)
        gpa += size + draw(st.integers(0, 4)) * page
        hva += size + draw(st.integers(0, 4)) * page
    msg: dict[str, Any] = {
        "type": "handoff",
        "version": 1,
        "vm_id": draw(VM_IDS),
        "vmm_pid": draw(st.integers(1, (1 << 22))),
        "regions": regions,
    }
    if draw(st.booleans()):
        msg["uffd"] = draw(
            st.sampled_from(
                [
                    {"fd_index": 0},
                    {"state": "raw"},
                    {"state": "registered", "features": 1 << 13, "register_mode": ["WP"]},
                ]
            )
        )
    return msg


def encode(msg: object) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


@settings(FUZZ, max_examples=400)
@given(valid_message())
def test_valid_messages_are_accepted(msg: dict[str, Any]) -> None:
    req = outcome(encode(msg))
    assert isinstance(req, HandoffRequest), req
    assert len(req.regions) == len(msg["regions"])
    assert req.vmm_pid == msg["vmm_pid"]
    assert req.fd_count == 2


# -- mutations ------------------------------------------------------------------------

HOSTILE_INTS = st.one_of(
    st.integers(),
    st.integers(-(1 << 80), 1 << 80),
    st.sampled_from([0, -1, 1, 4095, 4097, 2**31, 2**63, 2**64 - 1, 2**64, 10**30]),
)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    HOSTILE_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=4,
)
REGION_KEYS = [
    "guest_phys_addr",
    "host_virt_addr",
    "size",
    "fd_index",
    "offset",
    "page_size",
    "dma_pinned",
    "base_host_virt_addr",
    "page_size_kib",
]
TOP_KEYS = ["type", "version", "vm_id", "vmm_pid", "uffd", "regions"]


@st.composite
def mutated_message(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with one to three things broken."""
    msg = draw(valid_message())
    regions = msg["regions"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "drop-top",
                    "set-top",
                    "unknown-top",
                    "drop-region-key",
                    "set-region-key",
                    "unknown-region-key",
                    "unalign",
                    "overlap",
                    "shuffle",
                    "fd-index",
                    "uffd",
                    "many-regions",
                ]
            )
        )
        i = draw(st.integers(0, len(regions) - 1)) if regions else 0
        if kind == "drop-top":
            msg.pop(draw(st.sampled_from(TOP_KEYS)), None)
        elif kind == "set-top":
            msg[draw(st.sampled_from(TOP_KEYS))] = draw(JSON_VALUE)
        elif kind == "unknown-top":
            msg[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUE)
        elif not isinstance(regions, list) or not regions:
            continue
        elif kind == "drop-region-key" and isinstance(regions[i], dict):
            regions[i].pop(draw(st.sampled_from(REGION_KEYS)), None)
        elif kind == "set-region-key" and isinstance(regions[i], dict):
            regions[i][draw(st.sampled_from(REGION_KEYS))] = draw(JSON_VALUE)
        elif kind == "unknown-region-key" and isinstance(regions[i], dict):
            regions[i][draw(st.text(min_size=1, max_size=12))] = draw(HOSTILE_INTS)
        elif kind == "unalign" and isinstance(regions[i], dict):
            key = draw(st.sampled_from(["guest_phys_addr", "host_virt_addr", "size", "offset"]))
            if isinstance(regions[i].get(key), int):
                regions[i][key] += draw(st.integers(1, 4095))
        elif kind == "overlap":
            regions.insert(i, json.loads(json.dumps(regions[i])))
        elif kind == "shuffle":
            msg["regions"] = regions = draw(st.permutations(regions))
        elif kind == "fd-index" and isinstance(regions[i], dict):
            regions[i]["fd_index"] = draw(HOSTILE_INTS)
        elif kind == "uffd":
            msg["uffd"] = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "fd_index": HOSTILE_INTS,
                        "state": st.sampled_from(["raw", "registered", "other"]),
                        "features": HOSTILE_INTS,
                        "register_mode": st.lists(
                            st.sampled_from(["MISSING", "WP", "MINOR", "RWP", "X"]), max_size=3
                        ),
                    },
                )
            )
        elif kind == "many-regions":
            # Over the limit: refused before any region is looked at.  (Up to
            # 512 regions parse at ~10 ms a message, too slow for thousands.)
            msg["regions"] = regions = regions * (MAX_REGIONS // len(regions) + 1)
    return msg


@settings(FUZZ, max_examples=2500)
@given(mutated_message())
def test_mutated_messages_get_a_request_or_a_precise_error(msg: dict[str, Any]) -> None:
    outcome(encode(msg))


@settings(FUZZ, max_examples=600)
@given(valid_message(), st.data())
def test_overlapping_regions_are_named(msg: dict[str, Any], data: st.DataObject) -> None:
    regions = msg["regions"]
    i = data.draw(st.integers(0, len(regions) - 1))
    regions.insert(i + 1, dict(regions[i]))
    err = outcome(encode(msg))
    assert isinstance(err, HandoffError)
    assert err.code is ErrorCode.BAD_REGION
    assert f"regions[{i + 1}] overlaps regions[{i}]" in err.message, err.message
    assert err.field == f"regions[{i + 1}]"


@settings(FUZZ, max_examples=600)
@given(valid_message(), st.data())
def test_unaligned_regions_are_named(msg: dict[str, Any], data: st.DataObject) -> None:
    regions = msg["regions"]
    i = data.draw(st.integers(0, len(regions) - 1))
    region = regions[i]
    key = data.draw(st.sampled_from(["size", "offset"]))
    region[key] += data.draw(st.integers(1, 4095))
    err = outcome(encode(msg))
    assert isinstance(err, HandoffError)
    assert err.code is ErrorCode.BAD_REGION
    assert err.message.startswith(f"regions[{i}]"), err.message
    assert "is not a multiple of page_size" in err.message or "overlaps" in err.message


# -- arbitrary JSON and bytes ---------------------------------------------------------


@settings(FUZZ, max_examples=1200)
@given(JSON_VALUE)
def test_any_json_value_gets_an_answer(value: object) -> None:
    err = outcome(encode(value))
    assert isinstance(err, HandoffError)


@settings(FUZZ, max_examples=2000)
@given(st.binary(max_size=300))
def test_any_bytes_get_an_answer(raw: bytes) -> None:
    outcome(raw)


@st.composite
def damaged_encoding(draw: st.DrawFn) -> bytes:
    """A valid message's bytes, truncated, with bytes flipped or non-UTF-8 spliced in."""
    raw = bytearray(encode(draw(valid_message())))
    how = draw(st.sampled_from(["truncate", "flip", "splice"]))
    at = draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        return bytes(raw[:at])
    if how == "flip":
        raw[at] ^= draw(st.integers(1, 255))
        return bytes(raw)
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]))
    return bytes(raw[:at] + junk + raw[at:])


@settings(FUZZ, max_examples=1500)
@given(damaged_encoding())
def test_damaged_messages_get_an_answer(raw: bytes) -> None:
    outcome(raw)


# -- the edges a generator rarely reaches --------------------------------------------


def _message(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "handoff",
        "version": 1,
        "vm_id": "vm-1",
        "vmm_pid": 42,
        "regions": [{"guest_phys_addr": 0, "host_virt_addr": HOST, "size": 4096, "fd_index": 1}],
    }
    msg.update(over)
    return msg


@pytest.mark.parametrize(
    ("raw", "code", "text"),
    [
        (b'{"vmm_pid": ' + b"9" * 5000 + b"}", ErrorCode.BAD_JSON, "4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, ErrorCode.BAD_JSON, "recursion"),
        (encode(_message(pad=[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]])), ErrorCode.INVALID, "pad"),
        (encode(_message()).replace(b"42", b"NaN"), ErrorCode.BAD_JSON, "NaN is not"),
        (encode(_message()).replace(b"42", b"-Infinity"), ErrorCode.BAD_JSON, "-Infinity"),
        (encode(_message()).replace(b"42", b"42.0"), ErrorCode.INVALID, "vmm_pid"),
        (encode(_message(vmm_pid=1 << 40)), ErrorCode.INVALID, "vmm_pid"),
        (encode(_message(vmm_pid=True)), ErrorCode.INVALID, "vmm_pid"),
        (encode(_message(version=True)), ErrorCode.INVALID, "version"),
        (encode(_message(type="x" * 10_000)), ErrorCode.INVALID, "chars"),
        (encode(_message(vm_id="\ud800")), ErrorCode.BAD_JSON, "hex escape"),
        (encode(_message(regions=[])), ErrorCode.BAD_REGION, "regions: List should have at least"),
        (encode(_message(regions={})), ErrorCode.BAD_REGION, "regions"),
        (encode(_message(regions=[7])), ErrorCode.BAD_REGION, "regions[0]: must be an object"),
        (
            encode(_message(regions=[{**_message()["regions"][0], "size": 1 << 64}])),
            ErrorCode.BAD_REGION,
            "regions[0].size: Input should be less than 18446744073709551616",
        ),
        (
            encode(_message(regions=[{**_message()["regions"][0], "page_size": 10**400}])),
            ErrorCode.BAD_REGION,
            "regions[0].page_size",
        ),
        (
            encode(_message(regions=[{**_message()["regions"][0], "fd_index": 64}])),
            ErrorCode.BAD_REGION,
            "regions[0].fd_index",
        ),
        (
            encode(_message(regions=[{**_message()["regions"][0], "fd_index": 0}])),
            ErrorCode.BAD_REGION,
            "regions[0].fd_index 0 is the uffd's fd_index",
        ),
        (
            encode(
                _message(
                    regions=[
                        {
                            "base_host_virt_addr": HOST,
                            "size": 4096,
                            "offset": 0,
                            "page_size_kib": -4,
                        }
                    ]
                )
            ),
            ErrorCode.BAD_REGION,
            "regions[0].page_size_kib",
        ),
        ("\ufeff".encode() + encode(_message()), ErrorCode.BAD_JSON, "BOM"),
        (encode(_message()).decode().encode("utf-16"), ErrorCode.BAD_JSON, "utf-8"),
        (b" " * (MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE, "exceeds"),
    ],
    ids=lambda v: v.value if isinstance(v, ErrorCode) else None,
)
def test_hostile_edges(raw: bytes, code: ErrorCode, text: str) -> None:
    err = outcome(raw)
    assert isinstance(err, HandoffError)
    assert err.code is code, err.message
    assert text in err.message, err.message
