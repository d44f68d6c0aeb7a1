"""The retry budget: exact arithmetic and the sliding window, on an injected clock."""

from __future__ import annotations

import pytest

from sidecar.resilience.budget import RetryBudget


class FakeClock:
    """A clock the test moves by hand (a seam, like the one the budget takes)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spend_all(budget: RetryBudget, limit: int = 10_000) -> int:
    """How many retries the budget grants right now."""
    granted = 0
    while granted < limit and budget.try_spend():
        granted += 1
    return granted


def test_ratio_only_allows_that_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=FakeClock())
    for _ in range(10):
        budget.record_request()
    assert spend_all(budget) == 2  # 2 <= 0.2 * 10, a third would be 3 > 2
    assert budget.retries_in_window == 2
    for _ in range(5):
        budget.record_request()
    assert spend_all(budget) == 1  # 3 <= 0.2 * 15


def test_floor_adds_min_per_second_times_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1, window=10, clock=FakeClock())
    assert spend_all(budget) == 10  # no requests: only the floor, 1/s over 10 s
    for _ in range(10):
        budget.record_request()
    assert spend_all(budget) == 2  # 12 <= 0.2 * 10 + 10


def test_fractional_products_land_on_the_intended_side() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0, clock=FakeClock())
    for _ in range(30):
        budget.record_request()
    assert spend_all(budget) == 3  # 0.1 * 30 is 3 in decimal, not 2.9999...


def test_min_per_second_zero_and_no_requests_allows_nothing() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=FakeClock())
    assert not budget.try_spend()
    assert budget.retries_in_window == 0  # a refused retry is not counted


def test_requests_and_retries_slide_out_of_the_window() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=10, clock=clock)
    for _ in range(4):
        budget.record_request()
    assert spend_all(budget) == 2

    clock.now = 1005.0
    for _ in range(4):
        budget.record_request()
    assert budget.requests_in_window == 8
    assert spend_all(budget) == 2  # 4 <= 0.5 * 8

    clock.now = 1009.9  # the first second is still inside the last 10 s
    assert budget.requests_in_window == 8
    assert not budget.try_spend()

    clock.now = 1010.0  # ... and now it has left, with its requests and retries
    assert budget.requests_in_window == 4
    assert budget.retries_in_window == 2
    assert not budget.try_spend()  # 3 > 0.5 * 4

    clock.now = 1015.0  # everything has left
    assert budget.requests_in_window == 0
    assert budget.retries_in_window == 0


def test_a_long_idle_gap_clears_the_whole_window() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=10, clock=clock)
    for _ in range(100):
        budget.record_request()
    clock.now = 1e9  # far more buckets than the ring holds: cleared in bounded work
    assert budget.requests_in_window == 0
    budget.record_request()
    assert spend_all(budget) == 1


def test_short_windows_use_finer_buckets() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=1.0, clock=clock)
    budget.record_request()
    clock.now = 0.95
    assert budget.requests_in_window == 1
    clock.now = 1.05
    assert budget.requests_in_window == 0


def test_a_clock_stepping_back_keeps_counting_in_the_newest_bucket() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=10, clock=clock)
    budget.record_request()
    clock.now = 95.0
    budget.record_request()
    assert budget.requests_in_window == 2
    clock.now = 110.0
    assert budget.requests_in_window == 0


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1, min_per_second=0)
    with pytest.raises(ValueError):
        RetryBudget(ratio=0.2, min_per_second=-1)
    with pytest.raises(ValueError):
        RetryBudget(ratio=0.2, min_per_second=0, window=0)


def test_with_the_real_clock() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0)
    for _ in range(4):
        budget.record_request()
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    assert budget.requests_in_window == 4
    assert budget.retries_in_window == 2
