"""The kernel boundary: the only code in wsd that issues syscalls and ioctls.

Thin, typed and free of policy.  Failures raise :class:`KernelError` (an
``OSError`` naming the operation, errno and range) or
:class:`FeatureUnavailable` (naming the kernel that would provide it).
"""

from .errors import AddressRange, FeatureUnavailable, KernelError, oserror
from .fds import FdInfo, FdKind, OwnedFd, close_fds, describe_fd
from .features import KernelFeatures, RegisterProbe, probe_kernel
from .memfd import (
    data_ranges,
    map_shared,
    memfd_create,
    pread,
    pread_into,
    pread_pages,
    punch_hole,
    pwrite,
    unreserved_huge_page_count,
)
from .pagemap import REGION_DTYPE, PageCategory, Pagemap, ScanFlag, ScanResult
from .pidfd import pidfd_getfd, pidfd_open, process_start_ticks
from .pins import HeldPages, PipePool, empty_pipe, peek_pipe
from .procfs import (
    FileId,
    UringBuffers,
    effective_uid,
    file_id,
    io_uring_buffers,
    mappers_of,
    pinned_bytes,
)
from .sched import set_thread_nice, thread_nice
from .scm import recv_with_fds, send_with_fds
from .uffd import (
    MSG_SIZE,
    ApiResult,
    EventType,
    FaultFlag,
    Feature,
    ForkEvent,
    Ioctl,
    OpenFlag,
    PageFault,
    RegisterMode,
    RemapEvent,
    RemoveEvent,
    UffdMessage,
    UnmapEvent,
    Userfaultfd,
    decode_messages,
    feature_requirement,
    open_userfaultfd,
    probe_api,
    require_features,
)

__all__ = [
    "MSG_SIZE",
    "REGION_DTYPE",
    "AddressRange",
    "ApiResult",
    "EventType",
    "FaultFlag",
    "FdInfo",
    "FdKind",
    "Feature",
    "FeatureUnavailable",
    "FileId",
    "ForkEvent",
    "HeldPages",
    "Ioctl",
    "KernelError",
    "KernelFeatures",
    "OpenFlag",
    "OwnedFd",
    "PageCategory",
    "PageFault",
    "Pagemap",
    "PipePool",
    "RegisterMode",
    "RegisterProbe",
    "RemapEvent",
    "RemoveEvent",
    "ScanFlag",
    "ScanResult",
    "UffdMessage",
    "UnmapEvent",
    "UringBuffers",
    "Userfaultfd",
    "close_fds",
    "data_ranges",
    "decode_messages",
    "describe_fd",
    "effective_uid",
    "empty_pipe",
    "feature_requirement",
    "file_id",
    "io_uring_buffers",
    "map_shared",
    "mappers_of",
    "memfd_create",
    "open_userfaultfd",
    "oserror",
    "peek_pipe",
    "pidfd_getfd",
    "pidfd_open",
    "pinned_bytes",
    "pread",
    "pread_into",
    "pread_pages",
    "probe_api",
    "probe_kernel",
    "process_start_ticks",
    "punch_hole",
    "pwrite",
    "recv_with_fds",
    "require_features",
    "send_with_fds",
    "set_thread_nice",
    "thread_nice",
    "unreserved_huge_page_count",
]
