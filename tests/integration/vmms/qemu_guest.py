"""A small Linux guest under QEMU (TCG) with memfd-backed RAM, for the wsd attach test.

The initramfs holds busybox and ``memtest.c`` (static); its init runs memtest
on the serial console, which QEMU connects to its stdin and stdout.  The kernel
is the Linux 7.3 image vmtest installs (``make vm-shell`` fetches it once).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).parent

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox echo "MEMTEST BOOTED $(/bin/busybox grep MemTotal /proc/meminfo)"
exec /memtest {mib} </dev/ttyS0 >/dev/ttyS0 2>&1
"""


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One entry of a ``newc`` cpio archive (the initramfs format)."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initramfs(dest: Path, *, memtest: Path, busybox: Path, mib: int) -> Path:
    files = [
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("memtest", 0o100755, memtest.read_bytes()),
        ("init", 0o100755, INIT.format(mib=mib).encode()),
    ]
    out = b"".join(_cpio_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(files))
    out += _cpio_entry("TRAILER!!!", 0, b"", 0)
    dest.write_bytes(out)
    return dest


def compile_memtest(dest: Path) -> Path:
    gcc = shutil.which("gcc")
    assert gcc is not None
    subprocess.run(
        [gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(dest), str(HERE / "memtest.c")],
        check=True,
    )
    return dest


class QemuGuest:
    """``qemu-system-x86_64`` with ``-object memory-backend-memfd,...,share=on``."""

    def __init__(self, kernel: Path, initrd: Path, *, ram_mib: int, log: Path) -> None:
        self.ram = ram_mib << 20
        self.argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={ram_mib}M,share=on",
            "-m", f"{ram_mib}M",
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet rdinit=/init",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot",
        ]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log
        )
        self.pid = self.proc.pid
        self._buf = b""

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The next console line starting with ``prefix`` (every line is logged)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                self.log.write(line + "\n")
                self.log.flush()
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no console line {prefix!r} within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"QEMU exited ({self.proc.wait()}) before {prefix!r}")
                self._buf += chunk

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        self.log.close()
