"""Fault injection: percentages, including the 0 and 100 edges, with seeded randomness."""

from __future__ import annotations

import random

from sidecar.config.model import FaultAbort, FaultConfig, FaultDelay
from sidecar.resilience.fault import FaultInjector


def never_called() -> float:
    raise AssertionError("0% and 100% must not draw a random number")


def test_no_faults_configured() -> None:
    injector = FaultInjector(FaultConfig(), rand=never_called)
    assert injector.delay() is None
    assert injector.abort() is None


def test_hundred_percent_always_fires() -> None:
    config = FaultConfig(delay=FaultDelay(100, 0.2), abort=FaultAbort(100, 503))
    injector = FaultInjector(config, rand=never_called)
    for _ in range(100):
        assert injector.delay() == 0.2
        assert injector.abort() == 503


def test_zero_percent_never_fires() -> None:
    config = FaultConfig(delay=FaultDelay(0, 0.2), abort=FaultAbort(0.0, 503))
    injector = FaultInjector(config, rand=never_called)
    for _ in range(100):
        assert injector.delay() is None
        assert injector.abort() is None


def test_seeded_percentages_fire_about_that_often() -> None:
    config = FaultConfig(delay=FaultDelay(10, 0.05), abort=FaultAbort(2.5, 429))
    injector = FaultInjector(config, rand=random.Random(42).random)
    n = 20_000
    delays = sum(injector.delay() is not None for _ in range(n))
    aborts = sum(injector.abort() is not None for _ in range(n))
    assert 0.09 * n < delays < 0.11 * n
    assert 0.02 * n < aborts < 0.03 * n


def test_the_same_seed_gives_the_same_faults() -> None:
    config = FaultConfig(delay=FaultDelay(30, 0.1), abort=FaultAbort(30, 503))

    def run(seed: int) -> list[tuple[float | None, int | None]]:
        injector = FaultInjector(config, rand=random.Random(seed).random)
        return [(injector.delay(), injector.abort()) for _ in range(200)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_percent_is_compared_against_the_draw() -> None:
    config = FaultConfig(abort=FaultAbort(50, 503))
    assert FaultInjector(config, rand=lambda: 0.499).abort() == 503
    assert FaultInjector(config, rand=lambda: 0.5).abort() is None
