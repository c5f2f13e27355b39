"""The zstd tier's in-memory layout, for tests that inspect or damage it."""

from __future__ import annotations

from wsd.storage import PageNamespace
from wsd.storage.record import SealedRecord
from wsd.storage.zstd_store import ZstdStore


def record_at(store: ZstdStore, ns: PageNamespace, offset: int) -> SealedRecord:
    """The record stored for a page (an entry is its six fields, then when it was stored)."""
    return SealedRecord._make(store._regions[ns.key][offset][: len(SealedRecord._fields)])


def replace_record(store: ZstdStore, ns: PageNamespace, offset: int, record: SealedRecord) -> None:
    """Put ``record`` in place of a stored page's, keeping when it was stored."""
    entry = store._regions[ns.key][offset]
    store._regions[ns.key][offset] = (*record, entry[-1])
