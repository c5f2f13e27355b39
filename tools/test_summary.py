"""Print per-tier test counts from pytest junit reports, then one closing line.

A missing report counts as a failed tier: it means the tier never ran.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(report: Path) -> tuple[int, int, int]:
    """Return (passed, failed, skipped) for one junit file."""
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = skipped = 0
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    total = [0, 0, 0]
    status = 0
    for arg in argv:
        path = Path(arg)
        if not path.exists():
            print(f"  {path.stem:<12} no report (tier did not run)")
            total[1] += 1
            status = 1
            continue
        p, f, s = counts(path)
        print(f"  {path.stem:<12} {p:5d} passed {f:5d} failed {s:5d} skipped")
        total = [total[0] + p, total[1] + f, total[2] + s]
        status |= f > 0
    print(f"{total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
