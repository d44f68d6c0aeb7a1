"""Every Prometheus metric the sidecar exports (docs/contract.md#metrics), declared once.

Metrics are built against an injected `CollectorRegistry` so tests can read exact values
with `registry.get_sample_value(...)`. Label values come from config (route, service,
endpoint addresses), never from raw request data, so cardinality stays bounded.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from sidecar.vocab import BreakerState, ProbeResult, TripReason

# `_created` series double the exposition size and no dashboard or alert of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream; takes no args

BREAKER_STATES = tuple(BreakerState)
ENDPOINT_STATES = ("healthy", "unhealthy", "ejected")
# The only transitions a breaker can make; their counters exist from start-up at 0 so that
# `rate()` and `increase()` work from the first change on.
BREAKER_TRANSITIONS = (
    (BreakerState.CLOSED, BreakerState.OPEN),
    (BreakerState.OPEN, BreakerState.HALF_OPEN),
    (BreakerState.HALF_OPEN, BreakerState.OPEN),
    (BreakerState.HALF_OPEN, BreakerState.CLOSED),
)

# Buckets from 1 ms to 30 s: a sidecar's requests span in-memory fail-fast to slow upstreams.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests_total",
            "Requests answered to the app.",
            ["route", "service", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request to response head, and body.",
            ["route", "service"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "sidecar_upstream_attempts_total",
            "Attempts sent to an upstream endpoint.",
            ["service", "endpoint", "result"],
            registry=r,
        )
        self.grpc_responses = Counter(
            "sidecar_grpc_responses_total",
            "gRPC calls answered to the app, by final gRPC status.",
            ["route", "service", "grpc_code"],
            registry=r,
        )
        self.retries = Counter(
            "sidecar_retries_total",
            "Retries made after a first attempt.",
            ["route", "service"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "sidecar_retry_budget_exhausted_total",
            "Retries not made because the budget was spent.",
            ["route", "service"],
            registry=r,
        )
        self.timeouts = Counter(
            "sidecar_timeouts_total",
            "Timeouts hit, per-try or for the whole route.",
            ["route", "service", "kind"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sidecar_circuit_breaker_state",
            "1 for the breaker's current state, 0 for the others.",
            ["service", "state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sidecar_circuit_breaker_transitions_total",
            "Breaker state changes.",
            ["service", "from_state", "to_state"],
            registry=r,
        )
        self.breaker_rejected = Counter(
            "sidecar_circuit_breaker_rejected_total",
            "Requests refused by an open breaker.",
            ["service"],
            registry=r,
        )
        self.breaker_trips = Counter(
            "sidecar_circuit_breaker_trips_total",
            "Breaker trips (closed -> open), by the rule that fired first.",
            ["service", "reason"],
            registry=r,
        )
        self.breaker_failure_rate = Gauge(
            "sidecar_circuit_breaker_failure_rate",
            "Share of failed attempts over the breaker's window (0..1, 0 when empty).",
            ["service"],
            registry=r,
        )
        self.breaker_probes = Counter(
            "sidecar_circuit_breaker_probes_total",
            "Recovery probes made while a breaker was open, by result.",
            ["service", "result"],
            registry=r,
        )
        self.overloaded = Counter(
            "sidecar_overloaded_total",
            "Requests refused because max_requests were in flight.",
            ["service"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_requests_in_flight",
            "Requests in flight to a service.",
            ["service"],
            registry=r,
        )
        self.endpoints = Gauge(
            "sidecar_endpoints",
            "Endpoints of a service by state.",
            ["service", "state"],
            registry=r,
        )
        self.discovery_updates = Counter(
            "sidecar_discovery_updates_total",
            "Discovery refreshes, by result.",
            ["service", "result"],
            registry=r,
        )
        self.config_reloads = Counter(
            "sidecar_config_reloads_total",
            "Config reloads, by result.",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def set_breaker_state(self, service: str, state: str) -> None:
        for s in BREAKER_STATES:
            self.breaker_state.labels(service, s).set(1 if s == state else 0)

    def init_breaker_series(self, service: str) -> None:
        """Create every breaker series of `service` at 0 (closed), before any traffic."""
        self.set_breaker_state(service, BreakerState.CLOSED)
        self.breaker_rejected.labels(service)
        for from_state, to_state in BREAKER_TRANSITIONS:
            self.breaker_transitions.labels(service, from_state, to_state)
        for reason in TripReason:
            self.breaker_trips.labels(service, reason)
        for result in ProbeResult:
            self.breaker_probes.labels(service, result)
        self.breaker_failure_rate.labels(service).set(0)

    def set_endpoint_counts(self, service: str, counts: dict[str, int]) -> None:
        for e in ENDPOINT_STATES:
            self.endpoints.labels(service, e).set(counts.get(e, 0))

    def forget_service(self, service: str) -> None:
        """Drop a removed service's per-service gauges so stale series do not linger."""
        for s in BREAKER_STATES:
            _remove(self.breaker_state, service, s)
        for e in ENDPOINT_STATES:
            _remove(self.endpoints, service, e)
        _remove(self.in_flight, service)
        _remove(self.breaker_failure_rate, service)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
