"""Shared pytest setup for every tier."""

from __future__ import annotations

import os

import pytest

# Inside the Linux 7.3 test VM (vmtest sets this) a test that skips because a
# kernel feature is missing has not tested anything: count it as a failure.
STRICT = os.environ.get("WSD_KERNEL_TESTS_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.get_closest_marker("kernel"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped inside the test VM, which counts as a failure: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests (minutes long) run only when asked for: ``-m soak``."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
