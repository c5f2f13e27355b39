"""Waiting for work that must run to its end even when the waiter is cancelled.

A worker thread cannot be cancelled: once it runs, the objects and fds it uses must
outlive it, so whoever started it waits for it before tearing anything down.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def despite_cancellation(work: asyncio.Future[T]) -> bool:
    """Wait until ``work`` is done, even if cancelled; whether a cancellation came."""
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait((work,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled
