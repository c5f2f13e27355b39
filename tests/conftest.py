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
