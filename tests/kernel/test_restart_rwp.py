"""wsd SIGKILLed again and again while it evicts in rwp mode, and no guest page lost.

Kills land anywhere, including inside a sync window: the restarted wsd must
put the uffd back in async mode (releasing vCPUs blocked on RWP faults),
re-raise faults the dead wsd had read, and resume from the page map.  See
:mod:`wsd.testing.crash`; ``-m soak`` runs the 10-minute variant.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsd.kernel import Feature
from wsd.testing.crash import check, crash_soak

pytestmark = pytest.mark.kernel


def test_sigkill_in_rwp_mode_loses_no_page(rwp_supported: Feature, tmp_path: Path) -> None:
    # Each restart costs about a minute under TCG (Python start-up): 3 kills.
    check(crash_soak(tmp_path, kills=3, gap=(1.0, 4.0), interval=0.3, ready_timeout=300))


@pytest.mark.soak
def test_sigkill_soak_rwp_ten_minutes(rwp_supported: Feature, tmp_path: Path) -> None:
    check(crash_soak(tmp_path, kills=20, seconds=600, gap=(2.0, 25.0), interval=0.3))
