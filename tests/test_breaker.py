"""The circuit breaker adapter over pybreaker: real pybreaker, real clock, real tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config.model import CircuitBreakerConfig
from sidecar.metrics import Metrics
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker, Trial

SERVICE = "orders"
RESET = 0.2  # seconds; tests wait RESET_WAIT for the open -> half_open timer
RESET_WAIT = 0.3


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


MakeBreaker = Callable[..., ServiceBreaker]


@pytest.fixture
def make_breaker(metrics: Metrics) -> Iterator[MakeBreaker]:
    made: list[ServiceBreaker] = []

    def make(**overrides: Any) -> ServiceBreaker:
        settings: dict[str, Any] = {"failure_threshold": 3, "reset_timeout": RESET, **overrides}
        breaker = ServiceBreaker(SERVICE, CircuitBreakerConfig(**settings), metrics)
        made.append(breaker)
        return breaker

    yield make
    for breaker in made:
        breaker.close()


def fail(breaker: ServiceBreaker, times: int, reason: str = "HTTP 503") -> None:
    for _ in range(times):
        breaker.admit().failure(reason)


def gauge(metrics: Metrics, state: str) -> float | None:
    return metrics.registry.get_sample_value(
        "sidecar_circuit_breaker_state", {"service": SERVICE, "state": state}
    )


def transitions(metrics: Metrics, from_state: str, to_state: str) -> float | None:
    return metrics.registry.get_sample_value(
        "sidecar_circuit_breaker_transitions_total",
        {"service": SERVICE, "from_state": from_state, "to_state": to_state},
    )


def rejected(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "sidecar_circuit_breaker_rejected_total", {"service": SERVICE}
    )


async def open_then_wait(breaker: ServiceBreaker) -> None:
    """Trip the breaker and wait until its next admit would be a half-open trial."""
    fail(breaker, breaker.config.failure_threshold)
    assert breaker.state == "open"
    await asyncio.sleep(RESET_WAIT)


# -- closed -> open ---------------------------------------------------------------------------


def test_opens_after_exactly_failure_threshold_consecutive_failures(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures"] == 2
    fail(breaker, 1)
    assert breaker.state == "open"


def test_a_success_resets_the_consecutive_count(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=3)
    fail(breaker, 2)
    breaker.admit().success()
    assert breaker.snapshot()["failures"] == 0
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open"


def test_the_tripping_attempt_resolves_normally_and_later_ones_are_refused(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=1)
    trial = breaker.admit()
    trial.failure("connect_error")  # no exception: the caller still returns this attempt's result
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.admit()


def test_circuit_open_while_open_gives_remaining_reset_time(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(reset_timeout=5.0)
    fail(breaker, 3)
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert 0 < info.value.retry_after <= 5.0
    assert info.value.state == "open"
    assert info.value.service == SERVICE
    assert breaker.retry_after() is not None
    assert breaker.state == "open"  # a refused call does not start a trial


def test_statuses_that_count_as_failures(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_status=frozenset({500, 503}))
    assert breaker.is_failure_status(503)
    assert breaker.is_failure_status(500)
    assert not breaker.is_failure_status(502)
    assert not breaker.is_failure_status(200)
    assert not breaker.is_failure_status(404)


# -- open -> half_open -> closed / open -----------------------------------------------------


async def test_after_reset_timeout_the_next_admit_is_a_half_open_trial(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker()
    await open_then_wait(breaker)
    assert breaker.state == "open"  # the timer alone changes nothing (CONTRACT §4)
    assert breaker.retry_after() is None  # ... but a call now would be admitted
    trial = breaker.admit()
    assert trial.half_open
    assert breaker.state == "half_open"
    trial.success()
    assert breaker.state == "closed"


async def test_half_open_admits_only_max_requests_concurrent_trials(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(half_open_max_requests=2, success_threshold=2)
    await open_then_wait(breaker)
    release = asyncio.Event()

    async def attempt() -> str:
        try:
            trial = breaker.admit()
        except CircuitOpen as exc:
            assert exc.state == "half_open"
            assert 0 < exc.retry_after <= RESET
            return "rejected"
        with trial:
            await release.wait()
            trial.success()
        return "admitted"

    tasks = [asyncio.create_task(attempt()) for _ in range(10)]
    await asyncio.sleep(0)  # every task runs up to its admit()
    assert breaker.snapshot()["trials_in_flight"] == 2
    release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("admitted") == 2
    assert results.count("rejected") == 8
    assert breaker.state == "closed"


async def test_success_threshold_needs_that_many_successful_trials(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(success_threshold=2, half_open_max_requests=1)
    await open_then_wait(breaker)
    first = breaker.admit()
    with pytest.raises(CircuitOpen):
        breaker.admit()  # the one slot is taken
    first.success()
    assert breaker.state == "half_open"
    assert breaker.snapshot()["half_open_successes"] == 1
    second = breaker.admit()  # the slot is free again
    second.success()
    assert breaker.state == "closed"


async def test_a_failed_trial_reopens_and_updates_since(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker()
    await open_then_wait(breaker)
    trial = breaker.admit()
    half_open_since = breaker.since
    await asyncio.sleep(0.01)
    trial.failure("timeout")
    assert breaker.state == "open"
    assert breaker.since > half_open_since
    assert breaker.last_failure == "timeout"
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert 0 < info.value.retry_after <= RESET  # a fresh reset_timeout started


async def test_an_abandoned_trial_reopens_and_frees_its_slot(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(half_open_max_requests=1)
    await open_then_wait(breaker)
    failures_before = breaker.snapshot()["failures"]
    breaker.admit().abandon()
    assert breaker.state == "open"
    assert breaker.snapshot()["failures"] == failures_before  # re-opened, not a counted failure
    with pytest.raises(CircuitOpen):
        breaker.admit()
    await asyncio.sleep(RESET_WAIT)
    trial = breaker.admit()  # the slot is free for the next half-open period
    assert trial.half_open
    trial.success()
    assert breaker.state == "closed"


def test_an_abandoned_attempt_in_closed_state_changes_nothing(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=3)
    fail(breaker, 2)
    since = breaker.since
    breaker.admit().abandon()
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures"] == 2  # not a success: the count was not reset
    assert breaker.since == since
    fail(breaker, 1)  # not a failure either: the third failure is what trips it
    assert breaker.state == "open"


async def test_a_cancelled_task_holding_a_trial_abandons_it_and_cancellation_propagates(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(half_open_max_requests=1)
    await open_then_wait(breaker)
    started = asyncio.Event()

    async def attempt() -> None:
        trial = breaker.admit()
        try:
            started.set()
            await asyncio.sleep(60)
            trial.success()
        except asyncio.CancelledError:
            trial.abandon()
            raise

    task = asyncio.create_task(attempt())
    await started.wait()
    assert breaker.state == "half_open"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert breaker.state == "open"


async def test_a_cancelled_attempt_in_closed_state_leaves_the_count_alone(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=2)
    fail(breaker, 1)
    started = asyncio.Event()

    async def attempt() -> None:
        with breaker.admit():  # the context manager abandons on CancelledError
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(attempt())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures"] == 1


async def test_a_timeout_leaving_the_trial_block_counts_as_a_timeout_failure(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=1)
    with pytest.raises(TimeoutError), breaker.admit():
        async with asyncio.timeout(0.01):
            await asyncio.sleep(60)
    assert breaker.state == "open"
    assert breaker.last_failure == "timeout"


def test_a_trial_resolves_once_and_later_calls_are_ignored(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1)
    trial = breaker.admit()
    trial.success()
    trial.failure("HTTP 503")
    trial.abandon()
    assert trial.resolved
    assert breaker.state == "closed"
    assert breaker.last_failure is None


async def test_outcomes_of_attempts_admitted_before_a_state_change_do_not_count(
    make_breaker: MakeBreaker,
) -> None:
    breaker = make_breaker(failure_threshold=1)
    slow: Trial = breaker.admit()  # admitted while closed
    breaker.admit().failure("HTTP 503")  # trips the breaker
    await asyncio.sleep(RESET_WAIT)
    trial = breaker.admit()
    assert breaker.state == "half_open"
    slow.success()  # a closed-era success must not decide the half-open trial
    assert breaker.state == "half_open"
    trial.failure("HTTP 502")
    assert breaker.state == "open"
    assert breaker.last_failure == "HTTP 502"


# -- metrics, logs, snapshot ---------------------------------------------------------------


def test_state_gauge_is_one_hot_from_construction(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    make_breaker()
    assert gauge(metrics, "closed") == 1
    assert gauge(metrics, "open") == 0
    assert gauge(metrics, "half_open") == 0
    assert rejected(metrics) == 0
    assert transitions(metrics, "closed", "open") == 0


async def test_transitions_and_rejections_are_counted_exactly(
    make_breaker: MakeBreaker, metrics: Metrics
) -> None:
    breaker = make_breaker(failure_threshold=2)
    fail(breaker, 2)
    assert (gauge(metrics, "closed"), gauge(metrics, "open")) == (0, 1)
    for _ in range(3):
        with pytest.raises(CircuitOpen):
            breaker.admit()
    assert rejected(metrics) == 3

    await asyncio.sleep(RESET_WAIT)
    trial = breaker.admit()
    assert (gauge(metrics, "open"), gauge(metrics, "half_open")) == (0, 1)
    with pytest.raises(CircuitOpen):
        breaker.admit()  # a half-open refusal counts too
    assert rejected(metrics) == 4
    trial.failure("reset")

    await asyncio.sleep(RESET_WAIT)
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
    assert rejected(metrics) == 4


def test_transitions_are_logged_on_the_breaker_logger(
    make_breaker: MakeBreaker, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = make_breaker(failure_threshold=1)
    with caplog.at_level(logging.INFO, logger="sidecar.breaker"):
        breaker.admit().failure("HTTP 503")
    [record] = [r for r in caplog.records if r.name == "sidecar.breaker"]
    assert record.levelno == logging.WARNING
    assert "closed -> open" in record.getMessage()
    assert "HTTP 503" in record.getMessage()


def test_close_detaches_the_metrics_listener(make_breaker: MakeBreaker, metrics: Metrics) -> None:
    old = make_breaker(failure_threshold=1)
    old.close()
    replacement = make_breaker()  # the same service, rebuilt on reload
    old.admit().failure("HTTP 503")
    assert old.state == "open"  # the retired breaker still works on its own...
    assert replacement.state == "closed"
    assert gauge(metrics, "closed") == 1  # ...but no longer writes the service's series
    assert gauge(metrics, "open") == 0
    assert transitions(metrics, "closed", "open") == 0


async def test_snapshot_shape(make_breaker: MakeBreaker) -> None:
    breaker = make_breaker(failure_threshold=1)
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert isinstance(snap["since"], float)
    assert snap["last_failure"] is None
    assert snap["failures"] == 0
    assert snap["retry_after"] is None

    breaker.admit().failure("connect_error")
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["last_failure"] == "connect_error"
    assert isinstance(snap["last_failure_at"], float)
    assert 0 < snap["retry_after"] <= RESET

    await asyncio.sleep(RESET_WAIT)
    breaker.admit()
    snap = breaker.snapshot()
    assert snap["state"] == "half_open"
    assert snap["trials_in_flight"] == 1
    assert snap["retry_after"] is not None  # the single slot is taken
