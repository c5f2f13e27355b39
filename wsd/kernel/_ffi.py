"""The uAPI declarations (``wsd.kernel._uapi``, see ``_uapi_build.py``) and libc.

Nothing outside wsd/kernel imports this module.
"""

from __future__ import annotations

from typing import Any

from . import _uapi

ffi: Any = _uapi.ffi
libc: Any = ffi.dlopen(None)
