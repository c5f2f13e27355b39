"""Eviction and fault service: cold pages out to a storage tier, touched pages back.

Policy (:mod:`.policy`) picks pages; :mod:`.evictor` runs the batch
transaction inside the tracker's sync window; :mod:`.faults` serves MISSING
faults; :mod:`.pagemap` persists which pages live in storage.  Nothing here
calls ioctl directly: every kernel operation goes through :mod:`wsd.kernel`.

Only the configuration is exported here; the rest is imported from its
module (``wsd.evictor.evictor``, ``.context``, ``.faults``), so that reading
the configuration does not load numpy and the kernel layer.
"""

from .config import EvictorConfig, OnDeadline

__all__ = ["EvictorConfig", "OnDeadline"]
