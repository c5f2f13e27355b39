"""A second process that maps a guest memfd, as a vhost-user backend or virtiofsd does.

Its mapping is not registered with wsd's uffd: a page wsd punched reads as a
fresh zero page there.  Started by :class:`MemfdMapper`; it maps the memfd
(an inherited fd, or a path such as ``/proc/<vmm>/fd/<n>``), says
``mapped``, then reads pages on request (``read FIRST COUNT``) and answers
with each page's version (``puppet_vmm.page_pattern``): ``-1`` for zeros,
``null`` for anything that is not that page's pattern.  It touches nothing
until asked, so it finds no hole before wsd had its chance to react.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
from typing import Self

from wsd.testing.puppet_vmm import DISCARDED, decode_page


class MemfdMapper:
    """Handle on a running mapper process; ``close()`` (or the ``with`` block) ends it."""

    def __init__(self, memfd: int | str, size: int, page_size: int = mmap.PAGESIZE) -> None:
        cmd = [sys.executable, "-m", "wsd.testing.mapper", "--size", str(size)]
        cmd += ["--page-size", str(page_size)]
        pass_fds: tuple[int, ...] = ()
        if isinstance(memfd, int):
            cmd += ["--fd", str(memfd)]
            pass_fds = (memfd,)
        else:
            cmd += ["--path", memfd]
        self.proc = subprocess.Popen(
            cmd, pass_fds=pass_fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        line = self._out.readline()
        if line != b"mapped\n":
            self.close()
            raise RuntimeError(f"the mapper did not map the memfd: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, first: int, count: int) -> list[int | None]:
        """Versions of pages ``first .. first+count`` as this process's mapping sees them."""
        self._in.write(f"read {first} {count}\n".encode())
        self._in.flush()
        result: list[int | None] = json.loads(self._out.readline())
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()  # reaps it and closes the pipes

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(index: int, data: bytes, page_size: int) -> int | None:
    if not any(data):
        return DISCARDED
    found = decode_page(data, page_size)
    return found[1] if found is not None and found[0] == index else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fd", type=int)
    ap.add_argument("--path")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--page-size", type=int, default=mmap.PAGESIZE)
    a = ap.parse_args()
    fd = a.fd if a.fd is not None else os.open(a.path, os.O_RDWR)
    m = mmap.mmap(fd, a.size, flags=mmap.MAP_SHARED)
    print("mapped", flush=True)
    ps = a.page_size
    for line in sys.stdin:
        _, first, count = line.split()
        pages = range(int(first), int(first) + int(count))
        out = [_version(p, m[p * ps : (p + 1) * ps], ps) for p in pages]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
