"""wsd SIGKILLed again and again while it evicts, and no guest page lost (host, wp-async).

See :mod:`wsd.testing.crash`.  ``-m soak`` runs the long variant (10 minutes,
at least 20 kills).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsd.testing.crash import check, crash_soak

pytestmark = pytest.mark.integration


def test_sigkill_during_eviction_loses_no_page(tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=8))


def test_without_systemd_the_vmm_reattaches_and_loses_no_page(tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=5, reattach=True))


@pytest.mark.soak
def test_sigkill_soak_ten_minutes(tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=20, seconds=600, gap=(1.0, 20.0)))
