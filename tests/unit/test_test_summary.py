from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "test_summary", Path(__file__).parents[2] / "tools" / "test_summary.py"
)
assert SPEC and SPEC.loader
summary = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summary)


def test_counts_and_closing_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "unit.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>'
    )
    assert summary.main([str(tmp_path / "unit.xml"), str(tmp_path / "kernel.xml")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "no report" in out[1]
    assert out[-1] == "3 passed, 2 failed, 1 skipped"
