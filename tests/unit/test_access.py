"""AccessPolicy: who it lets in, how it creates sockets, and its [access] config."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from wsd import config
from wsd.access import AccessConfig, AccessPolicy, PeerCred
from wsd.kernel import effective_uid
from wsd.vmm.limits import HandoffLimits, check_request
from wsd.vmm.protocol import ErrorCode, HandoffError, HandoffRequest

ME = os.getuid()


def test_root_and_our_own_uid_are_allowed_by_default() -> None:
    policy = AccessPolicy.from_config(AccessConfig(), own_uid=1000)
    assert policy.refusal(PeerCred(pid=7, uid=0, gid=0)) is None
    assert policy.refusal(PeerCred(pid=7, uid=1000, gid=1000)) is None
    assert policy.socket_mode == 0o600


def test_a_refusal_names_the_peer_and_the_keys_to_change() -> None:
    policy = AccessPolicy.from_config(AccessConfig(allowed_users=[107]), own_uid=0)
    why = policy.refusal(PeerCred(pid=4242, uid=1001, gid=1002))
    assert why == (
        "peer pid 4242 (uid 1001, gid 1002) is not allowed to connect: allowed uids [0, 107], "
        "allowed gids [] (access.allowed_users, access.allowed_groups)"
    )
    assert policy.refusal(PeerCred(pid=1, uid=107, gid=5)) is None


def test_allowed_groups_match_the_primary_gid_and_the_socket_group_counts() -> None:
    policy = AccessPolicy.from_config(
        AccessConfig(allowed_groups=[200], socket_group=300), own_uid=0
    )
    assert policy.gids == {200, 300}
    assert policy.socket_mode == 0o660
    assert policy.refusal(PeerCred(pid=1, uid=5000, gid=200)) is None
    assert policy.refusal(PeerCred(pid=1, uid=5000, gid=300)) is None
    assert policy.refusal(PeerCred(pid=1, uid=5000, gid=400)) is not None


def test_names_resolve_and_unknown_names_are_errors_naming_the_key() -> None:
    root = pwd.getpwuid(0).pw_name
    cfg = config.parse(f'[access]\nallowed_users = ["{root}", 1234]\n')
    assert cfg.access.allowed_users == [0, 1234]
    with pytest.raises(config.ConfigError) as exc:
        config.parse('[access]\nallowed_users = ["no-such-user-wsd"]\nsocket_group = "no-such-grp"')
    text = str(exc.value)
    assert "`access.allowed_users.0` = 'no-such-user-wsd'" in text
    assert "no user named 'no-such-user-wsd' on this host" in text
    assert "no group named 'no-such-grp' on this host" in text
    with pytest.raises(config.ConfigError, match=r"unknown key `access\.allow_everyone`"):
        config.parse("[access]\nallow_everyone = true")


def test_listen_creates_an_owner_only_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "run" / "wsd.sock"
    first = AccessPolicy().listen(path)
    first.close()  # leaves the file behind, as a crash would
    sock = AccessPolicy().listen(path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o600
        assert sock.getblocking() is False
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_listen_with_a_group_chowns_and_opens_to_the_group(tmp_path: Path) -> None:
    sock = AccessPolicy(socket_group=23456).listen(tmp_path / "wsd.sock")
    try:
        st = os.stat(tmp_path / "wsd.sock")
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, 23456)
    finally:
        sock.close()


def _request(regions: int, size: int) -> HandoffRequest:
    return HandoffRequest.model_validate(
        {
            "type": "handoff",
            "version": 1,
            "vm_id": "vm",
            "vmm_pid": 1,
            "regions": [
                {
                    "guest_phys_addr": i * size,
                    "host_virt_addr": 0x7F0000000000 + i * size,
                    "size": size,
                    "fd_index": 1,
                    "offset": i * size,
                }
                for i in range(regions)
            ],
        }
    )


def test_limits_name_the_key_that_refused() -> None:
    limits = config.parse(
        '[limits]\nmax_regions_per_session = 2\nmax_guest_bytes_per_session = "1MiB"'
    ).limits
    check_request(_request(2, 4096), limits)
    with pytest.raises(
        HandoffError, match=r"3 regions exceed limits.max_regions_per_session \(2\)"
    ):
        check_request(_request(3, 4096), limits)
    with pytest.raises(HandoffError) as exc:
        check_request(_request(1, 2 << 20), limits)
    assert exc.value.code is ErrorCode.LIMIT
    assert str(exc.value) == (
        "the regions add up to 2097152 bytes, more than "
        "limits.max_guest_bytes_per_session (1048576)"
    )


def test_limits_cannot_exceed_the_protocol() -> None:
    with pytest.raises(config.ConfigError, match=r"limits\.max_regions_per_session"):
        config.parse("[limits]\nmax_regions_per_session = 513")
    assert HandoffLimits().message_timeout_seconds == 5.0


def test_effective_uid_is_the_second_uid_of_the_status(tmp_path: Path) -> None:
    """The control socket lets a VMM's user address its VM: the uid SO_PEERCRED gives."""
    assert effective_uid(os.getpid()) == os.geteuid()
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tqemu\nUid:\t0\t107\t107\t107\n")
    assert effective_uid(7, proc=tmp_path) == 107
    with pytest.raises(ProcessLookupError, match="no process 8"):
        effective_uid(8, proc=tmp_path)
