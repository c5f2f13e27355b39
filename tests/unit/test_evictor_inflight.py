"""The gate between a verified punch in its thread and the faults on its pages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from wsd.evictor.inflight import InFlight
from wsd.kernel import PageFault
from wsd.kernel.uffd import FaultFlag


def _fault(address: int) -> PageFault:
    return PageFault(address, FaultFlag(0), 0)


def test_it_holds_exactly_the_pages_of_one_region() -> None:
    gate = InFlight()
    assert not gate.busy and not gate.holds(0, 5)
    gate.hold(1, np.array([3, 5, 9], dtype=np.int64))
    assert gate.busy
    assert [p for p in range(12) if gate.holds(1, p)] == [3, 5, 9]
    assert not gate.holds(0, 5)
    with pytest.raises(RuntimeError, match="region 1 are in flight already"):
        gate.hold(0, np.array([1], dtype=np.int64))
    gate.release()
    assert not gate.busy and not gate.holds(1, 5)


def test_release_serves_the_waiting_faults_in_order_even_if_one_fails() -> None:
    gate = InFlight()
    served: list[tuple[int, float]] = []

    def serve(fault: PageFault, read_at: float) -> None:
        if fault.address == 0x2000:
            raise RuntimeError("a bug in one fault's service")
        served.append((fault.address, read_at))

    gate.serve = serve
    gate.hold(0, np.array([1, 2, 3], dtype=np.int64))
    for k, address in enumerate((0x3000, 0x2000, 0x1000)):
        gate.wait(_fault(address), float(k))
    assert not served, "nothing is served while the chunk is in flight"
    gate.release()
    assert served == [(0x3000, 0.0), (0x1000, 2.0)]
    gate.hold(0, np.array([1], dtype=np.int64))
    gate.release()
    assert len(served) == 2, "served once"


@pytest.mark.asyncio
async def test_settled_returns_once_the_chunk_is_released() -> None:
    gate = InFlight()
    await asyncio.wait_for(gate.settled(), 1)
    gate.hold(0, np.array([7], dtype=np.int64))
    waiter = asyncio.ensure_future(gate.settled())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    gate.release()
    await asyncio.wait_for(waiter, 1)
