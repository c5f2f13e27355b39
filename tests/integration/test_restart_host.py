"""wsd killed with SIGKILL again and again while it evicts, and no guest page lost.

A ``wsd run`` process runs under :class:`~wsd.testing.supervisor.Supervisor`
(a stand-in for systemd's fd store) with the file tier and a state directory,
evicting everything idle for one interval.  ``wsd guest`` hammers its
self-checking pages on three threads the whole time.  wsd is killed at random
moments, so some kills land in the middle of an eviction batch, and
restarted; each restart must resume the session from the stored fds, the
session description and the page map, and serve the faults that queued while
no wsd ran.  At the end the guest re-reads and checks every page.

Runs natively on the host kernel (wp-async mode).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsd.evictor import pagemap
from wsd.guest.process import GuestProcess
from wsd.testing.supervisor import Supervisor

pytestmark = pytest.mark.integration

CONFIG = """\
[daemon]
socket = "{tmp}/wsd.sock"
control_socket = "{tmp}/control.sock"
interval_seconds = 0.2
state_dir = "{tmp}/state"
log_format = "json"

[storage]
kind = "file"
root = "{tmp}/pages"

[evictor]
min_idle_cycles = 1
max_idle_cycles = 1
max_pages_per_window = 1024
batch_pages = 128
promotion_target_percent_per_minute = 0.0001
prefetch_pages = 8

[metrics]
enabled = false
"""


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervisor]:
    cfg = tmp_path / "wsd.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))
    sup = Supervisor([sys.executable, "-m", "wsd", "run", "--config", str(cfg)], tmp_path)
    try:
        yield sup
    finally:
        sup.close()


def evicted_in_map(state: Path, vm_id: str) -> int:
    path = pagemap.path_for(state, vm_id)
    if not path.exists():
        return 0
    return sum(len(r.pages) for r in pagemap.load(path).regions)


def test_sigkill_during_eviction_loses_no_page(supervised: Supervisor, tmp_path: Path) -> None:
    sup = supervised
    sup.start()
    guest = GuestProcess.start(
        [
            "--socket",
            str(tmp_path / "wsd.sock"),
            "--vm-id",
            "crashy",
            "--size",
            "32M",
            "--threads",
            "3",
            "--pattern",
            "zipf",
            "--zipf-s",
            "1.3",
            "--write-ratio",
            "0.5",
            "--thp",
            "never",
        ]
    )
    rng = random.Random()
    kills = 0
    in_storage_at_kill = []
    try:
        time.sleep(3)
        for _ in range(8):
            time.sleep(rng.uniform(0.3, 2.0))
            sup.kill()
            kills += 1
            in_storage_at_kill.append(evicted_in_map(tmp_path / "state", "crashy"))
            assert sorted(sup.stored_names()) == [
                "wsd.crashy.mem0",
                "wsd.crashy.uffd",
            ], sup.stored_names()
            sup.start()
        time.sleep(2)
        assert guest.proc.poll() is None, guest.stderr()
        # The final check reads every page back: wsd must be serving.
        assert guest.stop(300) == 0, guest.stderr()
    finally:
        guest.close()
    report = guest.report()
    log = (tmp_path / "service.log").read_text()
    print(
        f"\nkills={kills} pages in storage at each kill={in_storage_at_kill} "
        f"resumed={log.count('session resumed')} guest ops={report['ops']} "
        f"pages verified at exit={report['final_check_pages']}"
    )
    assert report["verify_errors"] == 0 and report["unverified"] == 0
    assert report["final_check_pages"] == report["pages"]
    assert log.count('"session resumed"') == kills, log[-4000:]
    assert sum(1 for n in in_storage_at_kill if n > 0) >= kills // 2, in_storage_at_kill
    # A clean stop drains the session and empties the store.
    assert sup.stop() == 0
    assert sup.stored_names() == []
    assert not list((tmp_path / "state").glob("crashy.*"))
