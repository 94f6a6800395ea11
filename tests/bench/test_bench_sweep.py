"""The rate sweep's search: ascending grid until a rate falls short, then bisection."""

from __future__ import annotations

import pytest

from pdserve.bench.sweep import RateSweep


def run(sweep: RateSweep, capacity: float) -> list[float]:
    """Drive the sweep against a server that holds the target up to `capacity` req/s."""
    ran = []
    while (rate := sweep.next_rate()) is not None:
        ran.append(rate)
        sweep.record(rate, 1.0 if rate <= capacity else 0.5)
    return ran


def test_grid_runs_ascending_and_stops_at_the_first_bad_rate():
    sweep = RateSweep([8, 1, 4, 2, 16], target_share=0.9)
    assert run(sweep, capacity=5) == [1, 2, 4, 8]
    assert sweep.best_rate == 4
    assert sweep.first_bad_rate == 8


def test_bisection_narrows_between_best_and_first_bad():
    sweep = RateSweep([1, 2, 4, 8], target_share=0.9, search_steps=3)
    assert run(sweep, capacity=5) == [1, 2, 4, 8, 6, 5, 5.5]
    assert sweep.best_rate == 5
    assert sweep.first_bad_rate == 5.5


def test_all_good_rates_report_the_highest():
    sweep = RateSweep([1, 2], target_share=0.9, search_steps=4)
    assert run(sweep, capacity=100) == [1, 2]
    assert sweep.best_rate == 2 and sweep.first_bad_rate is None


def test_no_good_rate_bisects_towards_zero():
    sweep = RateSweep([4], target_share=0.9, search_steps=2)
    assert run(sweep, capacity=1.5) == [4, 2, 1]
    assert sweep.best_rate == 1


def test_a_good_rate_above_a_bad_one_does_not_count():
    sweep = RateSweep([1, 2, 3], target_share=0.9)
    sweep.record(1, 1.0)
    sweep.record(2, 0.1)
    sweep.record(3, 1.0)  # noise: a later good result above a bad rate
    assert sweep.best_rate == 1


@pytest.mark.parametrize("share,good", [(0.9, True), (0.89, False)])
def test_the_target_share_itself_is_good(share: float, good: bool):
    sweep = RateSweep([1], target_share=0.9)
    sweep.record(1, share)
    assert (sweep.best_rate == 1) is good
