"""Names in systemd's fd store, and grouping what it hands back into sessions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from wsd import fdstore


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Eight open fds; whichever parse leaves open are closed afterwards."""
    opened = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(8)]
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_names_quote_the_listen_fdnames_separator() -> None:
    assert fdstore.names("a:b%c", 2) == [
        "wsd.a%3Ab%25c.uffd",
        "wsd.a%3Ab%25c.mem0",
        "wsd.a%3Ab%25c.mem1",
    ]
    assert fdstore.held_names("vm", 2) == ["wsd.vm.held0", "wsd.vm.held1"]


def test_parse_groups_sessions_with_their_held_pipes(fds: list[int]) -> None:
    named = [
        *zip([*fdstore.names("a:b", 2), *fdstore.held_names("a:b", 2)], fds[:5], strict=True),
        *zip(fdstore.names("c", 1), fds[5:7], strict=True),
    ]
    sessions = fdstore.parse(named)
    assert sorted(sessions) == ["a:b", "c"]
    a = sessions["a:b"]
    assert (a.uffd, a.memfds, a.held) == (fds[0], {0: fds[1], 1: fds[2]}, {0: fds[3], 1: fds[4]})
    assert sessions["c"].held == {}
    assert all(_is_open(fd) for fd in fds[:7])


def test_parse_closes_what_it_does_not_know_and_incomplete_sessions(
    fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    named = [
        ("other.thing", fds[0]),
        ("wsd.vm.heldx", fds[1]),
        ("wsd.vm.held²", fds[2]),
        # a session without its uffd, and one held pipe: all closed
        ("wsd.lost.mem0", fds[3]),
        ("wsd.lost.held0", fds[4]),
        # the same memfd twice
        ("wsd.twice.uffd", fds[5]),
        ("wsd.twice.mem0", fds[6]),
        ("wsd.twice.mem0", fds[7]),
    ]
    assert fdstore.parse(named) == {}
    assert not any(_is_open(fd) for fd in fds)
