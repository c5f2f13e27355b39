"""Eviction policy: selection, hysteresis, the promotion-rate guard, budgets, the page map."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from wsd.evictor import EvictorConfig, pagemap
from wsd.evictor.policy import RegionPolicy, VmPolicy, pages_for_bytes, select
from wsd.evictor.transaction import runs
from wsd.resume import _logged_removed
from wsd.tracker.state import Granularity, RegionState

N = 64


def aged(ages: dict[int, int], npages: int = N) -> RegionState:
    """A fully resident region where page p has been idle ``ages[p]`` cycles (others 0)."""
    s = RegionState(npages, Granularity.PAGE_4K, started_at=0.0)
    resident = np.ones(npages, dtype=bool)
    top = max(ages.values(), default=0)
    for c in range(top):
        hot = np.ones(npages, dtype=bool)
        for p, a in ages.items():
            if c >= top - a:
                hot[p] = False
        s.observe(hot, resident, float(c + 1))
    return s


def test_only_pages_idle_long_enough_are_chosen_oldest_first() -> None:
    s = aged({3: 5, 4: 2, 9: 7, 10: 1})
    chosen = select(s, RegionPolicy(N), threshold=2, limit=10)
    assert chosen.tolist() == [9, 3, 4]
    assert select(s, RegionPolicy(N), threshold=2, limit=2).tolist() == [9, 3]


def test_a_penalised_page_waits_longer() -> None:
    s = aged({3: 5, 4: 5})
    policy = RegionPolicy(N)
    policy.penalty[3] = 4  # needs 2 + 4 = 6 idle cycles
    assert select(s, policy, threshold=2, limit=10).tolist() == [4]


def test_over_target_takes_younger_idle_pages_but_never_hot_ones() -> None:
    s = aged({3: 5, 4: 1, 5: 2})
    chosen = select(s, RegionPolicy(N), threshold=4, limit=10, over_target_pages=3)
    assert chosen.tolist() == [3, 5, 4]
    chosen = select(s, RegionPolicy(N), threshold=4, limit=10, over_target_pages=100)
    assert sorted(chosen.tolist()) == [3, 4, 5]  # the rest were touched last interval


def test_evicted_pages_are_not_chosen_again() -> None:
    s = aged({3: 5, 4: 5})
    s.note_evicted([3])
    assert select(s, RegionPolicy(N), threshold=1, limit=10).tolist() == [4]


def test_an_early_refault_doubles_the_penalty_and_an_eviction_halves_it() -> None:
    cfg = EvictorConfig(refault_window_cycles=4, refault_penalty_cycles=8)
    p = RegionPolicy(N)
    pages = np.array([1], dtype=np.int64)
    p.note_evicted(pages, cycle=100)
    assert p.note_refault(1, cycle=102, config=cfg)
    assert p.penalty[1] == 8
    p.note_evicted(pages, cycle=110)
    assert p.penalty[1] == 4
    assert p.note_refault(1, cycle=111, config=cfg)
    assert p.penalty[1] == 8
    p.note_evicted(pages, cycle=120)
    assert not p.note_refault(1, cycle=130, config=cfg)  # late: the eviction was right
    assert p.penalty[1] == 4


def test_refault_age_wraps_with_the_cycle_counter() -> None:
    cfg = EvictorConfig(refault_window_cycles=4)
    p = RegionPolicy(N)
    p.note_evicted(np.array([0], dtype=np.int64), cycle=254)
    assert p.note_refault(0, cycle=257, config=cfg)


def test_penalty_saturates() -> None:
    cfg = EvictorConfig(refault_penalty_cycles=200)
    p = RegionPolicy(N)
    for _ in range(4):
        p.note_refault(0, cycle=0, config=cfg)
    assert p.penalty[0] == 255


def test_the_guard_raises_the_threshold_while_refaults_are_too_many() -> None:
    cfg = EvictorConfig(
        min_idle_cycles=4, max_idle_cycles=20, promotion_target_percent_per_minute=5.0
    )
    vm = VmPolicy(cfg, started_at=0.0)
    assert vm.adapt(5.0, 1000) == 4  # too early to judge
    vm.note_refaults(20.0, 200)  # 200 in 20 s = 600/min = 60% of 1000 pages
    assert vm.adapt(20.0, 1000) == 5
    assert [vm.adapt(21.0 + i, 1000) for i in range(6)] == [6, 7, 8, 10, 12, 15]
    for i in range(10):
        vm.adapt(30.0 + i, 1000)
    assert vm.threshold == 20
    # A minute later those refaults have aged out: back down, one per cycle.
    assert vm.adapt(100.0, 1000) == 19
    assert vm.adapt(101.0, 1000) == 18


def test_the_guard_can_be_switched_off() -> None:
    vm = VmPolicy(EvictorConfig(promotion_target_percent_per_minute=None), started_at=0.0)
    vm.note_refaults(30.0, 10**6)
    assert vm.adapt(30.0, 1) == vm.config.min_idle_cycles


def test_reconfigure_clamps_the_learned_threshold() -> None:
    vm = VmPolicy(EvictorConfig(min_idle_cycles=4, max_idle_cycles=50), started_at=0.0)
    vm.threshold = 40
    vm.reconfigure(EvictorConfig(min_idle_cycles=2, max_idle_cycles=10))
    assert vm.threshold == 10


def test_the_rate_budget_accrues_with_time_and_caps_at_ten_seconds() -> None:
    vm = VmPolicy(EvictorConfig(rate_mb_per_second=1.0), started_at=0.0)
    assert vm.byte_budget(2.0) == 2_000_000
    assert vm.byte_budget(2.5) == 500_000
    assert vm.byte_budget(100.0) == 10_000_000
    vm.refund(100.0, 4_000_000)
    assert vm.byte_budget(101.0) == 5_000_000
    assert VmPolicy(EvictorConfig(rate_mb_per_second=None), started_at=0).byte_budget(1) is None
    assert pages_for_bytes(None, 4096) > 1 << 40
    assert pages_for_bytes(8191, 4096) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_idle_cycles": 0}, "min_idle_cycles"),
        ({"min_idle_cycles": 9, "max_idle_cycles": 8}, r"max_idle_cycles \(8\) is below"),
        ({"on_fetch_deadline": "panic"}, "on_fetch_deadline"),
        ({"rate_mb_per_second": -1}, "rate_mb_per_second"),
        ({"prefetch_pages": 1000}, "prefetch_pages"),
        ({"evict_everything": True}, "evict_everything"),
    ],
)
def test_bad_config_names_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EvictorConfig.model_validate(fields)


@given(st.lists(st.integers(0, 200), unique=True))
def test_runs_cover_exactly_the_pages(pages: list[int]) -> None:
    arr = np.array(sorted(pages), dtype=np.int64)
    spans = runs(arr)
    rebuilt = [p for first, count in spans for p in range(first, first + count)]
    assert rebuilt == sorted(pages)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(spans))


def test_page_map_round_trip_and_validation(tmp_path: Path) -> None:
    evicted = np.zeros(16, dtype=bool)
    evicted[[2, 5, 6]] = True
    gens = np.arange(16, dtype=np.uint32)
    vm = pagemap.VmMap("vm-1", (pagemap.region_map(4096, 16 * 4096, 4096, evicted, gens),))
    path = pagemap.save(tmp_path, vm)
    back = pagemap.load(path)
    assert back.vm_id == "vm-1"
    (r,) = back.regions
    assert (r.offset, r.size, r.page_size) == (4096, 16 * 4096, 4096)
    assert r.pages.tolist() == [2, 5, 6] and r.generations.tolist() == [2, 5, 6]
    assert [p.name for p in tmp_path.iterdir()] == ["vm-1.pagemap.npz"]  # no temp left

    path.write_bytes(b"not a zip")
    with pytest.raises(pagemap.PageMapError, match=r"vm-1\.pagemap\.npz: unreadable"):
        pagemap.load(path)


def _journal(tmp: Path, seq: int, op: pagemap.JournalOp, pages: list[int], gens: list[int]) -> None:
    records = pagemap.journal_records(op, 0, np.array(pages, np.int64), np.array(gens, np.uint32))
    pagemap.append_journal(tmp, "vm-1", seq, records, durable=False)


def _snapshot(tmp: Path, pages: list[int], gens: list[int], *, journal: int) -> None:
    region = pagemap.RegionMap(
        0, 64 * 4096, 4096, np.array(pages, np.int64), np.array(gens, np.uint32)
    )
    pagemap.save(tmp, pagemap.VmMap("vm-1", (region,), journal=journal))


def _listing(vm: pagemap.VmMap | None) -> tuple[dict[int, int], dict[int, int]]:
    assert vm is not None
    (r,) = vm.regions
    listed = dict(zip(r.pages.tolist(), r.generations.tolist(), strict=True))
    gone = dict(zip(vm.removed["page"].tolist(), vm.removed["generation"].tolist(), strict=True))
    return listed, gone


def test_the_journal_replays_in_order_over_its_snapshot(tmp_path: Path) -> None:
    assert pagemap.load_vm(tmp_path, "vm-1") is None  # nothing ever evicted
    _snapshot(tmp_path, [1, 2, 3], [5, 5, 5], journal=4)
    _journal(tmp_path, 3, pagemap.JournalOp.LISTED, [9], [1])  # an older journal: in the snapshot
    _journal(tmp_path, 4, pagemap.JournalOp.LISTED, [4, 5, 6, 7], [1, 1, 1, 1])
    _journal(tmp_path, 4, pagemap.JournalOp.UNLISTED, [5, 1], [1, 4])  # 1 is listed at 5, not 4
    _journal(tmp_path, 4, pagemap.JournalOp.REMOVED, [2, 6], [5, 1])
    _journal(tmp_path, 5, pagemap.JournalOp.UNLISTED, [3], [5])
    _journal(tmp_path, 5, pagemap.JournalOp.LISTED, [6], [3])  # 6 evicted again after its removal
    with pagemap.journal_path(tmp_path, "vm-1", 5).open("ab") as f:
        f.write(b"\x01\x02\x03")  # a record cut short by a crash
    listed, gone = _listing(pagemap.load_vm(tmp_path, "vm-1"))
    assert listed == {1: 5, 2: 5, 4: 1, 6: 3, 7: 1}
    assert gone == {2: 5}
    assert pagemap.next_journal(tmp_path, "vm-1") == 6

    pagemap.remove(tmp_path, "vm-1")  # the session's state goes, the journals with it
    assert list(tmp_path.iterdir()) == []


def test_replaying_in_order_tells_a_removal_from_an_eviction_at_a_reused_generation(
    tmp_path: Path,
) -> None:
    # A restart lists the page at generation 0 again after it was unlisted;
    # its next eviction reuses generation 1, at which it was removed once.
    _snapshot(tmp_path, [], [], journal=0)
    _journal(tmp_path, 0, pagemap.JournalOp.LISTED, [8], [1])
    _journal(tmp_path, 0, pagemap.JournalOp.REMOVED, [8], [1])
    _journal(tmp_path, 1, pagemap.JournalOp.LISTED, [8], [1])
    assert _listing(pagemap.load_vm(tmp_path, "vm-1")) == ({8: 1}, {})


def test_the_generation_ceiling_outlives_the_map_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert pagemap.load_ceiling(tmp_path, "vm-1") == 0  # never written
    pagemap.save_ceiling(tmp_path, "vm-1", 1025)
    _snapshot(tmp_path, [1], [3], journal=0)
    pagemap.remove(tmp_path, "vm-1")  # the session ends: its ceiling stays
    assert [p.name for p in tmp_path.iterdir()] == ["vm-1.ceiling"]
    assert pagemap.load_ceiling(tmp_path, "vm-1") == 1025
    with pytest.raises(ValueError, match="outside"):
        pagemap.save_ceiling(tmp_path, "vm-1", 1 << 32)
    for text, error in [
        ("twelve\n", r"vm-1\.ceiling: not a generation ceiling: 'twelve\\n'"),
        ("0\n", r"vm-1\.ceiling: generation ceiling 0 outside \[1, 4294967295\]"),
    ]:
        pagemap.ceiling_path(tmp_path, "vm-1").write_text(text)
        with pytest.raises(pagemap.PageMapError, match=error):
            pagemap.load_ceiling(tmp_path, "vm-1")


def test_bad_journals_are_named(tmp_path: Path) -> None:
    _snapshot(tmp_path, [], [], journal=0)
    path = pagemap.journal_path(tmp_path, "vm-1", 0)
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(pagemap.PageMapError, match=r"vm-1\.journal\.0: not a page map journal"):
        pagemap.load_vm(tmp_path, "vm-1")
    path.unlink()
    _journal(tmp_path, 0, pagemap.JournalOp.LISTED, [64], [1])
    with pytest.raises(pagemap.PageMapError, match=r"page index outside \[0, 64\)"):
        pagemap.load_vm(tmp_path, "vm-1")
    path.unlink()
    records = pagemap.journal_records(
        pagemap.JournalOp.LISTED, 0, np.array([1], np.int64), np.array([1], np.uint32)
    )
    records["op"] = 9
    pagemap.append_journal(tmp_path, "vm-1", 0, records, durable=True)
    with pytest.raises(pagemap.PageMapError, match="record 0 has an unknown operation"):
        pagemap.load_vm(tmp_path, "vm-1")


def test_appenders_racing_to_create_a_journal_both_land_whole(tmp_path: Path) -> None:
    # The loop and a worker thread may make the first two appends to a new journal.
    start = threading.Barrier(2)
    created: list[bool] = []

    def append(seq: int, page: int) -> None:
        records = pagemap.journal_records(
            pagemap.JournalOp.LISTED, 0, np.array([page], np.int64), np.array([1], np.uint32)
        )
        start.wait()
        created.append(pagemap.append_journal(tmp_path, "vm-1", seq, records, durable=False))

    for seq in range(100):
        threads = [threading.Thread(target=append, args=(seq, p)) for p in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(pagemap.load_journal(tmp_path, "vm-1", seq)["page"].tolist()) == [1, 2]
    assert created.count(True) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"vm-1.journal.{s}" for s in sorted(range(100), key=str)
    ]


def _replay_one_by_one(
    listed: dict[int, int], marked: dict[int, int], steps: list[tuple[int, int, int]]
) -> tuple[dict[int, int], dict[int, int]]:
    """The journal's meaning, record by record: what ``pagemap.replay`` vectorises."""
    listed, marked = dict(listed), dict(marked)
    for page, gen, op in steps:
        if op == pagemap.JournalOp.LISTED:
            listed[page] = gen
            marked.pop(page, None)
        elif listed.get(page) != gen:
            continue  # about an older listing of the page
        elif op == pagemap.JournalOp.UNLISTED:
            del listed[page]
            marked.pop(page, None)
        else:
            marked[page] = gen
    return listed, marked


_pages = st.integers(0, 7)
_gens = st.integers(0, 3)


@settings(max_examples=400)
@given(
    st.dictionaries(_pages, _gens),
    st.lists(st.tuples(_pages, _gens, st.sampled_from(list(pagemap.JournalOp)))),
    st.lists(st.tuples(_pages, _gens, st.sampled_from(list(pagemap.JournalOp)))),
)
def test_replay_means_applying_each_record_in_order(
    snapshot: dict[int, int],
    first: list[tuple[int, int, int]],
    second: list[tuple[int, int, int]],
) -> None:
    def records(steps: list[tuple[int, int, int]]) -> np.ndarray:
        out = np.zeros(len(steps), dtype=pagemap.JOURNAL_RECORD)
        for n, (page, gen, op) in enumerate(steps):
            out[n]["page"], out[n]["generation"], out[n]["op"] = page, gen, op
        return out

    pages = sorted(snapshot)
    region = pagemap.RegionMap(
        0,
        8 * 4096,
        4096,
        np.array(pages, np.int64),
        np.array([snapshot[p] for p in pages], np.uint32),
    )
    vm = pagemap.VmMap("vm-1", (region,))
    # Two journals one after the other: the marks of the first carry over.
    vm = pagemap.replay(vm, records(first), source="first")
    vm = pagemap.replay(vm, records(second), source="second")
    assert _listing(vm) == _replay_one_by_one(snapshot, {}, first + second)


def test_a_removals_log_of_an_earlier_version_is_still_read(tmp_path: Path) -> None:
    _snapshot(tmp_path, [3, 9], [1, 7], journal=0)
    legacy = np.array([(0, 1, 3), (0, 6, 9)], dtype=pagemap.REMOVED_RECORD)
    pagemap.removed_path(tmp_path, "vm-1").write_bytes(pagemap.REMOVED_MAGIC + legacy.tobytes())
    assert _listing(pagemap.load_vm(tmp_path, "vm-1")) == ({3: 1, 9: 7}, {3: 1})


def test_a_restart_drops_a_listed_page_only_at_the_generation_its_removal_logged() -> None:
    removed = np.array([(0, 1, 3), (0, 7, 9), (1, 4, 12)], dtype=pagemap.REMOVED_RECORD)
    region = pagemap.RegionMap(
        0, 16 * 4096, 4096, np.array([3, 9, 12], np.int64), np.array([1, 8, 4], np.uint32)
    )
    vmap = pagemap.VmMap("vm-1", (region,), removed=removed)
    # 9 was evicted again since its removal (generation 8, not 7); the
    # record for 12 is another region's.
    assert _logged_removed(vmap, 0, region.pages, region.generations).tolist() == [3]
    assert not len(_logged_removed(None, 0, region.pages, region.generations))
