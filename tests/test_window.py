"""The sliding time window shared by the breaker and the budget, on a hand-moved clock."""

from __future__ import annotations

import pytest

from sidecar.resilience.window import SlidingWindow


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_per_field_and_totals() -> None:
    clock = FakeClock()
    window = SlidingWindow(10.0, 3, clock)
    window.add(0)
    window.add(0)
    window.add(2, 5)
    assert window.read() == [2, 0, 5]


def test_counts_leave_a_whole_bucket_at_a_time() -> None:
    clock = FakeClock(1000.0)
    window = SlidingWindow(10.0, 1, clock)
    assert window.bucket_width == 1.0
    window.add(0)  # bucket [1000, 1001)
    clock.now = 1005.5
    window.add(0)  # bucket [1005, 1006)
    clock.now = 1009.99
    assert window.read() == [2]
    clock.now = 1010.0  # the first bucket has left: the window is (1000, 1010]
    assert window.read() == [1]
    clock.now = 1015.0
    assert window.read() == [0]


def test_short_windows_have_ten_finer_buckets() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindow(2.0, 1, clock)
    assert window.bucket_width == pytest.approx(0.2)
    window.add(0)
    clock.now = 1.95
    assert window.read() == [1]
    clock.now = 2.05
    assert window.read() == [0]


def test_long_windows_keep_one_second_buckets() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindow(60.0, 1, clock)
    assert window.bucket_width == 1.0
    window.add(0)
    clock.now = 59.5
    assert window.read() == [1]
    clock.now = 60.0
    assert window.read() == [0]


def test_a_long_gap_clears_everything_in_bounded_work() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindow(10.0, 2, clock)
    for _ in range(100):
        window.add(1)
    clock.now = 1e12
    assert window.read() == [0, 0]
    window.add(0)
    assert window.read() == [1, 0]


def test_a_clock_stepping_back_keeps_counting_in_the_newest_bucket() -> None:
    clock = FakeClock(100.0)
    window = SlidingWindow(10.0, 1, clock)
    window.add(0)
    clock.now = 95.0
    window.add(0)
    assert window.read() == [2]
    clock.now = 110.0
    assert window.read() == [0]


def test_clear_forgets_everything() -> None:
    window = SlidingWindow(10.0, 2, FakeClock())
    window.add(0, 3)
    window.add(1, 4)
    window.clear()
    assert window.read() == [0, 0]
    window.add(1)
    assert window.read() == [0, 1]


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="window must be > 0 seconds, got 0"):
        SlidingWindow(0, 1)
    with pytest.raises(ValueError, match="at least one field, got 0"):
        SlidingWindow(10, 0)
