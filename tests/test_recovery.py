"""The breaker's recovery task: which probe the evidence calls for, and the period's end.

A real breaker and a real task on the event loop with short durations; the probes are
fakes behind the `Probe` seam that count their calls (the real probes are tested against
real sockets in test_probes.py, and everything together in test_resilience_e2e.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from support import addresses, eventually

from sidecar.cluster.recovery import Probe, Recovery
from sidecar.config.model import (
    Address,
    CircuitBreakerConfig,
    HealthCheckConfig,
    ProbeConfig,
    ServiceConfig,
    StaticDiscovery,
)
from sidecar.endpoint import Endpoint
from sidecar.metrics import Metrics
from sidecar.resilience.breaker import ServiceBreaker
from sidecar.vocab import BreakerState, Outcome

TWO = [Endpoint(a) for a in addresses("127.0.0.1:9001", "127.0.0.1:9002")]


@dataclass
class FakeProbe:
    """Answers `passing` (flip it from the test); counts calls per address."""

    passing: bool = False
    delay: float = 0.0
    calls: list[Address] = field(default_factory=list)

    async def __call__(self, address: Address) -> bool:
        self.calls.append(address)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.passing


def probes(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "sidecar_circuit_breaker_probes_total", {"service": "orders", "result": result}
    )
    return value or 0.0


def trip(breaker: ServiceBreaker, kind: Outcome) -> None:
    for _ in range(breaker.config.failure_threshold):
        trial = breaker.admit()
        trial.failure(f"{kind}", kind)
        trial.request_done()
    assert breaker.state is BreakerState.OPEN


@asynccontextmanager
async def running(
    *,
    reset: float = 30.0,
    interval: float | None = 0.05,
    health: Probe | None = None,
    tcp: Probe | None = None,
    endpoints: Callable[[], list[Endpoint]] = lambda: TWO,
) -> AsyncIterator[tuple[ServiceBreaker, Recovery, Metrics]]:
    metrics = Metrics()
    config = CircuitBreakerConfig(failure_threshold=1, reset_timeout=reset)
    breaker = ServiceBreaker("orders", config, metrics)
    recovery = Recovery(
        breaker,
        endpoints,
        metrics,
        interval=interval,
        health_probe=health,
        tcp_probe=tcp,
        rng=lambda: 0.5,
    )
    recovery.start()
    try:
        yield breaker, recovery, metrics
    finally:
        await recovery.close()
        breaker.close()


async def test_connect_failures_are_probed_by_tcp_until_one_passes() -> None:
    tcp = FakeProbe(passing=False)
    async with running(tcp=tcp) as (breaker, _, metrics):
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: len(tcp.calls) >= 6)  # three rounds over both endpoints
        assert breaker.state is BreakerState.OPEN  # failed probes change nothing
        assert set(tcp.calls) == {e.address for e in TWO}
        assert probes(metrics, "failure") >= 6
        assert breaker.open_period == 30.0  # ... and never double the period
        tcp.passing = True
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert probes(metrics, "success") >= 1
        calls = len(tcp.calls)
        await asyncio.sleep(0.2)  # half-open: no more probing
        assert len(tcp.calls) == calls


async def test_resets_count_as_transport_evidence_too() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp) as (breaker, _, _):
        trip(breaker, Outcome.RESET)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert tcp.calls


async def test_5xx_alone_without_a_health_check_is_not_probed() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp, reset=0.4) as (breaker, _, metrics):
        trip(breaker, Outcome.RESPONSE)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)  # the period ended
        assert tcp.calls == []
        assert probes(metrics, "success") == probes(metrics, "failure") == 0


async def test_timeouts_alone_are_not_probed() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp, reset=0.3) as (breaker, _, _):
        trip(breaker, Outcome.TIMEOUT)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert tcp.calls == []


async def test_a_health_check_is_the_probe_whatever_the_evidence() -> None:
    health = FakeProbe(passing=False)
    tcp = FakeProbe(passing=True)
    async with running(health=health, tcp=tcp) as (breaker, _, metrics):
        trip(breaker, Outcome.RESPONSE)
        await eventually(lambda: len(health.calls) >= 4)
        assert breaker.state is BreakerState.OPEN
        assert tcp.calls == []
        health.passing = True
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert probes(metrics, "success") >= 1


async def test_without_probes_only_the_end_of_the_period_half_opens() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp, interval=None, reset=0.3) as (breaker, _, _):
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert tcp.calls == []


async def test_the_period_ends_on_time_even_during_a_slow_probe() -> None:
    tcp = FakeProbe(passing=True, delay=30.0)
    async with running(tcp=tcp, reset=0.3) as (breaker, _, metrics):
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert tcp.calls  # a probe was under way ...
        assert probes(metrics, "success") == 0  # ... and was cut short, uncounted


async def test_a_service_without_endpoints_just_waits_for_the_period() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp, reset=0.3, endpoints=list) as (breaker, _, _):
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        assert tcp.calls == []


async def test_every_open_period_is_watched_again() -> None:
    tcp = FakeProbe(passing=True)
    async with running(tcp=tcp) as (breaker, _, _):
        for _ in range(3):
            trip(breaker, Outcome.CONNECT_ERROR)
            await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
            trial = breaker.admit()
            trial.success()
            assert breaker.state is BreakerState.CLOSED
        # And a failed trial's re-open is a new period of its own.
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)
        breaker.admit().failure("reset", Outcome.RESET)
        assert breaker.state is BreakerState.OPEN
        await eventually(lambda: breaker.state is BreakerState.HALF_OPEN)


async def test_close_stops_the_task() -> None:
    tcp = FakeProbe(passing=False)
    async with running(tcp=tcp) as (breaker, recovery, _):
        trip(breaker, Outcome.CONNECT_ERROR)
        await eventually(lambda: len(tcp.calls) >= 2)
    calls = len(tcp.calls)
    await asyncio.sleep(0.2)
    assert len(tcp.calls) == calls
    assert recovery.tasks == 0


def test_for_service_picks_the_probes_the_config_asks_for() -> None:
    metrics = Metrics()
    static = StaticDiscovery(addresses("127.0.0.1:9001"))

    def build(**settings: Any) -> Recovery:
        config = ServiceConfig(name="orders", discovery=static, **settings)
        breaker = ServiceBreaker("orders", config.circuit_breaker, metrics)
        return Recovery.for_service(config, breaker, list, metrics)

    plain = build()
    assert plain.interval == 0.5
    assert plain.probe_for_evidence() is None  # nothing to probe for until it trips
    checked = build(health_check=HealthCheckConfig(path="/ready"))
    assert checked.probe_for_evidence() is not None  # the health check, even before a trip
    grpc = build(health_check=HealthCheckConfig(grpc=True))
    assert grpc.probe_for_evidence() is not None  # gRPC's Health/Check, over h2c
    off = build(circuit_breaker=CircuitBreakerConfig(probe=None))
    assert off.interval is None and off.probe_for_evidence() is None
    fast = build(circuit_breaker=CircuitBreakerConfig(probe=ProbeConfig(interval=0.1)))
    assert fast.interval == 0.1
