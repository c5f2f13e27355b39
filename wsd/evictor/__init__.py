"""Eviction and fault service: cold pages out to a storage tier, touched pages back.

Policy (:mod:`.policy`) picks pages; :mod:`.evictor` runs the batch
transaction inside the tracker's sync window; :mod:`.faults` serves MISSING
faults; :mod:`.pagemap` persists which pages live in storage.  Nothing here
calls ioctl directly: every kernel operation goes through :mod:`wsd.kernel`.
"""

from .config import EvictorConfig, OnDeadline
from .context import EvictorStats, VmContext
from .evictor import Evictor, unevictable_reason
from .faults import FaultService

__all__ = [
    "Evictor",
    "EvictorConfig",
    "EvictorStats",
    "FaultService",
    "OnDeadline",
    "VmContext",
    "unevictable_reason",
]
