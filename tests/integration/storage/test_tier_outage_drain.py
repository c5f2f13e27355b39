"""Redis down while wsd stops and drains a session, then back (host, wp-async).

wsd is stopped with a running guest and pages in Redis, and Redis is killed
just before: the drain at the end of the session cannot fetch anything.  It
retries (the pages stay in storage, nothing is discarded, faults wait) and,
once Redis is back on its data, brings every page back into the guest's
memory and only then discards the stored copies.  The guest, still running
after wsd is gone, re-reads and checks every page.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from redis_server import RedisServer
from structlog.testing import capture_logs

from wsd.storage import parse_storage_config
from wsd.testing.hammer import start_guest
from wsd.testing.outage import (
    OUTAGE_EVICTOR,
    assert_nothing_lost,
    check_punched_pages_are_stored,
    evicted_now,
    outage_daemon,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

VM = "drain-outage"
DOWN_SECONDS = 4.0
# Writers on a fixed hot set: the cold 90% is evicted and stays so, however long
# the checks before the kill take.  (The outage tests' Zipf guest touches all of
# its memory within a second or two: during a slow check it could fetch every
# page back, and the drain would start with nothing to fetch.)
COLD_STAYS_COLD = (
    *("--size", "32M", "--threads", "3", "--pattern", "uniform", "--hot", "10%"),
    *("--write-ratio", "0.5", "--thp", "never"),
)


async def test_a_drain_waits_out_a_redis_outage_and_brings_every_page_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    storage = parse_storage_config(
        {
            "kind": "redis",
            "url": redis_server.unix_url,
            "retries": 0,
            "connect_timeout_seconds": 0.5,
            "socket_timeout_seconds": 2,
        }
    )
    # No prefetch: pages come back by the drain, not by faults racing it.
    evictor = OUTAGE_EVICTOR.model_copy(update={"prefetch_pages": 0, "fetch_deadline_seconds": 60})
    with capture_logs() as logs:
        async with outage_daemon(tmp_path, storage, evictor, state_dir=tmp_path / "state") as d:
            guest = await start_guest(d, "--vm-id", VM, *COLD_STAYS_COLD)
            try:
                s = d.sessions[VM]
                stats = s.ctx.stats
                await wait_until(
                    lambda: stats.evicted_pages - stats.fetched_pages >= 1000,
                    60,
                    "1000 pages in redis",
                    guest=guest,
                    session=s,
                )
                s.ctx.config = s.ctx.config.model_copy(update={"enabled": False})
                in_storage = await check_punched_pages_are_stored(d, VM)
                with redis_server.client() as client:
                    keys_before = client.dbsize()

                # -- redis dies, then wsd stops: the drain starts on a dead tier ------------
                await asyncio.to_thread(redis_server.stop, kill=True)
                d.stop()
                await wait_until(
                    lambda: any(e["event"] == "drain: fetch failed, retrying" for e in logs),
                    30,
                    "the drain failing",
                    guest=guest,
                    session=s,
                )
                await asyncio.sleep(DOWN_SECONDS)
                left_while_down = evicted_now(s)
                closed = [e for e in logs if e["event"] == "session closed"]
                assert not closed, "the session ended while its pages were unreachable"
                # Parked meanwhile: its description and page map (a snapshot and
                # maybe journals) stay in the state directory, beside the VM's
                # generation ceiling.
                names = {p.name for p in (tmp_path / "state").iterdir()}
                assert {f"{VM}.pagemap.npz", f"{VM}.session.json", f"{VM}.ceiling"} <= names
                assert all(
                    re.fullmatch(rf"{VM}\.(pagemap\.npz|session\.json|journal\.\d+|ceiling)", n)
                    for n in names
                )

                # -- redis is back on its data: the drain finishes -------------------------
                await asyncio.to_thread(redis_server.start)
                with redis_server.client() as client:
                    keys_after_restart = client.dbsize()
                await wait_until(
                    lambda: any(e["event"] == "session closed" for e in logs),
                    60,
                    "the drain finished",
                    guest=guest,
                    session=s,
                )
                assert all(t.state.evicted_pages == 0 for t in s.tracker.regions)
                # Unparked: drained for good.  The ceiling stays, for the VM's next session.
                assert [p.name for p in (tmp_path / "state").iterdir()] == [f"{VM}.ceiling"]
                with redis_server.client() as client:
                    assert client.dbsize() == 0  # discarded, once every page was back
                # The guest runs on without wsd: every page must be in its memory now.
                assert await asyncio.to_thread(guest.stop, 300) == 0, guest.stderr()
            finally:
                guest.close()
            report = guest.report()
    failed = sum(e["event"] == "drain: fetch failed, retrying" for e in logs)
    print(
        f"\n{VM}: in redis at the kill {in_storage} pages ({keys_before} keys, "
        f"{keys_after_restart} after the restart), still evicted after {DOWN_SECONDS:g} s "
        f"down {left_while_down}, drain retries {failed}, fetched {stats.fetched_pages}, "
        f"guest ops {report['ops']}, pages verified at exit {report['final_check_pages']}"
    )
    assert left_while_down > 0
    assert keys_after_restart == keys_before  # nothing discarded while it was down
    assert failed >= 2
    assert not [
        e for e in logs if e["event"] == "cannot bring evicted pages back: they stay in storage"
    ]
    assert_nothing_lost(report, stats)
