"""Check the fds of a hand-off against its message, before wsd trusts any of them."""

from __future__ import annotations

from wsd.kernel import FdInfo, FdKind, KernelError, describe_fd

from .protocol import ErrorCode, HandoffError, HandoffRequest


def check_fds(req: HandoffRequest, fds: list[int]) -> dict[int, FdInfo]:
    """Map fd_index → what it is; raise HandoffError naming the first bad fd."""
    want = req.fd_count
    if len(fds) != want:
        raise HandoffError(
            ErrorCode.BAD_FDS,
            f"message references fd_index 0..{want - 1} ({want} fds) but {len(fds)} "
            f"{'was' if len(fds) == 1 else 'were'} attached",
            "fds",
        )
    used = {req.uffd.fd_index, *req.held} | {r.fd_index for r in req.regions}
    unused = sorted(set(range(want)) - used)
    if unused:
        raise HandoffError(ErrorCode.BAD_FDS, f"fd_index {unused[0]} is attached but unused", "fds")
    infos: dict[int, FdInfo] = {}
    for index, fd in enumerate(fds):
        try:
            infos[index] = describe_fd(fd)
        except KernelError as e:
            raise HandoffError(ErrorCode.BAD_FDS, f"fd_index {index}: {e.strerror}", "fds") from e
    uffd = infos[req.uffd.fd_index]
    if uffd.kind is not FdKind.USERFAULTFD:
        raise HandoffError(
            ErrorCode.BAD_FDS,
            f"uffd.fd_index {req.uffd.fd_index} is a {uffd.kind} ({uffd.target}), "
            "not a userfaultfd",
            "uffd.fd_index",
        )
    if uffd.blocking:
        # The event loop reads it until it is empty: on a blocking uffd that
        # last read would wait, and every VM's faults with it.  Setting
        # O_NONBLOCK here would change the VMM's copy too (one open file).
        raise HandoffError(
            ErrorCode.BAD_FDS,
            f"uffd.fd_index {req.uffd.fd_index} is a blocking userfaultfd; create it with "
            "O_NONBLOCK (userfaultfd(O_CLOEXEC | O_NONBLOCK))",
            "uffd.fd_index",
        )
    for i, r in enumerate(req.regions):
        info = infos[r.fd_index]
        where = f"regions[{i}]"
        if info.kind not in (FdKind.MEMFD, FdKind.MEMFD_HUGETLB):
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"{where}.fd_index {r.fd_index} is a {info.kind} ({info.target}), not a memfd",
                f"{where}.fd_index",
            )
        if not info.read_write or info.write_sealed:
            # wsd reads pages through the memfd and punches evicted ones out of it.
            why = "sealed against writes" if info.read_write else "not open for reading and writing"
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"{where}.fd_index {r.fd_index} is a memfd {why}; wsd reads pages through it "
                "and punches evicted ones out, so it must be O_RDWR without F_SEAL_WRITE or "
                "F_SEAL_FUTURE_WRITE",
                f"{where}.fd_index",
            )
        if r.offset + r.size > info.size:
            raise HandoffError(
                ErrorCode.BAD_REGION,
                f"{where} ends at offset {r.offset + r.size:#x}, past the end of its memfd "
                f"({info.size:#x} bytes)",
                where,
            )
        huge = info.kind is FdKind.MEMFD_HUGETLB
        if huge != r.hugetlb:
            raise HandoffError(
                ErrorCode.BAD_REGION,
                f"{where}.page_size is {r.page_size} but its memfd is "
                f"{'hugetlbfs' if huge else 'backed by 4 KiB pages'}",
                f"{where}.page_size",
            )
    for k, index in enumerate(req.held):
        info = infos[index]
        if info.kind is not FdKind.PIPE:
            raise HandoffError(
                ErrorCode.BAD_FDS,
                f"held[{k}] (fd_index {index}) is a {info.kind} ({info.target}), not a pipe "
                "wsd gave the VMM to keep",
                f"held[{k}]",
            )
    return infos
