"""What a failed crash soak prints of wsd's log: its problems, each traceback's end."""

from __future__ import annotations

import json

from wsd.testing.crash import log_problems


def test_a_json_error_keeps_the_end_of_its_traceback() -> None:
    trace = "Traceback (most recent call last):\n" + '  File "a.py", line 1, in f\n    g()\n' * 40
    trace += '  File "resume.py", line 173, in adopt\n    t.listed_resident = restore()\n'
    trace += "ValueError: page map pages must be ascending and unique"
    error = {"level": "error", "event": "resuming a stored session failed", "exception": trace}
    info = {"level": "info", "event": "session resumed"}
    text = "\n".join([json.dumps(info), json.dumps(error), "[warning] console line"])
    problems = log_problems(text)
    assert len(problems) == 2
    assert problems[0].startswith('{"level": "error", "event": "resuming a stored session failed"}')
    assert problems[0].endswith(
        "t.listed_resident = restore() | ValueError: page map pages must be ascending and unique"
    )
    assert problems[1] == "[warning] console line"


def test_at_most_limit_lines() -> None:
    text = "\n".join(json.dumps({"level": "warning", "n": n}) for n in range(50))
    assert len(log_problems(text, limit=40)) == 40
