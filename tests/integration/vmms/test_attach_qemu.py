"""End to end: ``wsd attach`` to a real, unmodified QEMU booting Linux, on the host kernel.

QEMU (TCG) runs Linux 7.3 with 384 MiB of memfd-backed RAM; the guest's init
fills 256 MiB with a known pattern (``memtest.c``).  Then ``wsd attach`` adopts
QEMU, wsd evicts until at most half of guest RAM is left in the memfd, and
the guest re-reads all its memory (every evicted page comes back through a
userfaultfd fault) and reports over the serial console.  After ``wsd attach``
is stopped (wsd puts every page back) the guest checks once more.  The
numbers are printed (``pytest -s``).  Takes a minute or two.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu_guest import QemuGuest, build_initramfs, compile_memtest
from vmms_harness import Attach, Wsd, wait_for
from vmms_harness import memfd_resident as harness_memfd_resident

from vmtest.kernel import Layout, cached_kernel, kernel_image

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and pidfd_getfd of QEMU"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="wsd attach is x86_64 only"),
]
RAM_MIB = 384
FILL_MIB = 256
MIB = 1 << 20


def guest_kernel() -> Path:
    if "WSD_ATTACH_KERNEL" in os.environ:
        return Path(os.environ["WSD_ATTACH_KERNEL"])
    layout = Layout.from_env()
    kernel = cached_kernel(layout)
    if kernel is None:
        # On a fresh machine the integration tier runs before the kernel tier
        # has fetched Linux 7.3: fetch it here (idempotent, cached).
        subprocess.run([sys.executable, "-m", "vmtest", "ensure"], check=True, timeout=1800)
        kernel = cached_kernel(layout)
    image = kernel_image(layout, kernel.abi) if kernel else None
    if image is None or not image.exists():
        pytest.fail(f"vmtest ensure left no guest kernel image ({image})")
    return image


def memfd_resident(pid: int) -> int:
    """Bytes of QEMU's guest-RAM memfd that hold data (wsd punches evicted pages out)."""
    return harness_memfd_resident(pid, "/memfd:memory-backend-memfd")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_wsd_attach_reclaims_half_of_a_qemu_guest_and_the_guest_verifies_it(
    wsd: Wsd, tmp_path: Path
) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("gcc") is None:
        pytest.skip("qemu-system-x86 and gcc are needed (tools/bootstrap.sh installs them)")
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is needed (tools/bootstrap.sh installs it)")
    kernel = guest_kernel()
    initrd = build_initramfs(
        tmp_path / "initrd.cpio",
        memtest=compile_memtest(tmp_path / "memtest"),
        busybox=Path(busybox),
        mib=FILL_MIB,
    )
    qemu = QemuGuest(kernel, initrd, ram_mib=RAM_MIB, log=tmp_path / "console.log")
    numbers: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        qemu.wait_line("MEMTEST BOOTED", timeout=300)
        filled = qemu.wait_line("MEMTEST FILLED", timeout=300)
        numbers["boot_and_fill_s"] = time.monotonic() - t0
        checksum = filled.split("checksum=")[1].split()[0]
        numbers["resident_before_mib"] = memfd_resident(qemu.pid) / MIB
        numbers["rss_before_mib"] = rss(qemu.pid) / MIB
        assert numbers["resident_before_mib"] >= FILL_MIB

        attach = Attach(qemu.pid, wsd.socket, "--vm-id", "qemu")
        line = attach.first_line(timeout=60)
        assert f"qemu: wsd tracks {RAM_MIB}.0 MiB of pid {qemu.pid}" in line, line
        t1 = time.monotonic()
        wait_for(
            lambda: memfd_resident(qemu.pid) <= qemu.ram // 2, "half of guest RAM evicted", 300
        )
        numbers["evict_half_s"] = time.monotonic() - t1
        time.sleep(2)  # let it go on a little: the figures below are after the half
        numbers["resident_evicted_mib"] = memfd_resident(qemu.pid) / MIB
        numbers["rss_evicted_mib"] = rss(qemu.pid) / MIB
        vm = wsd.vm("qemu")
        assert vm is not None
        numbers["wsd_evicted_mib"] = vm["evicted_bytes"] / MIB
        assert qemu.running()

        qemu.send("verify")
        ok = qemu.wait_line("MEMTEST VERIFY", timeout=600)
        assert ok.startswith("MEMTEST VERIFY OK") and f"checksum={checksum}" in ok, ok
        numbers["verify_s"] = float(ok.split("seconds=")[1])
        vm = wsd.vm("qemu")
        assert vm is not None
        numbers["wsd_fetched_mib"] = vm["fetched_bytes_total"] / MIB
        numbers["resident_after_verify_mib"] = memfd_resident(qemu.pid) / MIB

        code, err = attach.stop()
        assert code == 130, err
        wsd.wait_session_closed("qemu")
        numbers["resident_after_detach_mib"] = memfd_resident(qemu.pid) / MIB
        # Every evicted page is back in the memfd (the guest only added some).
        assert numbers["resident_after_detach_mib"] >= numbers["resident_before_mib"]
        qemu.send("verify")
        again = qemu.wait_line("MEMTEST VERIFY", timeout=300)
        assert again.startswith("MEMTEST VERIFY OK") and f"checksum={checksum}" in again, again
        assert qemu.running()
    finally:
        qemu.stop()
        print(
            "\nwsd attach to QEMU (TCG, Linux guest, "
            f"{RAM_MIB} MiB memfd RAM, {FILL_MIB} MiB filled by the guest):\n"
            + "\n".join(f"  {k:28} {v:8.1f}" for k, v in numbers.items())
        )
    assert numbers["resident_evicted_mib"] <= RAM_MIB / 2
