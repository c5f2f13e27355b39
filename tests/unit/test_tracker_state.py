"""Per-page tracker state: ages, working-set estimates, histogram, eviction bookkeeping."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd.tracker.state import (
    DEFAULT_AGE_EDGES,
    DEFAULT_HORIZONS,
    MAX_AGE,
    Granularity,
    RegionState,
)

MiB = 1024 * 1024
THP_PAGES = 512  # 4 KiB pages per 2 MiB


def bits(n: int, pages: Iterable[int]) -> npt.NDArray[np.bool_]:
    out = np.zeros(n, dtype=np.bool_)
    out[list(pages)] = True
    return out


class Cycles:
    """Drives a state with a fake clock: one second per interval unless told."""

    def __init__(self, state: RegionState, now: float = 100.0) -> None:
        self.state = state
        self.now = now
        self.all = np.ones(state.npages, dtype=np.bool_)

    def run(
        self,
        hot: Iterable[int] = (),
        resident: npt.NDArray[np.bool_] | None = None,
        *,
        times: int = 1,
        seconds: float = 1.0,
    ) -> None:
        hot_bits = bits(self.state.npages, hot)
        for _ in range(times):
            self.now += seconds
            self.state.observe(hot_bits, self.all if resident is None else resident, self.now)


def state_4k(
    npages: int = 1000,
    *,
    horizons: tuple[int, ...] = DEFAULT_HORIZONS,
    age_edges: tuple[int, ...] = DEFAULT_AGE_EDGES,
) -> RegionState:
    return RegionState(
        npages, Granularity.PAGE_4K, started_at=100.0, horizons=horizons, age_edges=age_edges
    )


# -- ages --------------------------------------------------------------------------------


def test_ages_count_idle_cycles_and_saturate() -> None:
    s = state_4k(4)
    c = Cycles(s)
    c.run(hot=[0])
    assert s.ages.tolist() == [0, 1, 1, 1]
    c.run(hot=[1], times=3)
    assert s.ages.tolist() == [3, 0, 4, 4]
    c.run(hot=[1], times=300)
    assert s.ages.tolist() == [MAX_AGE, 0, MAX_AGE, MAX_AGE]
    c.run(hot=[2])
    assert s.ages.tolist() == [MAX_AGE, 1, 0, MAX_AGE]
    assert s.cycles == 305 and s.last_cycle_at == c.now


def test_an_access_noted_between_cycles_counts_for_the_next_interval() -> None:
    s = state_4k(3)
    c = Cycles(s)
    c.run(times=5)
    s.note_access([1])
    assert s.ages.tolist() == [5, 0, 5]
    c.run()
    # Accessed during the interval that observe() closed: still 0, not 1.
    assert s.ages.tolist() == [6, 0, 6]
    c.run()
    assert s.ages.tolist() == [7, 1, 7]


def test_many_accesses_between_cycles_are_all_kept() -> None:
    s = state_4k(1000)
    c = Cycles(s)
    c.run(times=2)
    for p in range(0, 1000, 2):
        s.note_access([p])
    c.run()
    assert np.flatnonzero(s.ages == 0).tolist() == list(range(0, 1000, 2))


def test_note_fault_counts_faults() -> None:
    s = state_4k(8)
    s.note_fault(np.array([3, 3, 5]))
    assert s.faults == 2 and s.ages[3] == 0


def test_views_are_read_only() -> None:
    s = state_4k(4)
    with pytest.raises(ValueError, match="read-only"):
        s.ages[0] = 3
    with pytest.raises(ValueError, match="read-only"):
        s.generations[0] = 3


# -- working-set estimates ---------------------------------------------------------------


def test_wss_of_a_steady_ten_percent_workload() -> None:
    s = state_4k(1000)
    c = Cycles(s)
    hot = range(0, 1000, 10)
    c.run(hot=hot, times=70)
    wss = s.working_set()
    assert sorted(wss) == [1, 4, 16, 64]
    for h in (1, 4, 16, 64):
        assert wss[h].pages == 100 and wss[h].bytes == 100 * 4096 and wss[h].valid


def test_wss_is_not_reported_before_its_horizon_has_passed() -> None:
    s = state_4k(100)
    c = Cycles(s)
    assert all(not e.valid for e in s.working_set().values())
    c.run(hot=range(10), times=3, seconds=2.0)
    wss = s.working_set()
    assert wss[1].pages == 10 and wss[1].window_seconds == 2.0
    # Three intervals cannot tell which of the 90 idle pages a 4-interval WSS holds.
    assert wss[4].pages is None and wss[4].bytes is None and wss[4].window_seconds is None
    c.run(hot=range(10), seconds=5.0)
    assert s.working_set()[4].pages == 10
    assert s.working_set()[4].window_seconds == 11.0


def test_phase_change_longer_horizons_cover_both_sets() -> None:
    s = state_4k(1000)
    c = Cycles(s)
    old, new = range(0, 100), range(500, 650)
    c.run(hot=old, times=20)
    c.run(hot=new, times=3)
    wss = s.working_set()
    assert wss[1].pages == 150
    assert wss[4].pages == 250 and wss[16].pages == 250
    c.run(hot=new, times=12)
    wss = s.working_set()
    assert wss[1].pages == 150 and wss[4].pages == 150 and wss[16].pages == 250
    c.run(hot=new)  # the old set was last touched 16 intervals ago
    assert s.working_set()[16].pages == 150
    c.run(hot=new, times=47)
    assert s.working_set()[64].pages == 250


def test_wss_counts_pages_evicted_after_recent_access() -> None:
    s = state_4k(10)
    c = Cycles(s)
    c.run(hot=[1, 2])
    s.note_evicted([2])
    assert s.working_set()[1].pages == 2


@settings(max_examples=30, deadline=None)
@given(phases=st.lists(st.tuples(st.integers(0, 299), st.integers(1, 9)), max_size=8))
def test_one_horizon_alone_agrees_with_the_whole_estimate(phases: list[tuple[int, int]]) -> None:
    s = state_4k(300)
    c = Cycles(s)
    for first, times in phases:
        c.run(hot=range(first, min(first + 40, 300)), times=times)
        counted = [s.working_set_pages(h) for h in s.horizons]  # the ages changed: counted
        whole = [s.working_set()[h].pages for h in s.horizons]
        cached = [s.working_set_pages(h) for h in s.horizons]  # from working_set()'s counts
        assert counted == whole == cached


def test_usage_taken_before_a_change_estimates_as_of_when_it_was_taken() -> None:
    s = state_4k(300)
    c = Cycles(s)
    c.run(hot=range(40), times=20)
    s.note_evicted(range(100, 150))
    fresh = s.usage()  # not counted yet: a copy of the ages and flags
    wanted = s.working_set(), s.age_histogram()
    cached = s.usage()  # now counted: the counts themselves
    c.run(hot=range(200, 300), times=5)
    s.note_fetched(range(100, 120))
    assert (fresh.working_set(), fresh.age_histogram()) == wanted
    assert (cached.working_set(), cached.age_histogram()) == wanted
    assert s.working_set() != wanted[0]


# -- histogram ---------------------------------------------------------------------------


def test_histogram_buckets_and_cumulative_idle_bytes() -> None:
    s = state_4k(100, age_edges=(1, 4, 16))
    c = Cycles(s)
    c.run(times=20)  # everything idle for 20 cycles
    c.run(hot=range(10), times=4)  # 10 pages at 0
    c.run(hot=range(10, 30))  # 20 pages at 0, the first 10 at 1
    resident = bits(100, range(90))  # 10 idle pages gone
    c.run(hot=range(10, 30), resident=resident)
    h = s.age_histogram()
    assert h.lower_bounds == (0, 1, 4, 16)
    assert h.pages == (20, 10, 0, 60)
    assert h.resident_bytes == 90 * 4096 == sum(h.bytes)
    assert h.idle_bytes(0) == 90 * 4096 and h.idle_bytes(16) == 60 * 4096
    assert h.cumulative() == ((0, 90 * 4096), (1, 70 * 4096), (4, 60 * 4096), (16, 60 * 4096))
    with pytest.raises(ValueError, match="not 0 or one of"):
        h.idle_bytes(3)


def test_histogram_does_not_claim_coldness_it_has_not_seen() -> None:
    s = state_4k(10)
    c = Cycles(s)
    c.run(times=3)
    h = s.age_histogram()
    assert h.idle_bytes(2) == 10 * 4096 and h.idle_bytes(4) is None


# -- eviction bookkeeping ----------------------------------------------------------------


def test_cold_candidates_skip_hot_absent_and_evicted_pages() -> None:
    s = state_4k(10)
    c = Cycles(s)
    c.run(times=5, resident=bits(10, range(9)))
    c.run(hot=[0, 1], resident=bits(10, range(9)))
    s.note_access([2])
    s.note_evicted([3])
    assert s.cold_candidates(1).tolist() == [4, 5, 6, 7, 8]
    assert s.cold_candidates(6).tolist() == [4, 5, 6, 7, 8]
    assert s.cold_candidates(7).tolist() == []
    assert s.cold_candidates(1).dtype == np.int64
    assert s.cold_candidates(1, limit=2).tolist() == [4, 5]
    assert s.cold_candidates(1, limit=0).tolist() == []
    for bad in (0, MAX_AGE + 1):
        with pytest.raises(ValueError, match="min_age"):
            s.cold_candidates(bad)


def test_evict_and_fetch_track_counts_and_generations() -> None:
    s = state_4k(10)
    c = Cycles(s)
    c.run(times=3)
    assert s.resident_pages == 10 and s.evicted_pages == 0
    s.note_evicted([4, 5, 5])
    assert s.resident_pages == 8 and s.evicted_pages == 2
    assert s.generations[[4, 5, 6]].tolist() == [1, 1, 0]
    assert s.evicted[[4, 5, 6]].tolist() == [True, True, False]
    assert not s.resident[4]

    s.note_fetched([4])  # prefetch: still as cold as before
    assert s.ages[4] == 3 and s.resident[4] and not s.evicted[4]
    s.note_fetched([4, 9])  # duplicate and never-evicted pages are ignored
    assert s.resident_pages == 9 and s.evicted_pages == 1

    s.note_evicted([4])
    assert s.generations[4] == 2
    s.note_fetched([4], accessed=True)
    assert s.ages[4] == 0
    c.run(resident=bits(10, set(range(10)) - {5}))
    assert s.ages[4] == 0


def test_pages_in_any_order_count_once_and_the_callers_array_is_not_kept() -> None:
    """Sorted unique indices skip np.unique (the evictor's chunks); any other
    order or a repeat still counts each page once, and a pending access list
    never aliases the caller's array."""
    s = state_4k(10)
    c = Cycles(s)
    c.run(times=2)
    s.note_evicted(np.array([7, 2, 7, 3]))
    assert s.evicted_pages == 3 and s.evicted[[2, 3, 7]].all()
    mine = np.array([0, 1], dtype=np.int64)
    s.note_access(mine)
    mine[:] = 9  # reused by the caller before the next cycle
    c.run()
    assert s.ages[[0, 1]].tolist() == [0, 0] and s.ages[9] == 3


def test_first_evicted_finds_the_lowest_across_scan_chunks() -> None:
    s = state_4k(300_000)  # more than two of the scan's chunks
    Cycles(s).run(times=2)
    s.note_evicted([299_999, 140_000, 7])
    assert s.first_evicted(2) == [7, 140_000]
    assert s.first_evicted(8) == [7, 140_000, 299_999]
    assert s.first_evicted(0) == []


def test_a_walk_in_a_thread_keeps_the_state_for_pages_wsd_changed_meanwhile() -> None:
    s = state_4k(10)
    c = Cycles(s)
    c.run(times=2)
    s.note_evicted([1, 2, 3])
    s.begin_walk()
    # What the thread's walk found, page by page, while the loop went on:
    # it passed page 1 (a hole) before its fetch-back, page 2 after it.
    s.note_page_fetched(1)
    s.note_fetched([2])
    s.note_evicted([7])  # passed while still resident
    s.note_removed([8])  # passed while still resident
    walk = bits(10, set(range(10)) - {1, 3, 5})  # 5: punched by the VMM
    fixed = s.walked(walk)
    assert fixed is not None
    assert fixed.tolist() == bits(10, {0, 1, 2, 4, 6, 9}).tolist()
    assert s.walked(bits(10, ())) is not None and s.walked(None) is None  # no walk: no log
    c.run(resident=fixed)
    assert s.resident.tolist() == fixed.tolist()
    assert s.evicted[[3, 7]].tolist() == [True, True]


def test_restore_trusts_the_memfd_and_returns_the_listed_pages_it_holds() -> None:
    s = state_4k(10)
    resident = bits(10, {0, 1, 2, 5})
    listed = np.array([2, 3, 5, 7], np.int64)
    stale = s.restore(resident, listed, np.array([4, 1, 2, 9], np.uint32))
    assert stale.tolist() == [2, 5]  # put but never punched, or fetched back since
    assert s.evicted.nonzero()[0].tolist() == [3, 7]
    assert s.resident_pages == 4 and s.evicted_pages == 2
    # Every listed page keeps its generation: the next eviction stores a newer one.
    assert s.generations[[2, 3, 5, 7]].tolist() == [4, 1, 2, 9]
    with pytest.raises(ValueError, match=r"ascending and unique: .* first at \[\(5, 2\)\]"):
        s.restore(resident, np.array([5, 2], np.int64), np.array([1, 1], np.uint32))
    with pytest.raises(
        ValueError, match=r"3 listed, 2 distinct, 1 out of order, first at \[\(5, 5\)\]"
    ):
        s.restore(resident, np.array([2, 5, 5], np.int64), np.array([1, 1, 1], np.uint32))


def test_restore_starts_every_page_the_map_does_not_list_at_the_floor() -> None:
    s = state_4k(10)
    resident = bits(10, {0, 1, 2, 5})
    s.restore(resident, np.array([2, 3], np.int64), np.array([4, 1], np.uint32), floor=40)
    # Listed pages keep theirs; the others' last generations are unknown.
    assert s.generations.tolist() == [40, 40, 4, 1, 40, 40, 40, 40, 40, 40]
    s.note_removed([3])
    s.lift_generations(40, [3, 4])
    assert s.generations[[2, 3, 4]].tolist() == [4, 40, 40]
    s.lift_generations(7, [3])  # never lowers
    assert s.generations[3] == 40
    s.lift_generations(41)
    assert s.generations.tolist() == [41] * 10


def test_evicting_an_evicted_page_raises_and_changes_nothing() -> None:
    s = state_4k(10)
    Cycles(s).run(times=2)
    s.note_evicted([1])
    before = (s.generations.copy(), s.evicted, s.resident_pages, s.evicted_pages)
    with pytest.raises(ValueError, match=r"already evicted: \[1\]"):
        s.note_evicted([0, 1])
    after = (s.generations.copy(), s.evicted, s.resident_pages, s.evicted_pages)
    assert (before[0] == after[0]).all() and (before[1] == after[1]).all()
    assert before[2:] == after[2:]


def test_untrappable_region_is_tracked_but_never_evicted() -> None:
    s = RegionState(2 * THP_PAGES, Granularity.THP_2M_UNTRAPPABLE, started_at=0.0)
    c = Cycles(s)
    c.run(hot=[3], times=10)
    assert s.working_set()[4].pages == THP_PAGES  # estimates still work
    assert s.cold_candidates(1).tolist() == []
    with pytest.raises(ValueError, match="never evict"):
        s.note_evicted([THP_PAGES])
    assert s.evicted_pages == 0


def test_a_hole_filled_without_fetch_back_is_flagged_and_not_evicted_again() -> None:
    s = state_4k(4)
    c = Cycles(s)
    c.run(times=3)
    s.note_evicted([2])
    c.run()  # the memfd has the page again, but no one reported a fetch-back
    assert s.evicted_but_resident() == 1
    assert s.resident_pages == 4 and s.evicted_pages == 1
    assert 2 not in s.cold_candidates(1).tolist()
    s.note_fetched([2])
    assert s.evicted_but_resident() == 0 and s.resident_pages == 4


# -- granularity -------------------------------------------------------------------------


def test_hugetlb_region_counts_2m_pages() -> None:
    s = RegionState(512, Granularity.HUGE_2M, started_at=0.0)  # 1 GiB
    assert s.page_size == 2 * MiB
    c = Cycles(s)
    c.run(hot=range(16), times=4)
    assert s.working_set()[1].bytes == 32 * MiB
    assert s.age_histogram().resident_bytes == 1024 * MiB
    assert s.age_histogram().idle_bytes(4) == (512 - 16) * 2 * MiB
    assert len(s.cold_candidates(4)) == 512 - 16
    assert s.nbytes == 512 * 6


def test_thp_touch_marks_the_whole_2m() -> None:
    s = RegionState(4 * THP_PAGES, Granularity.THP_2M, started_at=0.0)
    c = Cycles(s)
    c.run(times=3)
    c.run(hot=[THP_PAGES + 7])
    s.note_fault([3 * THP_PAGES + 1])
    assert s.working_set()[1].bytes == 2 * 2 * MiB
    cold = s.cold_candidates(1)
    assert cold.tolist() == list(range(THP_PAGES)) + list(range(2 * THP_PAGES, 3 * THP_PAGES))


def test_region_size_and_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="granules"):
        RegionState(THP_PAGES + 1, Granularity.THP_2M, started_at=0.0)
    with pytest.raises(ValueError, match="horizons"):
        state_4k(10, horizons=(4, 1))
    with pytest.raises(ValueError, match="age_edges"):
        state_4k(10, age_edges=(1, 256))
    assert Granularity.PAGE_4K.granule_bytes == 4096 and Granularity.THP_2M.page_size == 4096
    assert not Granularity.THP_2M_UNTRAPPABLE.evictable


def test_bad_inputs_are_rejected() -> None:
    s = state_4k(8)
    ok = np.ones(8, dtype=np.bool_)
    with pytest.raises(TypeError, match="bool"):
        s.observe(np.ones(8, dtype=np.uint8), ok, 101.0)
    with pytest.raises(ValueError, match="shape"):
        s.observe(np.ones(9, dtype=np.bool_), ok, 101.0)
    with pytest.raises(ValueError, match="earlier"):
        s.observe(ok, ok, 99.0)
    with pytest.raises(IndexError, match=r"\[-1, 8\]"):
        s.note_access([-1, 3, 8])
    with pytest.raises(TypeError, match="integers"):
        s.note_access(np.array([1.5]))
    assert s.cycles == 0 and not s.ages.any()


# -- memory ------------------------------------------------------------------------------


def test_memory_stays_within_budget_and_observe_allocates_no_region_sized_buffer() -> None:
    npages = 1 << 20  # 4 GiB of 4 KiB pages
    s = state_4k(npages)
    assert s.nbytes == 6 * npages  # 1.5 MiB per GiB, budget 2 MiB
    rng = np.random.default_rng(1)
    hot = rng.random(npages) < 0.1
    resident = rng.random(npages) < 0.9
    tracemalloc.start()
    try:
        s.observe(hot, resident, 101.0)
        s.working_set()
        s.age_histogram()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Scratch is per chunk; a region-sized temporary would be at least npages bytes.
    assert peak < npages // 2


# -- against a pure-Python model ----------------------------------------------------------


class Model:
    """The specification, one page at a time."""

    def __init__(self, npages: int, per_granule: int, evictable: bool) -> None:
        self.n, self.k, self.evictable = npages, per_granule, evictable
        self.age = dict.fromkeys(range(npages), 0)
        self.resident: set[int] = set()
        self.evicted: set[int] = set()
        self.gen = dict.fromkeys(range(npages), 0)
        self.pending: set[int] = set()
        self.cycles = 0

    def widen(self, pages: Iterable[int]) -> set[int]:
        return {b * self.k + i for b in {p // self.k for p in pages} for i in range(self.k)}

    def observe(self, hot: set[int], resident: set[int]) -> None:
        self.age = {p: min(a + 1, MAX_AGE) for p, a in self.age.items()}
        for p in self.widen(hot | self.pending):
            self.age[p] = 0
        self.pending.clear()
        self.resident = set(resident)
        self.cycles += 1

    def access(self, pages: set[int]) -> None:
        for p in self.widen(pages):
            self.age[p] = 0
        self.pending |= pages

    def evict(self, pages: set[int]) -> bool:
        if not self.evictable or pages & self.evicted:
            return False
        self.resident -= pages
        self.evicted |= pages
        for p in pages:
            self.gen[p] += 1
        return True

    def fetch(self, pages: set[int], accessed: bool) -> None:
        back = pages & self.evicted
        self.evicted -= back
        self.resident |= back
        if accessed:
            self.access(pages)

    def candidates(self, min_age: int) -> list[int]:
        if not self.evictable:
            return []
        ok = self.resident - self.evicted
        return sorted(p for p in ok if self.age[p] >= min_age)

    def wss(self, h: int) -> int | None:
        return sum(a < h for a in self.age.values()) if self.cycles >= h else None

    def histogram(self, edges: tuple[int, ...]) -> tuple[int, ...]:
        bounds = (0, *edges, MAX_AGE + 1)
        ages = [self.age[p] for p in self.resident]
        return tuple(sum(lo <= a < hi for a in ages) for lo, hi in itertools.pairwise(bounds))


REGIONS = [
    (Granularity.PAGE_4K, 1),
    (Granularity.PAGE_4K, 37),
    (Granularity.HUGE_2M, 9),
    (Granularity.THP_2M, 2 * THP_PAGES),
    (Granularity.THP_2M_UNTRAPPABLE, THP_PAGES),
]
HORIZONS = (1, 2, 3, 5)
EDGES = (1, 2, 3, 4, 6)


def page_sets(n: int) -> st.SearchStrategy[set[int]]:
    few = st.sets(st.integers(0, n - 1), max_size=min(n, 12))
    return st.one_of(few, few.map(lambda s: set(range(n)) - s))


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(REGIONS), st.data())
def test_matches_the_model(region: tuple[Granularity, int], data: st.DataObject) -> None:
    granularity, n = region
    s = RegionState(n, granularity, started_at=0.0, horizons=HORIZONS, age_edges=EDGES)
    k = granularity.granule_bytes // granularity.page_size
    m = Model(n, k, granularity.evictable)
    now = 0.0
    ops = st.sampled_from(["observe", "observe", "observe", "access", "evict", "fetch"])
    for op in data.draw(st.lists(ops, max_size=16)):
        pages = data.draw(page_sets(n))
        if op == "observe":
            resident = data.draw(page_sets(n))
            now += data.draw(st.floats(0, 10))
            s.observe(bits(n, pages), bits(n, resident), now)
            m.observe(pages, resident)
        elif op == "access":
            s.note_access(sorted(pages))
            m.access(pages)
        elif op == "evict":
            if m.evict(pages):
                s.note_evicted(np.array(sorted(pages), dtype=np.int64))
            else:
                with pytest.raises(ValueError):
                    s.note_evicted(np.array(sorted(pages), dtype=np.int64))
        else:
            accessed = data.draw(st.booleans())
            s.note_fetched(sorted(pages), accessed=accessed)
            m.fetch(pages, accessed)

        assert s.ages.tolist() == [m.age[p] for p in range(n)]
        assert s.resident.tolist() == [p in m.resident for p in range(n)]
        assert s.evicted.tolist() == [p in m.evicted for p in range(n)]
        assert s.generations.tolist() == [m.gen[p] for p in range(n)]
        assert s.resident_pages == len(m.resident) and s.evicted_pages == len(m.evicted)
        for min_age in (1, 2, 4):
            assert s.cold_candidates(min_age).tolist() == m.candidates(min_age)
        assert {h: e.pages for h, e in s.working_set().items()} == {h: m.wss(h) for h in HORIZONS}
        hist = s.age_histogram()
        assert hist.pages == m.histogram(EDGES)
        assert hist.resident_bytes == len(m.resident) * s.page_size
        if k > 1:  # ages are per 2 MiB granule
            assert (s.ages.reshape(-1, k) == s.ages.reshape(-1, k)[:, :1]).all()


def test_saturation_across_chunk_boundaries() -> None:
    """A region larger than one vectorised chunk ages the same everywhere."""
    n = (1 << 17) + 5
    s = state_4k(n)
    c = Cycles(s)
    probe = np.array([0, (1 << 17) - 1, 1 << 17, n - 1])
    for gap, expected in ((1, 1), (7, 7), (254, 254), (255, 255), (300, MAX_AGE)):
        c.run(times=gap)
        assert s.ages[probe].tolist() == [expected] * 4
        c.run(hot=probe)
        assert s.ages[probe].tolist() == [0] * 4
    cold = sorted(set(range(n)) - set(probe.tolist()))
    assert s.cold_candidates(1).tolist() == cold
    assert s.cold_candidates(1, limit=(1 << 17) + 1).tolist() == cold[: (1 << 17) + 1]


def test_note_populated_marks_fresh_pages_resident_only() -> None:
    state = RegionState(8, Granularity.PAGE_4K, started_at=0.0)
    state.observe(np.zeros(8, bool), np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), now=1.0)
    state.note_evicted([1])
    state.note_populated([1, 2, 3])
    assert np.flatnonzero(state.resident).tolist() == [0, 2, 3]
    assert state.resident_pages == 3 and state.evicted_pages == 1


def test_is_evicted_reads_one_flag() -> None:
    state = RegionState(4, Granularity.PAGE_4K, started_at=0.0)
    state.observe(np.zeros(4, bool), np.ones(4, bool), now=1.0)
    state.note_evicted([2])
    assert [state.is_evicted(p) for p in range(4)] == [False, False, True, False]


def test_note_page_fetched_matches_the_array_version() -> None:
    a = RegionState(64, Granularity.PAGE_4K, started_at=0.0)
    b = RegionState(64, Granularity.PAGE_4K, started_at=0.0)
    everything = np.ones(64, dtype=bool)
    for s in (a, b):
        s.observe(np.zeros(64, dtype=bool), everything, 1.0)
        s.observe(np.zeros(64, dtype=bool), everything, 2.0)
        s.note_evicted([3, 4, 5])
    a.note_fetched([4], accessed=True)
    b.note_page_fetched(4)
    b.note_page_fetched(7)  # never evicted: an access, nothing else
    a.note_access([7])
    for s in (a, b):
        s.observe(np.zeros(64, dtype=bool), s.resident, 3.0)
    assert np.array_equal(a.ages, b.ages)
    assert np.array_equal(a.resident, b.resident) and np.array_equal(a.evicted, b.evicted)
    assert (a.resident_pages, a.evicted_pages) == (b.resident_pages, b.evicted_pages)
    with pytest.raises(IndexError):
        b.note_page_fetched(64)
