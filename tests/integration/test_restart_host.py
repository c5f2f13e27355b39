"""wsd SIGKILLed again and again while it evicts, and no guest page lost (host, wp-async).

See :mod:`wsd.testing.crash`.  ``-m soak`` runs the long variant (10 minutes,
at least 20 kills).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from wsd.testing.crash import CONFIG, check, crash_soak
from wsd.testing.puppet_vmm import PuppetVMM
from wsd.testing.supervisor import Supervisor

pytestmark = pytest.mark.integration


def test_sigkill_during_eviction_loses_no_page(tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=8))


def test_without_systemd_the_vmm_reattaches_and_loses_no_page(tmp_path: Path) -> None:
    result = crash_soak(tmp_path, kills=5, reattach=True)
    check(result)
    # The pipes of wp-async's verified punches waited out each kill in the guest.
    assert result.pipes_given_back > 0, result


@pytest.mark.soak
def test_sigkill_soak_ten_minutes(tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=20, seconds=600, gap=(1.0, 20.0)))


@pytest.mark.soak
def test_without_systemd_soak_ten_minutes(tmp_path: Path) -> None:
    result = crash_soak(tmp_path, kills=20, seconds=600, gap=(1.0, 20.0), reattach=True)
    check(result)
    assert result.pipes_given_back > 0, result


def test_a_region_the_vmm_unmapped_stays_detached_after_a_restart(tmp_path: Path) -> None:
    """The description records the unmap, so the resume does not arm a range that is gone."""
    cfg = tmp_path / "wsd.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path, interval=0.2, mode=""))
    sup = Supervisor([sys.executable, "-m", "wsd", "run", "--config", str(cfg)], tmp_path)
    try:
        sup.start()
        with PuppetVMM.spawn(4 << 20, handoff=tmp_path / "wsd.sock", vm_id="gone") as p:
            session = tmp_path / "state" / "gone.session.json"
            p.call("unmap")
            deadline = time.monotonic() + 30
            while '"vanished": [\n    "' not in session.read_text():
                assert time.monotonic() < deadline, session.read_text()
                time.sleep(0.1)
            sup.kill()
            sup.start()
            log = (tmp_path / "service.log").read_text()
            assert '"session resumed"' in log, log[-3000:]
            assert "resuming a stored session failed" not in log
        assert sup.stop() == 0
    finally:
        sup.close()
