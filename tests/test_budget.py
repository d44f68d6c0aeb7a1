"""The retry budget: ceiling and throttle arithmetic, on an injected clock.

The last part simulates the two traffic shapes the budget is built for, deterministically
(seeded), over a minute of fake time: every attempt failing (the retries that reach the
upstream stay within 1.25 x requests + the floor in every 10 s), and 20 % failing at
random (every retry the policy asks for goes through).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from sidecar.config.model import BudgetConfig
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


# -- the throttle -------------------------------------------------------------------------


def test_the_reserve_is_a_quarter_of_the_floor() -> None:
    assert RetryBudget(ratio=0.3, min_per_second=10).reserve == 25
    assert RetryBudget(ratio=0.3, min_per_second=2).reserve == 5
    assert RetryBudget(ratio=0.3, min_per_second=0.1).reserve == 1  # at least one token
    assert RetryBudget(ratio=0.3, min_per_second=0).reserve == 0  # no floor: no throttle


def test_failures_drain_the_reserve_and_then_retries_stop() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=10, clock=clock)
    for _ in range(100):
        budget.record_request()
    for _ in range(24):
        budget.record_attempt(failed=True)
    assert budget.tokens == 1
    assert budget.try_spend()  # one token left: allowed (a retry costs nothing itself)
    budget.record_attempt(failed=True)
    assert budget.tokens == 0
    assert not budget.try_spend()  # the ceiling (1.0 x 100 + 100) would allow it
    assert budget.retries_in_window == 1  # a refused retry is not counted


def test_successes_give_tokens_back_up_to_the_reserve() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=10, clock=clock)
    for _ in range(30):
        budget.record_attempt(failed=True)
    assert budget.tokens == 0
    budget.record_attempt(failed=False)
    assert budget.tokens == 1
    assert budget.try_spend()
    for _ in range(100):
        budget.record_attempt(failed=False)
    assert budget.tokens == 25


def test_time_refills_the_reserve_at_min_per_second() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=10, clock=clock)
    for _ in range(30):
        budget.record_attempt(failed=True)
    assert not budget.try_spend()
    clock.now += 0.05
    assert budget.tokens == pytest.approx(0.5)
    assert not budget.try_spend()
    clock.now += 0.05
    assert budget.try_spend()
    clock.now += 100
    assert budget.tokens == 25


def test_without_a_floor_there_is_no_throttle() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=FakeClock())
    for _ in range(10):
        budget.record_request()
    for _ in range(1000):
        budget.record_attempt(failed=True)
    assert spend_all(budget) == 5  # the ratio alone


def test_snapshot() -> None:
    budget = RetryBudget(ratio=0.3, min_per_second=10, clock=FakeClock())
    for _ in range(10):
        budget.record_request()
    budget.record_attempt(failed=True)
    assert budget.try_spend()
    assert budget.snapshot() == {
        "requests": 10,
        "retries": 1,
        "allowance": 103.0,
        "throttle_tokens": 24.0,
        "throttle_reserve": 25.0,
    }


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


# -- the two traffic shapes, simulated -----------------------------------------------------


@dataclass
class Run:
    """What a simulated minute produced, per second of fake time."""

    requests: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)  # attempts that reached the upstream
    asked: int = 0  # retries the policy asked for
    refused: int = 0

    def worst_window(self, floor: float) -> float:
        """The largest `reached - 1.25 x requests - floor` over every 10 s window."""
        worst = float("-inf")
        for start in range(len(self.requests) - 9):
            requests = sum(self.requests[start : start + 10])
            reached = sum(self.reached[start : start + 10])
            worst = max(worst, reached - 1.25 * requests - floor)
        return worst


def simulate(
    budget: RetryBudget,
    clock: FakeClock,
    *,
    rate: float,
    max_retries: int,
    fail_share: float,
    seconds: int = 60,
    seed: int = 0,
) -> Run:
    """Requests at `rate`/s; each attempt reaches the upstream and fails with `fail_share`;
    retried (as the attempt loop does) up to `max_retries` times if the budget allows."""
    rng = random.Random(seed)
    run = Run()
    step = 1 / rate
    per_second = round(rate)
    for _ in range(seconds):
        requests = reached = 0
        for _ in range(per_second):
            clock.now += step
            budget.record_request()
            requests += 1
            for n in range(max_retries + 1):
                reached += 1
                failed = rng.random() < fail_share
                budget.record_attempt(failed)
                if not failed or n == max_retries:
                    break
                run.asked += 1
                if not budget.try_spend():
                    run.refused += 1
                    break
        run.requests.append(requests)
        run.reached.append(reached)
    return run


def default_budget(clock: FakeClock, ratio: float | None = None) -> RetryBudget:
    d = BudgetConfig()
    return RetryBudget(d.ratio if ratio is None else ratio, d.min_per_second, clock=clock)


@pytest.mark.parametrize("rate", [200, 1000])
@pytest.mark.parametrize("max_retries", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_at_twenty_percent_random_failures_every_retry_goes_through(
    rate: int, max_retries: int, seed: int
) -> None:
    run = simulate(
        default_budget(FakeClock()),
        FakeClock(),
        rate=rate,
        max_retries=max_retries,
        fail_share=0.2,
        seed=seed,
    )
    expected = sum(0.2**n for n in range(1, max_retries + 1)) * rate * 60
    assert run.asked == pytest.approx(expected, rel=0.05)
    assert run.refused == 0


def test_a_ceiling_of_0_25_would_refuse_some_at_1000_per_second() -> None:
    # Why the default ratio is 0.3: max_retries 3 asks for 0.248 retries per request, and
    # the 10 s count fluctuates by about 55 around 2,480 against a ceiling of 2,600.
    refused = 0
    for seed in range(10):
        clock = FakeClock()
        run = simulate(
            default_budget(clock, ratio=0.25),
            clock,
            rate=1000,
            max_retries=3,
            fail_share=0.2,
            seed=seed,
        )
        refused += run.refused
        if refused:
            break
    assert refused > 0


@pytest.mark.parametrize("rate", [1, 5, 20, 100, 200, 1000])
@pytest.mark.parametrize("max_retries", [1, 2, 3, 5])
def test_with_every_attempt_failing_retries_never_multiply_the_outage(
    rate: int, max_retries: int
) -> None:
    clock = FakeClock()
    budget = default_budget(clock)
    run = simulate(budget, clock, rate=rate, max_retries=max_retries, fail_share=1.0)
    # In every 10 s: reached <= 1.25 x requests + min_per_second x 10.
    assert run.worst_window(budget.floor) <= 0
    # Not just the ratio at work: beyond the floor, the throttle lets almost nothing through.
    assert sum(run.reached) - sum(run.requests) <= budget.floor * 6 + budget.reserve


def test_the_throttle_is_what_holds_an_outage_below_the_ceiling() -> None:
    # Same outage, a healthy window first: the ceiling alone (0.3 x requests + 100) would
    # let 30 % through; the throttle stops retries within its reserve of failures.
    clock = FakeClock()
    budget = default_budget(clock)
    healthy = simulate(budget, clock, rate=200, max_retries=2, fail_share=0.0, seconds=10)
    assert healthy.refused == 0
    outage = simulate(budget, clock, rate=200, max_retries=2, fail_share=1.0, seconds=10)
    retries = sum(outage.reached) - sum(outage.requests)
    assert retries <= budget.reserve + budget.floor
    assert retries < 0.3 * sum(outage.requests)
