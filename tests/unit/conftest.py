"""Fixtures shared by the unit tests."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from wsd.tracker import state as state_module


@pytest.fixture
def idle_counting_threads(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The thread of every count of idle ages (``_count_idle``) from here on."""
    counted: list[threading.Thread] = []
    count = state_module._count_idle

    def spy(*args: Any) -> Any:
        counted.append(threading.current_thread())
        return count(*args)

    monkeypatch.setattr(state_module, "_count_idle", spy)
    return counted
