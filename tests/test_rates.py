"""rates.py on its own (pure: ``now`` is an argument): the one estimator behind every "per second", the grids."""
from __future__ import annotations

import pytest

from sf_bsread_writer.rates import RateEstimator, RateGrid, SparseAwareGrid


def test_a_rate_is_the_growth_of_the_totals_over_the_window():
    estimator = RateEstimator(window=5.0)
    assert estimator.rates() is None and estimator.rate() is None and estimator.span == 0.0
    for second in range(11):
        estimator.add(100.0 + second, 10 * second, 1000 * second)
    assert estimator.span == pytest.approx(5.0, abs=1.0)
    assert estimator.rates() == pytest.approx((10.0, 1000.0))
    assert estimator.rate() == pytest.approx(10.0)


def test_samples_at_one_instant_give_no_rate_and_no_division_by_zero():
    estimator = RateEstimator()
    estimator.add(5.0, 1)
    estimator.add(5.0, 2)
    assert estimator.rates() is None


def test_resolution_bounds_the_samples_however_often_add_is_called():
    estimator = RateEstimator(window=2.0, resolution=0.1)
    for step in range(100_000):  # once per message at 10 kHz for 10 s
        estimator.add(step * 1e-4, step)
    assert len(estimator._samples) <= 2.0 / 0.1 + 2
    assert estimator.rate() == pytest.approx(10_000, rel=0.01)


def test_add_says_whether_it_kept_the_sample_so_a_caller_recomputes_only_then():
    """The writer's run loop reads the rate once per kept sample, not once per message (issue 24)."""
    estimator = RateEstimator(window=2.0, resolution=0.1)
    assert estimator.add(0.0, 0) is True
    assert estimator.add(0.05, 5) is False  # within the resolution: dropped, the rate cannot have changed
    assert estimator.rate() is None
    assert estimator.add(0.1, 10) is True
    assert estimator.rate() == pytest.approx(100.0)


def test_a_missed_sample_costs_resolution_never_correctness():
    """Totals, not increments: the rate is right after a gap in the samples."""
    estimator = RateEstimator(window=10.0)
    estimator.add(0.0, 0)
    estimator.add(8.0, 800)  # nothing was added for 8 s
    assert estimator.rate() == pytest.approx(100.0)


def test_the_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        RateEstimator(window=0)


def test_a_grid_takes_at_most_max_rate_a_second_from_a_jittery_faster_stream():
    grid = RateGrid(10.0)
    arrivals = [second / 100 + (0.004 if second % 2 else -0.004) for second in range(1000)]  # 100 Hz, jitter
    taken = [now for now in arrivals if grid.take(now)]
    assert 99 <= len(taken) <= 101  # 10 s at 10 a second


def test_a_grid_at_exactly_the_source_rate_takes_every_jittery_message():
    grid = RateGrid(100.0)
    arrivals = [n / 100 + (0.003 if n % 3 == 0 else -0.002) for n in range(500)]
    assert sum(grid.take(now) for now in arrivals) == 500


def test_a_grid_without_a_limit_takes_everything():
    grid = RateGrid(0)
    assert all(grid.take(0.0) for _ in range(10))


def test_a_sparse_channel_is_not_lost_to_the_grid_and_the_total_stays_bounded():
    """A channel in every 10th message only (presence bit 2) reaches a 10 Hz feed of a 100 Hz stream."""
    grid = SparseAwareGrid(10.0, extra_factor=3.0)
    taken_with_sparse = taken = 0
    for n in range(1000):  # 10 s at 100 Hz; the sparse channel at n % 10 == 5, off the grid's phase
        presence = 0b11 if n % 10 == 5 else 0b01
        if grid.take(n / 100, presence):
            taken += 1
            taken_with_sparse += presence == 0b11
    assert taken_with_sparse >= 50  # most of its 100 values (rate-limited extra takes)
    assert taken <= 10 * 10 * (1 + 3.0) + 2
