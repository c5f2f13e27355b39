"""Page identity, results and statistics shared by every backend."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from wsd.storage.errors import InvalidPage


class BackendKind(enum.StrEnum):
    """The key of the backend registry, and the ``kind`` of a ``[storage]`` table."""

    FILE = "file"
    ZSTD = "zstd"
    REDIS = "redis"
    TIERED = "tiered"


SMALL_PAGE: Final = 4096
HUGE_PAGE_2M: Final = 2 * 1024 * 1024
MAX_PAGE_SIZE: Final = 1024 * 1024 * 1024

# The VM id becomes a directory name and part of a Redis key, so it is restricted to
# characters that need no escaping in either (no "/", no "{" that would change the
# Redis Cluster hash tag, no leading dot).
VM_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class PageNamespace:
    """Where a page lives: one region of one VM, with that region's page size.

    Two namespaces that differ in ``vm_id`` or ``region`` never share a page, in any
    backend: the pair is part of every file path, Redis key and checksum seed.
    """

    vm_id: str
    region: int
    page_size: int = SMALL_PAGE

    def __post_init__(self) -> None:
        if not VM_ID_PATTERN.fullmatch(self.vm_id):
            raise ValueError(
                f"vm_id {self.vm_id!r} must match {VM_ID_PATTERN.pattern} "
                "(it is used in file names and Redis keys)"
            )
        if self.region < 0 or self.region >= 1 << 63:
            raise ValueError(f"region {self.region} must be in [0, 2**63)")
        size = self.page_size
        if size < SMALL_PAGE or size > MAX_PAGE_SIZE or size & (size - 1):
            raise ValueError(f"page_size {size} must be a power of two from 4 KiB to 1 GiB")

    @property
    def key(self) -> tuple[str, int]:
        """The (vm_id, region) pair that identifies the namespace's storage."""
        return (self.vm_id, self.region)

    def check_offset(self, offset: int, *, backend: str) -> None:
        """Raise InvalidPage unless ``offset`` is a non-negative multiple of the page size."""
        if offset < 0 or offset % self.page_size or offset >= 1 << 63:
            raise self._invalid(
                f"offset is not a multiple of the page size {self.page_size}", backend, offset
            )

    def _aligned(self, offsets: list[int]) -> bool:
        """Whether every offset is valid, checked in C (the page size is a power of two)."""
        mask = self.page_size - 1
        return min(offsets) >= 0 and max(offsets) < 1 << 63 and not any(map(mask.__and__, offsets))

    def check_pages(self, pages: Mapping[int, bytes], *, backend: str) -> None:
        """Validate every offset and that every page is exactly one page long."""
        lengths = map(len, pages.values())
        if pages and self._aligned(list(pages)) and all(map(self.page_size.__eq__, lengths)):
            return
        # Something is wrong: find the first offending page, in order, and name it.
        for offset, data in pages.items():
            self.check_offset(offset, backend=backend)
            if len(data) != self.page_size:
                raise self._invalid(
                    f"page is {len(data)} bytes, expected {self.page_size}", backend, offset
                )

    def check_offsets(self, offsets: Iterable[int], *, backend: str) -> list[int]:
        """Validate offsets and return them as a list without duplicates, in order."""
        seen = list(dict.fromkeys(offsets))
        if seen and not self._aligned(seen):
            for offset in seen:
                self.check_offset(offset, backend=backend)
        return seen

    def check_stored_page_size(self, stored: int, *, backend: str) -> None:
        """Raise InvalidPage unless the region was stored with this page size: a
        region's page size is fixed by its first put."""
        if stored != self.page_size:
            raise self._invalid(
                f"region was created with page size {stored}, not {self.page_size}", backend
            )

    def _invalid(self, reason: str, backend: str, offset: int | None = None) -> InvalidPage:
        return InvalidPage(
            reason, backend=backend, vm_id=self.vm_id, region=self.region, offset=offset
        )


class StoredPage(NamedTuple):
    """A page as returned by ``get``: exactly ``page_size`` bytes, and its generation.

    A NamedTuple rather than a frozen dataclass: one is built per page fetched, and a
    frozen dataclass costs several times more to construct.
    """

    data: bytes
    generation: int


@dataclass(frozen=True, slots=True)
class PageRef:
    """A page a tier holds, as listed for demotion."""

    ns: PageNamespace
    offset: int
    generation: int
    stored_at: float


Generations = int | Mapping[int, int]
"""The generation of a put: one for the whole batch, or one per offset."""

ExpectedGenerations = Mapping[int, int] | None
"""The generation a get insists on per offset (any other raises IntegrityError), or None."""


def generation_of(generation: Generations, offset: int) -> int:
    """The generation of ``offset`` in a put; a missing per-offset entry is a caller bug."""
    value = generation if isinstance(generation, int) else generation[offset]
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"generation {value} of offset {offset:#x} must fit in 64 bits")
    return value


@dataclass(slots=True)
class OpCounters:
    """Operation counters a backend increments; ``stats()`` copies them."""

    puts: int = 0
    pages_put: int = 0
    gets: int = 0
    pages_got: int = 0
    misses: int = 0
    discards: int = 0
    syncs: int = 0
    integrity_errors: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of one store.

    ``pages``/``stored_bytes`` are ``None`` where the backend cannot know them cheaply
    (a Redis server shared with other writers). ``stored_bytes`` counts payload bytes
    as stored (compressed or encrypted); ``logical_bytes`` counts pages times page size.
    """

    backend: str
    pages: int | None
    stored_bytes: int | None
    logical_bytes: int | None
    budget_bytes: int | None
    counters: OpCounters
    tiers: tuple[StoreStats, ...] = ()

    @staticmethod
    def snapshot(counters: OpCounters) -> OpCounters:
        """An independent copy of live counters."""
        return dataclasses.replace(counters)
