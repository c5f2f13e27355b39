"""Redis killed under a running guest while wsd evicts to it, then restarted (host, wp-async).

Eviction pauses (one error line, a gauge), backs off instead of trying every
interval, and resumes by itself; faults on pages already evicted wait through
the outage and are served from the restarted server, which replays its AOF
(``appendfsync always``: every put wsd was told had succeeded survives a
SIGKILL).  The guest checks every page it reads and, at exit, every page.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis_server import RedisServer
from structlog.testing import capture_logs

from wsd.evictor.outage import MAX_BACKOFF_INTERVALS
from wsd.storage import parse_storage_config
from wsd.testing.outage import (
    INTERVAL,
    PAUSED,
    RESUMED,
    assert_nothing_lost,
    check_punched_pages_are_stored,
    cycles,
    outage_daemon,
    retried_faults,
    start_outage_guest,
    stop_guest,
    until_evicted_now,
    vm_metrics,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

VM = "redis-outage"
DOWN_SECONDS = 4.0  # 20 intervals: a few attempts with backoff, not 20


async def test_redis_down_pauses_eviction_faults_wait_and_nothing_is_lost(
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
    with capture_logs() as logs:
        async with outage_daemon(tmp_path, storage) as d:
            guest = await start_outage_guest(d, VM)
            try:
                s = d.sessions[VM]
                stats = s.ctx.stats
                await wait_until(
                    lambda: stats.evicted_pages >= 1000 and stats.fetched_pages > 0,
                    60,
                    "1000 pages evicted to redis and some fetched back",
                    guest=guest,
                    session=s,
                )
                stored_before = await check_punched_pages_are_stored(d, VM)

                # -- redis dies --------------------------------------------------------
                with guest.suspended():
                    await until_evicted_now(s, guest)  # pages for the faults to wait on
                    await asyncio.to_thread(redis_server.stop, kill=True)
                await wait_until(
                    lambda: stats.storage_failing_since is not None,
                    30,
                    "eviction paused",
                    guest=guest,
                    session=s,
                )
                # A batch stored before the kill may still be committed by the next window.
                await cycles(s, 2)
                evicted_at_pause = stats.evicted_pages
                fetch_errors_at_pause = stats.fetch_errors
                cycle_at_pause = s.tracker.cycles
                await asyncio.sleep(DOWN_SECONDS)
                down_cycles = s.tracker.cycles - cycle_at_pause
                m = await vm_metrics(d, VM)
                assert m["wsd_evict_storage_failing"] == 1
                assert m["wsd_evict_storage_failing_seconds"] >= DOWN_SECONDS
                assert stats.evicted_pages == evicted_at_pause, "evicted while redis was down"
                assert stats.fetch_errors > fetch_errors_at_pause, "no fault hit the outage"
                # Backoff: attempts after 1, 2, 4, 8, 16 intervals, not one per interval.
                assert down_cycles >= 12
                assert 2 <= s.evictor.backoff.failures <= 6, s.evictor.backoff
                paused = [e for e in logs if e["event"] == PAUSED]
                assert len(paused) == 1, paused
                assert paused[0]["vm_id"] == VM and paused[0]["log_level"] == "error"
                assert "redis unavailable" in paused[0]["error"], paused[0]

                # -- redis is back: same directory (AOF), socket and port ---------------
                retried_before = retried_faults(s)
                await asyncio.to_thread(redis_server.start)
                await wait_until(
                    lambda: stats.storage_failing_since is None,
                    (MAX_BACKOFF_INTERVALS + 5) * INTERVAL + 10,
                    "eviction resumed",
                    guest=guest,
                    session=s,
                )
                await wait_until(
                    lambda: retried_faults(s) > retried_before,
                    30,
                    "faults that waited through the outage served",
                    guest=guest,
                    session=s,
                )
                await wait_until(
                    lambda: stats.evicted_pages >= evicted_at_pause + 500,
                    60,
                    "500 more pages evicted after the restart",
                    guest=guest,
                    session=s,
                )
                m = await vm_metrics(d, VM)
                assert m["wsd_evict_storage_failing"] == 0
                assert m["wsd_evict_storage_failing_seconds"] == 0
                resumed = [e for e in logs if e["event"] == RESUMED]
                assert len(resumed) == 1 and resumed[0]["vm_id"] == VM, resumed
                stored_after = await check_punched_pages_are_stored(d, VM)

                report = await stop_guest(s, guest)
            finally:
                guest.close()
            await wait_until(lambda: VM not in d.sessions, 60, "the session drained")
    print(
        f"\n{VM}: stored before the kill {stored_before}, after the restart {stored_after}, "
        f"evicted {stats.evicted_pages}, fetched {stats.fetched_pages}, fetch errors "
        f"{stats.fetch_errors}, failed batches {stats.failed_batches}, "
        f"retried faults {retried_faults(s)}, guest ops {report['ops']}"
    )
    assert_nothing_lost(report, stats)
    # Drained: every page came back, and then every stored copy was discarded.
    assert all(t.state.evicted_pages == 0 for t in s.tracker.regions)
    with redis_server.client() as client:
        assert client.dbsize() == 0
