from __future__ import annotations

import errno

import pytest

from wsd.kernel import AddressRange, FeatureUnavailable, KernelError, oserror


def test_error_names_operation_errno_and_range() -> None:
    e = oserror("UFFDIO_RWPROTECT", errno.EINVAL, range=AddressRange(0x200000, 0x1000), fd=5)
    assert isinstance(e, OSError) and e.errno == errno.EINVAL
    assert str(e) == (
        "[Errno 22] UFFDIO_RWPROTECT failed: EINVAL: Invalid argument"
        " (range [0x200000, 0x201000), fd 5)"
    )
    assert e.range == AddressRange(0x200000, 0x1000) and e.op == "UFFDIO_RWPROTECT"


@pytest.mark.parametrize(
    ("err", "builtin"),
    [
        (errno.EEXIST, FileExistsError),
        (errno.ESRCH, ProcessLookupError),
        (errno.EPERM, PermissionError),
        (errno.EAGAIN, BlockingIOError),
        (errno.ENOENT, FileNotFoundError),
    ],
)
def test_error_is_also_the_builtin_subclass(err: int, builtin: type[OSError]) -> None:
    e = oserror("UFFDIO_COPY", err)
    assert isinstance(e, builtin) and isinstance(e, KernelError)
    with pytest.raises(builtin):
        raise e


def test_feature_unavailable_says_what_to_get() -> None:
    e = FeatureUnavailable("userfaultfd RWP", "Linux 7.3 with CONFIG_USERFAULTFD_RWP=y")
    assert isinstance(e, KernelError)
    assert str(e) == (
        "userfaultfd RWP is not available (ENOTSUP: Operation not supported); "
        "needs Linux 7.3 with CONFIG_USERFAULTFD_RWP=y"
    )
    assert e.strerror == str(e)


def test_range_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        AddressRange(-1, 10)
    assert AddressRange(0x1000, 0x2000).end == 0x3000
