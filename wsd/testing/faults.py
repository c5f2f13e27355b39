"""A minimal blocking fault server for tests and the demo (the daemon uses asyncio)."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from wsd.kernel import PageFault, UffdMessage, Userfaultfd


def serve_faults(
    uffd: Userfaultfd,
    handle: Callable[[PageFault], None],
    until: Callable[[], bool],
    *,
    timeout: float = 30.0,
    on_event: Callable[[UffdMessage], None] | None = None,
) -> int:
    """Poll ``uffd`` and pass each page fault to ``handle`` until ``until()``.

    Returns the number of faults handled.  Non-fault events go to
    ``on_event`` or raise, so a test never silently drops one.
    """
    poller = select.poll()
    poller.register(uffd.fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    handled = 0
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault service gave up after {timeout}s ({handled} faults)")
        if not poller.poll(20):
            continue
        for msg in uffd.read_messages():
            if isinstance(msg, PageFault):
                handle(msg)
                handled += 1
            elif on_event is not None:
                on_event(msg)
            else:
                raise AssertionError(f"unexpected userfaultfd event {msg}")
    return handled


def collect_faults(uffd: Userfaultfd, count: int, *, timeout: float = 30.0) -> list[PageFault]:
    """Wait for ``count`` page faults and return them unresolved."""
    faults: list[PageFault] = []
    serve_faults(uffd, faults.append, until=lambda: len(faults) >= count, timeout=timeout)
    return faults


def assert_no_message(uffd: Userfaultfd, wait: float = 0.3) -> None:
    """Fail if a message arrives within ``wait`` seconds."""
    poller = select.poll()
    poller.register(uffd.fd, select.POLLIN)
    if poller.poll(int(wait * 1000)):
        raise AssertionError(f"unexpected userfaultfd message: {uffd.read_messages()}")
