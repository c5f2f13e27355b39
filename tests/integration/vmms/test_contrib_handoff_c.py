"""contrib/handoff-c/handoff.c, the hand-off in C for VMM authors, against a real wsd."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from vmms_harness import Wsd, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a uffd for kernel faults needs root"),
]
EXAMPLE = Path(__file__).parents[3] / "contrib" / "handoff-c" / "handoff.c"
SIZE_MIB = 32


def test_the_c_example_hands_off_and_gets_every_page_back(wsd: Wsd, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (tools/bootstrap.sh installs it)")
    binary = tmp_path / "handoff"
    # -Werror: the example must compile cleanly as VMM authors will copy it.
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(EXAMPLE)], check=True
    )
    proc = subprocess.Popen(
        [str(binary), str(wsd.socket), "c-vmm", str(SIZE_MIB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        reply = proc.stdout.readline()
        assert '"type": "accepted"' in reply and '"vm_id": "c-vmm"' in reply, reply
        # Every page was written once and then left idle: wsd evicts them.
        wait_for(
            lambda: (wsd.vm("c-vmm") or {}).get("evicted_bytes", 0) >= (SIZE_MIB << 20) // 2,
            "half the memory evicted",
            timeout=60,
        )
        out, _ = proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert out.strip() == f"ok {SIZE_MIB << 20} bytes verified"
