"""Working-set tracking policy: which pages are hot, which are cold.

Nothing here calls ioctl; it drives :mod:`wsd.kernel`.  The modes are named
here, without the kernel layer, so that the configuration can name one
without loading it; :mod:`.mode` chooses among them.
"""

from __future__ import annotations

import enum

__all__ = ["TrackingMode"]


class TrackingMode(enum.StrEnum):
    RWP = "rwp"
    WP_ASYNC = "wp-async"
