"""The fixed-bucket duration histograms behind wsd's latency and duration metrics."""

from __future__ import annotations

import pytest

from wsd.durations import CYCLE_BUCKETS, FAULT_BUCKETS, DurationHistogram, LabelledDurations


def test_buckets_are_prometheus_style_cumulative_with_inclusive_bounds() -> None:
    h = DurationHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.5, 7.0):
        h.observe(seconds)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("0.1", 3), ("+Inf", 5)]
    assert h.count == 5
    assert h.sum == pytest.approx(7.5035)


def test_an_empty_histogram_reports_zeros() -> None:
    h = DurationHistogram(FAULT_BUCKETS)
    assert h.count == 0 and h.sum == 0.0
    assert [n for _, n in h.cumulative()] == [0] * (len(FAULT_BUCKETS) + 1)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.1), (1.0, 0.5)])
def test_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bucket bounds must be increasing"):
        DurationHistogram(bounds)


def test_the_default_buckets_are_valid() -> None:
    for bounds in (FAULT_BUCKETS, CYCLE_BUCKETS):
        assert DurationHistogram(bounds).bounds == bounds


def test_labelled_makes_a_histogram_per_key_on_first_use() -> None:
    by = LabelledDurations[str](CYCLE_BUCKETS)
    assert by.items() == []
    by.observe("rwp", 0.002)
    by.observe("rwp", 0.003)
    by.observe("minor", 0.5)
    assert {k: h.count for k, h in by.items()} == {"rwp": 2, "minor": 1}
    assert by["rwp"].sum == pytest.approx(0.005)
