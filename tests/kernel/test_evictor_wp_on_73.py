"""The degraded mode on Linux 7.3: wp-async forced where rwp is available.

The same daemon and hammer as the rwp tests, with ``mode = "wp-async"``: the
verified punch must lose nothing on the newest kernel too, and the numbers
sit beside the rwp ones in the same VM run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsd.daemon import Settings
from wsd.kernel import Feature
from wsd.storage import FileStoreConfig
from wsd.testing.hammer import AGGRESSIVE, hammer
from wsd.testing.running import running_daemon
from wsd.tracker.mode import TrackingMode

pytestmark = pytest.mark.asyncio


async def test_nothing_lost_4k_shmem_forced_wp_async(
    rwp_supported: Feature, tmp_path: Path
) -> None:
    settings = Settings(
        socket=tmp_path / "wsd.sock",
        interval=0.3,
        mode=TrackingMode.WP_ASYNC,
        storage=FileStoreConfig(root=tmp_path / "pages"),
        evictor=AGGRESSIVE,
        state_dir=tmp_path / "state",
    )
    async with running_daemon(settings) as d:
        assert d.decision.mode is TrackingMode.WP_ASYNC
        c = await hammer(d, "wp-on-73", "32M", 10, "--thp", "never", "--zipf-s", "1.3")
    assert c["mode"] == "wp-async"
