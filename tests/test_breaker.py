"""The circuit breaker: rules, windows, open periods and trials, on a hand-moved clock.

Real pybreaker underneath, a fake clock on top (the breaker's seam): every number here is
exact arithmetic, nothing sleeps except the few tests about asyncio cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import current_state

from sidecar.config.model import CircuitBreakerConfig, FailureRateConfig, SlowCallConfig
from sidecar.metrics import Metrics
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker, Trial
from sidecar.vocab import BreakerState, Outcome, TripReason

SERVICE = "orders"
WALL_OFFSET = 1_700_000_000.0

OK = "ok"
FAIL = "fail"  # an HTTP 503
CONNECT = "connect"
RESET = "reset"
TIMEOUT = "timeout"
KINDS = {
    FAIL: Outcome.RESPONSE,
    CONNECT: Outcome.CONNECT_ERROR,
    RESET: Outcome.RESET,
    TIMEOUT: Outcome.TIMEOUT,
}


class FakeClock:
    """Monotonic and wall time the test moves by hand; wall = monotonic + an offset."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


MakeBreaker = Callable[..., ServiceBreaker]


@pytest.fixture
def make_breaker(metrics: Metrics, clock: FakeClock) -> Iterator[MakeBreaker]:
    made: list[ServiceBreaker] = []

    def make(**overrides: Any) -> ServiceBreaker:
        config = CircuitBreakerConfig(**overrides)
        breaker = ServiceBreaker(SERVICE, config, metrics, clock=clock.monotonic, wall=clock.wall)
        made.append(breaker)
        return breaker

    yield make
    for breaker in made:
        breaker.close()


def attempt(
    breaker: ServiceBreaker, outcome: str, clock: FakeClock | None = None, took: float = 0.0
) -> Trial:
    """One admitted attempt with `outcome`, taking `took` seconds on the fake clock."""
    trial = breaker.admit()
    if clock is not None and took:
        clock.advance(took)
    if outcome == OK:
        trial.success()
    else:
        trial.failure(f"{outcome} from 127.0.0.1:9", KINDS[outcome])
    return trial


def request(breaker: ServiceBreaker, *outcomes: str) -> int:
    """One request, as the attempt loop makes it: attempts in order until one succeeds, the
    outcomes run out or the breaker opens; then `request_done()` on the last. Returns the
    number of attempts made (0 if the first was refused)."""
    last: Trial | None = None
    made = 0
    for outcome in outcomes:
        try:
            last = attempt(breaker, outcome)
        except CircuitOpen:
            break
        made += 1
        if outcome == OK or current_state(breaker) is BreakerState.OPEN:
            break
    if last is not None:
        last.request_done()
    return made


def failed_requests(breaker: ServiceBreaker, count: int, *outcomes: str) -> None:
    for _ in range(count):
        request(breaker, *(outcomes or (FAIL,)))


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"service": SERVICE, **labels})


def trips(metrics: Metrics, reason: str) -> float | None:
    return sample(metrics, "sidecar_circuit_breaker_trips_total", reason=reason)


def transitions(metrics: Metrics, from_state: str, to_state: str) -> float | None:
    return sample(
        metrics,
        "sidecar_circuit_breaker_transitions_total",
        from_state=from_state,
        to_state=to_state,
    )


def gauge(metrics: Metrics, state: str) -> float | None:
    return sample(metrics, "sidecar_circuit_breaker_state", state=state)


def open_breaker(breaker: ServiceBreaker) -> None:
    failed_requests(breaker, breaker.config.failure_threshold)
    assert current_state(breaker) is BreakerState.OPEN


def half_open(breaker: ServiceBreaker, clock: FakeClock) -> None:
    """Wait out the current open period (on the fake clock) and half-open."""
    clock.advance(breaker.open_remaining())
    assert breaker.end_open_period()
    assert current_state(breaker) is BreakerState.HALF_OPEN


# -- the consecutive rule counts requests ------------------------------------------------


def test_opens_at_exactly_the_threshold_th_consecutive_failed_request(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=5)
    for n in range(1, 5):
        assert request(breaker, FAIL, FAIL, FAIL) == 3  # default retries: three attempts
        assert current_state(breaker) is BreakerState.CLOSED
        assert breaker.snapshot()["failures"] == n
    assert request(breaker, FAIL, FAIL, FAIL) == 3
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.CONSECUTIVE
    assert trips(metrics, "consecutive") == 1
    assert request(breaker, FAIL) == 0  # refused from now on


def test_failed_attempts_that_end_in_success_are_not_failed_requests(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=3)
    for _ in range(10):
        request(breaker, FAIL, FAIL, OK)  # 20 failed attempts, but every request succeeds
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 0


def test_a_successful_request_resets_the_run(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=3)
    failed_requests(breaker, 2)
    request(breaker, OK)
    assert breaker.snapshot()["failures"] == 0
    failed_requests(breaker, 2)
    assert current_state(breaker) is BreakerState.CLOSED
    failed_requests(breaker, 1)
    assert current_state(breaker) is BreakerState.OPEN


@pytest.mark.parametrize("max_retries", [0, 2, 3])
def test_all_attempts_refused_open_at_the_fifth_request_whatever_the_retries(
    make_breaker: MakeBreaker, max_retries: int
) -> None:
    # 1 request/s with every attempt refused: the fifth request opens it, by the
    # consecutive rule; with max_retries 3 that is 20 attempts, so a rate rule gated at
    # min_calls 20 would fire on the same attempt, and the reason is still consecutive.
    breaker = make_breaker(failure_rate=FailureRateConfig(min_calls=20))
    attempts = (CONNECT,) * (max_retries + 1)
    for _ in range(4):
        assert request(breaker, *attempts) == max_retries + 1
    assert current_state(breaker) is BreakerState.CLOSED
    assert request(breaker, *attempts) == max_retries + 1
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.CONSECUTIVE
    assert breaker.transport_evidence


def test_a_request_without_request_done_never_counts(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1)
    for _ in range(5):
        attempt(breaker, FAIL)  # attempts of requests still retrying
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 0


# -- the failure-rate rule counts attempts over a sliding window ---------------------------


def test_failure_rate_trips_once_min_calls_are_in_the_window(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(
        failure_threshold=1000, failure_rate=FailureRateConfig(threshold=0.5, min_calls=20)
    )
    for _ in range(19):
        attempt(breaker, FAIL)
    assert current_state(breaker) is BreakerState.CLOSED  # 19 calls: the rule waits
    assert breaker.window_calls == 19
    assert breaker.failure_rate == 1.0
    attempt(breaker, FAIL)
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.FAILURE_RATE
    assert trips(metrics, "failure_rate") == 1
    assert trips(metrics, "consecutive") == 0


def test_failure_rate_at_exactly_the_threshold_trips_on_a_failure(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(
        failure_threshold=1000, failure_rate=FailureRateConfig(threshold=0.5, min_calls=20)
    )
    for _ in range(10):
        request(breaker, FAIL, OK)  # 50 % of attempts fail; every request succeeds
    # 20 calls, 10 failed: but the 20th call was a success, and only failures trip.
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.failure_rate == 0.5
    attempt(breaker, FAIL)  # 11 of 21
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.FAILURE_RATE


def test_below_the_threshold_never_trips(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_rate=FailureRateConfig(threshold=0.5, min_calls=10))
    for _ in range(200):
        request(breaker, OK)
        request(breaker, OK)
        request(breaker, FAIL, OK)  # 1 of 4 attempts fails
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.failure_rate == pytest.approx(0.25)


def test_the_window_slides(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(
        failure_threshold=1000,
        failure_rate=FailureRateConfig(threshold=0.5, window=10.0, min_calls=20),
    )
    for _ in range(15):
        attempt(breaker, FAIL)  # at t = 100
    clock.advance(5)
    for _ in range(15):
        attempt(breaker, OK)  # at t = 105: 15 of 30 failed
    assert breaker.failure_rate == 0.5
    clock.advance(5)  # t = 110: the first second's failures have left the window
    assert breaker.window_calls == 15
    assert breaker.failure_rate == 0.0
    for _ in range(5):
        attempt(breaker, FAIL)  # 5 of 20: far below
    assert current_state(breaker) is BreakerState.CLOSED
    clock.advance(10)
    assert breaker.window_calls == 0
    assert breaker.failure_rate == 0.0  # an empty window reads 0


def test_a_short_window_forgets_in_fine_steps(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(
        failure_threshold=1000,
        failure_rate=FailureRateConfig(threshold=0.5, window=2.0, min_calls=10),
    )
    for _ in range(9):
        attempt(breaker, FAIL)
    clock.advance(2.05)  # 0.2 s buckets: all nine have left
    for _ in range(9):
        attempt(breaker, FAIL)
    assert current_state(breaker) is BreakerState.CLOSED
    attempt(breaker, FAIL)
    assert current_state(breaker) is BreakerState.OPEN


def test_failure_rate_off_leaves_only_consecutive(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1000, failure_rate=None)
    for _ in range(500):
        attempt(breaker, FAIL)
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.failure_rate == 1.0  # still measured, for /admin/state and the gauge


def test_ignored_and_abandoned_attempts_are_not_calls(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1, failure_rate=FailureRateConfig(min_calls=2))
    for _ in range(10):
        trial = breaker.admit()
        trial.ignore()
        trial.request_done()
        breaker.admit().abandon()
    assert breaker.window_calls == 0
    assert breaker.snapshot()["failures"] == 0
    assert current_state(breaker) is BreakerState.CLOSED


# -- the slow-call rule --------------------------------------------------------------------


def test_slow_calls_trip_on_their_share_failed_or_not(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker(
        failure_rate=FailureRateConfig(min_calls=10, window=60.0),  # all 14 s of it
        slow_call=SlowCallConfig(duration=1.0, rate=0.8),
    )
    attempt(breaker, OK, clock, took=0.5)
    attempt(breaker, OK, clock, took=1.0)  # exactly the duration is not slower than it
    for _ in range(6):
        attempt(breaker, OK, clock, took=1.5)
    attempt(breaker, TIMEOUT, clock, took=2.0)  # a failed slow call counts as slow too
    assert current_state(breaker) is BreakerState.CLOSED  # 9 calls: below min_calls
    assert breaker.slow_call_rate == pytest.approx(7 / 9)
    request_trial = breaker.admit()
    clock.advance(1.5)
    request_trial.success()  # 8 of 10 slow: 80 %
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.SLOW_CALL
    assert trips(metrics, "slow_call") == 1


def test_slow_call_with_failure_rate_off_uses_the_default_gate(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_rate=None, slow_call=SlowCallConfig(duration=0.1, rate=1.0))
    gate = FailureRateConfig().min_calls
    for _ in range(gate - 1):
        attempt(breaker, OK, clock, took=0.11)  # 50 of them fit in the default 10 s window
    assert current_state(breaker) is BreakerState.CLOSED
    attempt(breaker, OK, clock, took=0.11)
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.SLOW_CALL


def test_without_slow_call_nothing_is_slow(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(failure_rate=FailureRateConfig(min_calls=2))
    for _ in range(10):
        attempt(breaker, OK, clock, took=60.0)
    assert breaker.slow_call_rate == 0.0
    assert current_state(breaker) is BreakerState.CLOSED


# -- which rule is named ---------------------------------------------------------------------


def test_consecutive_is_named_when_the_rate_fires_on_the_run_completing_attempt(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=2, failure_rate=FailureRateConfig(min_calls=4))
    request(breaker, FAIL, FAIL)  # failed request 1, calls 2
    assert request(breaker, FAIL, FAIL, FAIL) == 2  # the 4th call fires the rate rule ...
    assert breaker.trip_reason is TripReason.CONSECUTIVE  # ... and ends failed request 2
    assert trips(metrics, "consecutive") == 1
    assert trips(metrics, "failure_rate") == 0


def test_failure_rate_is_named_before_slow_call(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker(
        failure_threshold=100,
        failure_rate=FailureRateConfig(threshold=0.5, min_calls=4),
        slow_call=SlowCallConfig(duration=1.0, rate=0.5),
    )
    attempt(breaker, OK, clock, took=0.1)
    attempt(breaker, OK, clock, took=0.1)
    attempt(breaker, TIMEOUT, clock, took=2.0)  # failed and slow; 3 calls: the rules wait
    assert current_state(breaker) is BreakerState.CLOSED
    attempt(breaker, TIMEOUT, clock, took=2.0)  # 2 of 4 failed, 2 of 4 slow: both fire
    assert breaker.trip_reason is TripReason.FAILURE_RATE
    assert trips(metrics, "failure_rate") == 1
    assert trips(metrics, "slow_call") == 0


# -- the tripping attempt, refusals, Retry-After ----------------------------------------------


def test_the_tripping_attempt_resolves_normally_and_later_ones_are_refused(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=1)
    trial = breaker.admit()
    trial.failure("connect_error", Outcome.CONNECT_ERROR)  # returns: no exception
    trial.request_done()
    assert current_state(breaker) is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert info.value.state is BreakerState.OPEN
    assert info.value.service == SERVICE
    assert sample(metrics, "sidecar_circuit_breaker_rejected_total") == 1


def test_retry_after_while_open_is_the_rest_of_the_open_period(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    open_breaker(breaker)
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert info.value.retry_after == 5.0
    clock.advance(3.25)
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert info.value.retry_after == pytest.approx(1.75)
    assert breaker.retry_after() == pytest.approx(1.75)
    assert current_state(breaker) is BreakerState.OPEN  # a refused call does not start a trial


def test_retry_after_while_half_open_and_busy_is_one_second(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=30.0)
    open_breaker(breaker)
    half_open(breaker, clock)
    breaker.admit()
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert info.value.state is BreakerState.HALF_OPEN
    assert info.value.retry_after == 1.0
    assert breaker.retry_after() == 1.0


def test_statuses_that_count_as_failures(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_status=frozenset({500, 503}))
    assert breaker.is_failure_status(503)
    assert breaker.is_failure_status(500)
    assert not breaker.is_failure_status(502)
    assert not breaker.is_failure_status(200)
    assert not breaker.is_failure_status(404)


# -- open periods: end, growth, reset ----------------------------------------------------


def test_the_end_of_the_open_period_half_opens_without_traffic(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    open_breaker(breaker)
    clock.advance(4.999)
    assert not breaker.end_open_period()
    assert current_state(breaker) is BreakerState.OPEN
    clock.advance(0.001)
    assert breaker.end_open_period()
    assert current_state(breaker) is BreakerState.HALF_OPEN
    assert (gauge(metrics, "open"), gauge(metrics, "half_open")) == (0, 1)
    assert transitions(metrics, "open", "half_open") == 1
    assert breaker.open_until is None


def test_admit_after_the_period_half_opens_if_nothing_did_yet(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    open_breaker(breaker)
    clock.advance(5.0)
    assert breaker.retry_after() is None  # a call now would be admitted ...
    trial = breaker.admit()  # ... as a trial
    assert trial.half_open
    assert current_state(breaker) is BreakerState.HALF_OPEN
    trial.success()
    assert current_state(breaker) is BreakerState.CLOSED


def test_failed_trials_double_the_period_up_to_the_cap_and_closing_resets_it(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0, max_reset_timeout=30.0)
    open_breaker(breaker)
    assert breaker.open_period == 5.0
    periods = []
    for _ in range(5):
        half_open(breaker, clock)
        attempt(breaker, FAIL)  # the trial fails: re-open
        assert current_state(breaker) is BreakerState.OPEN
        assert breaker.trip_reason is TripReason.CONSECUTIVE  # kept until it closes
        periods.append(breaker.open_period)
        assert breaker.open_remaining() == breaker.open_period
    assert periods == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert trips(metrics, "consecutive") == 1  # re-opens are not trips
    assert transitions(metrics, "closed", "open") == 1
    assert transitions(metrics, "half_open", "open") == 5

    half_open(breaker, clock)
    attempt(breaker, OK)
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.trip_reason is None
    assert breaker.open_period == 5.0
    open_breaker(breaker)
    assert breaker.open_remaining() == 5.0  # the next trip starts from the base again
    assert trips(metrics, "consecutive") == 2


def test_the_default_cap_is_sixty_seconds_or_reset_timeout(make_breaker: MakeBreaker) -> None:
    assert CircuitBreakerConfig(reset_timeout=5.0).open_period_cap == 60.0
    assert CircuitBreakerConfig(reset_timeout=90.0).open_period_cap == 90.0
    assert CircuitBreakerConfig().reset_timeout == 5.0


def test_open_until_is_since_plus_the_period(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    assert breaker.open_until is None
    open_breaker(breaker)
    snap = breaker.snapshot()
    assert snap["open_until"] == snap["since"] + 5.0 == clock.wall() + 5.0
    half_open(breaker, clock)
    attempt(breaker, FAIL)
    snap = breaker.snapshot()
    assert snap["open_until"] == snap["since"] + 10.0


def test_a_passing_probe_half_opens_only_an_open_breaker(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=30.0)
    assert not breaker.probe_passed()  # closed: nothing to do
    open_breaker(breaker)
    epoch = breaker.epoch
    assert breaker.probe_passed()
    assert current_state(breaker) is BreakerState.HALF_OPEN
    assert breaker.epoch == epoch + 1
    assert not breaker.probe_passed()  # already half-open


# -- evidence for the probes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "evidence"),
    [
        ((CONNECT,), True),
        ((RESET,), True),
        ((FAIL,), False),
        ((TIMEOUT,), False),
        ((FAIL, CONNECT), True),
    ],
)
def test_transport_evidence_of_a_trip(
    make_breaker: MakeBreaker, outcomes: tuple[str, ...], evidence: bool
) -> None:
    breaker = make_breaker(failure_threshold=2)
    request(breaker, outcomes[0])
    request(breaker, outcomes[-1])
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.transport_evidence is evidence


def evidence(breaker: ServiceBreaker) -> bool:
    """`transport_evidence` now, read through a call for the reason `current_state` is."""
    return breaker.transport_evidence


def test_a_trial_failure_replaces_the_evidence(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(failure_threshold=1)
    request(breaker, CONNECT)
    assert evidence(breaker)
    half_open(breaker, clock)
    attempt(breaker, FAIL)  # it accepts connections now, and answers 503
    assert not evidence(breaker)
    half_open(breaker, clock)
    attempt(breaker, RESET)
    assert evidence(breaker)
    half_open(breaker, clock)
    attempt(breaker, OK)
    assert not evidence(breaker)


# -- half-open trials ---------------------------------------------------------------------


def test_half_open_admits_only_max_requests_trials_at_once(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, half_open_max_requests=2, success_threshold=2)
    open_breaker(breaker)
    half_open(breaker, clock)
    first, second = breaker.admit(), breaker.admit()
    for _ in range(5):
        with pytest.raises(CircuitOpen):
            breaker.admit()
    assert breaker.snapshot()["trials_in_flight"] == 2
    first.success()
    assert current_state(breaker) is BreakerState.HALF_OPEN
    assert breaker.snapshot()["half_open_successes"] == 1
    third = breaker.admit()  # a slot freed
    second.success()
    assert current_state(breaker) is BreakerState.CLOSED
    third.success()  # from the half-open epoch: stale, changes nothing
    assert current_state(breaker) is BreakerState.CLOSED


async def test_half_open_gates_concurrent_tasks(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, half_open_max_requests=2, success_threshold=2)
    open_breaker(breaker)
    half_open(breaker, clock)
    release = asyncio.Event()

    async def one_attempt() -> str:
        try:
            trial = breaker.admit()
        except CircuitOpen as exc:
            assert exc.state is BreakerState.HALF_OPEN
            return "rejected"
        try:
            await release.wait()
        except asyncio.CancelledError:
            trial.abandon()
            raise
        trial.success()
        return "admitted"

    tasks = [asyncio.create_task(one_attempt()) for _ in range(10)]
    await asyncio.sleep(0)
    assert breaker.snapshot()["trials_in_flight"] == 2
    release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("admitted") == 2
    assert results.count("rejected") == 8
    assert current_state(breaker) is BreakerState.CLOSED


def test_an_abandoned_trial_reopens_for_the_same_period(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    open_breaker(breaker)
    half_open(breaker, clock)
    breaker.admit().abandon()
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.open_period == 5.0  # not doubled: a cancelled trial is no evidence
    assert trips(metrics, "consecutive") == 1
    half_open(breaker, clock)
    trial = breaker.admit()  # the slot is free in the next half-open period
    assert trial.half_open
    trial.success()
    assert current_state(breaker) is BreakerState.CLOSED


def test_an_ignored_trial_frees_its_slot_and_decides_nothing(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1)
    open_breaker(breaker)
    half_open(breaker, clock)
    trial = breaker.admit()
    with pytest.raises(CircuitOpen):
        breaker.admit()
    trial.ignore()  # e.g. the app's own short deadline ran out
    assert current_state(breaker) is BreakerState.HALF_OPEN
    breaker.admit().success()
    assert current_state(breaker) is BreakerState.CLOSED


def test_a_slow_trial_reopens_when_slow_call_is_on(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1, slow_call=SlowCallConfig(duration=1.0, rate=0.5))
    open_breaker(breaker)
    half_open(breaker, clock)
    attempt(breaker, OK, clock, took=1.5)
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.open_period == 10.0
    half_open(breaker, clock)
    attempt(breaker, OK, clock, took=0.5)
    assert current_state(breaker) is BreakerState.CLOSED


def test_a_half_open_request_done_does_not_count_for_the_run(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=2, success_threshold=1)
    open_breaker(breaker)
    half_open(breaker, clock)
    trial = attempt(breaker, OK)
    trial.request_done()
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 0


def test_outcomes_of_attempts_admitted_before_a_state_change_do_not_count(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1)
    slow = breaker.admit()  # admitted while closed
    request(breaker, FAIL)  # trips the breaker
    half_open(breaker, clock)
    trial = breaker.admit()
    slow.success()  # a closed-era success must not decide the half-open trial
    slow.request_done()
    assert current_state(breaker) is BreakerState.HALF_OPEN
    trial.failure("HTTP 502", Outcome.RESPONSE)
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.last_failure == "HTTP 502"


def test_a_trial_resolves_once_and_later_calls_are_ignored(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1)
    trial = breaker.admit()
    trial.success()
    trial.failure("HTTP 503")
    trial.abandon()
    trial.ignore()
    trial.request_done()
    assert trial.resolved
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.last_failure is None


# -- asyncio: cancellation and deadlines inside a trial ----------------------------------------


async def test_a_cancelled_task_holding_a_trial_abandons_it_and_cancellation_propagates(
    make_breaker: MakeBreaker, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=1)
    open_breaker(breaker)
    half_open(breaker, clock)
    started = asyncio.Event()

    async def hold() -> None:
        trial = breaker.admit()
        try:
            started.set()
            await asyncio.sleep(60)
            trial.success()
        except asyncio.CancelledError:
            trial.abandon()
            raise

    task = asyncio.create_task(hold())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert current_state(breaker) is BreakerState.OPEN


async def test_a_cancelled_attempt_in_closed_state_leaves_the_counts_alone(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=2)
    failed_requests(breaker, 1)
    started = asyncio.Event()

    async def hold() -> None:
        trial = breaker.admit()
        try:
            started.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            trial.abandon()  # as the attempt loop does
            raise

    task = asyncio.create_task(hold())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert current_state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 1
    assert breaker.window_calls == 1


# -- metrics, logs, snapshot ---------------------------------------------------------------


def test_every_series_exists_at_zero_from_construction(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    make_breaker()
    assert (gauge(metrics, "closed"), gauge(metrics, "open"), gauge(metrics, "half_open")) == (
        1,
        0,
        0,
    )
    assert sample(metrics, "sidecar_circuit_breaker_rejected_total") == 0
    for reason in ("consecutive", "failure_rate", "slow_call"):
        assert trips(metrics, reason) == 0
    for result in ("success", "failure"):
        assert sample(metrics, "sidecar_circuit_breaker_probes_total", result=result) == 0
    for from_state, to_state in [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("half_open", "closed"),
    ]:
        assert transitions(metrics, from_state, to_state) == 0
    assert sample(metrics, "sidecar_circuit_breaker_failure_rate") == 0


def test_the_failure_rate_gauge_is_read_at_scrape_time(
    make_breaker: MakeBreaker, metrics: Metrics, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=100)
    for _ in range(3):
        request(breaker, FAIL, OK)
    request(breaker, OK)
    assert sample(metrics, "sidecar_circuit_breaker_failure_rate") == pytest.approx(3 / 7)
    clock.advance(11)
    assert sample(metrics, "sidecar_circuit_breaker_failure_rate") == 0


def test_transitions_and_rejections_are_counted_exactly(
    make_breaker: MakeBreaker, metrics: Metrics, clock: FakeClock
) -> None:
    breaker = make_breaker(failure_threshold=2)
    failed_requests(breaker, 2)
    assert (gauge(metrics, "closed"), gauge(metrics, "open")) == (0, 1)
    for _ in range(3):
        with pytest.raises(CircuitOpen):
            breaker.admit()
    half_open(breaker, clock)
    trial = breaker.admit()
    with pytest.raises(CircuitOpen):
        breaker.admit()  # a half-open refusal counts too
    trial.failure("reset", Outcome.RESET)
    half_open(breaker, clock)
    breaker.admit().success()
    assert (gauge(metrics, "closed"), gauge(metrics, "open"), gauge(metrics, "half_open")) == (
        1,
        0,
        0,
    )
    assert transitions(metrics, "closed", "open") == 1
    assert transitions(metrics, "open", "half_open") == 2
    assert transitions(metrics, "half_open", "open") == 1
    assert transitions(metrics, "half_open", "closed") == 1
    assert sample(metrics, "sidecar_circuit_breaker_rejected_total") == 4
    assert trips(metrics, "consecutive") == 1


def test_transitions_are_logged_on_the_breaker_logger(
    make_breaker: MakeBreaker, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = make_breaker(failure_threshold=1)
    with caplog.at_level(logging.INFO, logger="sidecar.breaker"):
        request(breaker, FAIL)
    [record] = [r for r in caplog.records if r.name == "sidecar.breaker"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "closed -> open" in message
    assert "consecutive" in message
    assert "fail from 127.0.0.1:9" in message


def test_watchers_hear_every_change(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(failure_threshold=1)
    seen: list[BreakerState] = []
    breaker.watch(seen.append)
    request(breaker, FAIL)
    half_open(breaker, clock)
    attempt(breaker, OK)
    assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_close_detaches_the_metrics_listener(make_breaker: MakeBreaker, metrics: Metrics) -> None:
    old = make_breaker(failure_threshold=1)
    old.close()
    replacement = make_breaker()  # the same service, rebuilt on reload
    request(old, FAIL)
    assert old.state is BreakerState.OPEN  # the retired breaker still works on its own...
    assert replacement.state is BreakerState.CLOSED
    assert gauge(metrics, "closed") == 1  # ...but no longer writes the service's series
    assert gauge(metrics, "open") == 0
    assert transitions(metrics, "closed", "open") == 0


def test_snapshot_shape(make_breaker: MakeBreaker, clock: FakeClock) -> None:
    breaker = make_breaker(failure_threshold=1, reset_timeout=5.0)
    snap = breaker.snapshot()
    assert snap == {
        "state": "closed",
        "since": clock.wall(),
        "last_failure": None,
        "last_failure_at": None,
        "trip_reason": None,
        "failure_rate": 0.0,
        "slow_call_rate": 0.0,
        "window_calls": 0,
        "open_until": None,
        "open_period": 5.0,
        "failures": 0,
        "failure_threshold": 1,
        "half_open_successes": 0,
        "trials_in_flight": 0,
        "retry_after": None,
    }
    request(breaker, OK)
    request(breaker, CONNECT)
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["trip_reason"] == "consecutive"
    assert snap["last_failure"] == "connect from 127.0.0.1:9"
    assert snap["last_failure_at"] == clock.wall()
    assert snap["failure_rate"] == 0.5
    assert snap["window_calls"] == 2
    assert snap["open_until"] == clock.wall() + 5.0
    assert snap["retry_after"] == 5.0

    half_open(breaker, clock)
    breaker.admit()
    snap = breaker.snapshot()
    assert snap["state"] == "half_open"
    assert snap["trials_in_flight"] == 1
    assert snap["retry_after"] == 1.0
    assert snap["trip_reason"] == "consecutive"
    assert snap["open_until"] is None


# -- the contract's traffic shapes, simulated on the fake clock ----------------------------


def simulate(
    breaker: ServiceBreaker,
    clock: FakeClock,
    *,
    rate: float,
    seconds: float,
    fail_share: float,
    max_retries: int,
    seed: int,
) -> int:
    """Requests at `rate`/s for `seconds`, each attempt failing with `fail_share`, retried
    up to `max_retries` times. Returns how many requests failed (all attempts failed)."""
    rng = random.Random(seed)
    failed = 0
    for _ in range(int(rate * seconds)):
        clock.advance(1 / rate)
        outcomes = [FAIL if rng.random() < fail_share else OK for _ in range(max_retries + 1)]
        if OK in outcomes:
            outcomes = outcomes[: outcomes.index(OK) + 1]
        else:
            failed += 1
        request(breaker, *outcomes)
    return failed


@pytest.mark.parametrize("seed", range(3))
def test_twenty_percent_random_failures_at_200_per_second_never_open_it(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics, seed: int
) -> None:
    breaker = make_breaker()  # every default
    failed = simulate(
        breaker, clock, rate=200, seconds=60, fail_share=0.2, max_retries=2, seed=seed
    )
    assert failed > 0  # some requests did fail all three attempts ...
    assert current_state(breaker) is BreakerState.CLOSED  # ... but never five in a row
    assert sum(trips(metrics, r) or 0 for r in TripReason) == 0


def test_a_fifth_of_a_percent_failing_at_1000_per_second_never_opens_it(
    make_breaker: MakeBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    breaker = make_breaker()
    simulate(breaker, clock, rate=1000, seconds=60, fail_share=0.002, max_retries=2, seed=7)
    assert current_state(breaker) is BreakerState.CLOSED
    assert sum(trips(metrics, r) or 0 for r in TripReason) == 0


@pytest.mark.parametrize("max_retries", [2, 3])
def test_every_attempt_refused_at_100_per_second_opens_within_a_second(
    make_breaker: MakeBreaker, clock: FakeClock, max_retries: int
) -> None:
    breaker = make_breaker()
    start = clock.now
    for _ in range(100):  # one second of traffic
        clock.advance(0.01)
        request(breaker, *(CONNECT,) * (max_retries + 1))
        if current_state(breaker) is BreakerState.OPEN:
            break
    assert current_state(breaker) is BreakerState.OPEN
    assert clock.now - start == pytest.approx(0.05)  # the fifth request, at 50 ms
    assert breaker.trip_reason is TripReason.CONSECUTIVE
