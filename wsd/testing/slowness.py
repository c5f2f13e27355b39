"""How much longer tests wait when they run in vmtest's 7.3 VM.

The VM runs under TCG on the development machines: there a Python start-up
takes tens of seconds and a fetch-back milliseconds, so a wait sized for a
host would fail on a healthy run.  The helpers that wait
(:mod:`wsd.testing.daemon_process`) scale their timeouts with :func:`patient`;
a test passes the timeout a host needs.
"""

from __future__ import annotations

import os
from typing import Final

GUEST_ENV_VAR: Final = "WSD_VMTEST_GUEST"
"""Set to ``1`` in every command vmtest runs in its VM (``vmtest.session.GUEST_ENV``)."""

VM_TIME_SCALE: Final = 10.0


def in_test_vm() -> bool:
    """Whether this process runs inside vmtest's VM."""
    return os.environ.get(GUEST_ENV_VAR) == "1"


def patient(seconds: float) -> float:
    """``seconds`` as long as this machine needs them to be."""
    return seconds * VM_TIME_SCALE if in_test_vm() else seconds
