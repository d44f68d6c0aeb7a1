"""Building `services.NAME` (and the service keys of `defaults:`): discovery, load
balancing, limits, health checks, outlier detection and the circuit breaker.

Every block goes through `Reader.block`, so the keys are the model's fields and whatever a
file leaves out takes the model's default, the same whether a block is absent, empty or
partly written. The checks that need two keys at once (a gRPC health check needs
`protocol: h2c`; `max_reset_timeout` must not be below `reset_timeout`) run here, on the
block merged with `defaults:`, and point at the key that was written.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.config.discovery import discovery, static
from sidecar.config.durations import format_duration
from sidecar.config.model import (
    CircuitBreakerConfig,
    DiscoveryConfig,
    FailureRateConfig,
    HealthCheckConfig,
    LoadBalancerKind,
    OutlierDetectionConfig,
    ProbeConfig,
    Protocol,
    ServiceConfig,
    SlowCallConfig,
)
from sidecar.config.reader import Read, Reader
from sidecar.config.schema import choices, keys, own, switches
from sidecar.config.show import quote
from sidecar.config.yamlsafe import YMap, YNode

LOAD_BALANCERS = choices(LoadBalancerKind)
PROTOCOLS = choices(Protocol)


def settings_readers(r: Reader, eff: str) -> dict[str, Read]:
    """The readers of the service keys that `defaults:` may set too."""

    def at_least_one(n: YNode) -> int | None:
        return r.integer(n, lo=1)

    return {
        "load_balancer": lambda n: r.choice(n, LOAD_BALANCERS),
        "connect_timeout": r.duration,
        "max_requests": at_least_one,
        "health_check": lambda n: health_check(r, n, f"{eff}.health_check"),
        "outlier_detection": lambda n: r.switch(
            n, OutlierDetectionConfig, lambda x: outlier(r, x, f"{eff}.outlier_detection")
        ),
        "circuit_breaker": lambda n: breaker(r, n, f"{eff}.circuit_breaker"),
        "idle_timeout": r.duration,
        "protocol": lambda n: r.choice(n, PROTOCOLS),
    }


def check_defaults(r: Reader, m: YMap) -> None:
    """The service keys of `defaults:`, read on their own so a mistake shows even when no
    service inherits it."""
    r.block(
        m, "defaults", ServiceConfig, settings_readers(r, "defaults"), handled=own(ServiceConfig)
    )


def service(r: Reader, name: str, m: YMap, eff: str, base_dir: Path) -> ServiceConfig | None:
    endpoints = r.child(m, "endpoints", eff)
    discovery_node = r.child(m, "discovery", eff)
    source: DiscoveryConfig | None = None
    if endpoints is not None and discovery_node is not None:
        entry = m.entries["discovery"]
        r.report(
            entry.key_pos,
            entry.owner,
            "give either 'endpoints' or 'discovery', not both "
            "('endpoints' is shorthand for discovery: {static: [...]})",
        )
    elif endpoints is not None:
        source = static(r, endpoints)
    elif discovery_node is not None:
        source = discovery(r, discovery_node, f"{eff}.discovery", base_dir)
    else:
        r.error(m, "missing 'endpoints' or 'discovery' (where to find this service)")
    settings = r.block(
        m,
        eff,
        ServiceConfig,
        settings_readers(r, eff),
        handled=own(ServiceConfig),
        switches=switches(ServiceConfig),
    )
    if source is None:
        return None
    config = ServiceConfig(name=name, discovery=source, **settings)
    hc = config.health_check
    if hc is not None and hc.grpc and config.protocol != "h2c":
        r.error(
            r.spot(f"{eff}.health_check.grpc"),
            f"grpc: true needs protocol: h2c (service {quote(name)} uses {config.protocol}, "
            "which cannot carry gRPC)",
        )
        return None
    return config


def health_check(r: Reader, node: YNode, eff: str) -> HealthCheckConfig | None:
    m = r.mapping(node, keys(HealthCheckConfig))
    if m is None:
        return None

    def at_least_one(n: YNode) -> int | None:
        return r.integer(n, lo=1)

    settings = r.block(
        m,
        eff,
        HealthCheckConfig,
        {
            "path": r.http_path,
            "interval": r.duration,
            "timeout": r.duration,
            "unhealthy_threshold": at_least_one,
            "healthy_threshold": at_least_one,
            "grpc": r.boolean,
            "grpc_service": lambda n: r.string(n, lenient=True),
        },
    )
    return HealthCheckConfig(**settings)


def outlier(r: Reader, node: YNode, eff: str) -> OutlierDetectionConfig | None:
    m = r.mapping(node, keys(OutlierDetectionConfig))
    if m is None:
        return None
    settings = r.block(
        m,
        eff,
        OutlierDetectionConfig,
        {
            "consecutive_failures": lambda n: r.integer(n, lo=1),
            "ejection_time": r.duration,
            "max_ejection_percent": lambda n: r.number(n, lo=0, hi=100),
        },
    )
    return OutlierDetectionConfig(**settings)


def breaker(r: Reader, node: YNode, eff: str) -> CircuitBreakerConfig | None:
    m = r.mapping(node, keys(CircuitBreakerConfig))
    if m is None:
        return None

    def at_least_one(n: YNode) -> int | None:
        return r.integer(n, lo=1)

    def statuses(n: YNode) -> frozenset[int] | None:
        values = r.items(n, r.status)
        return None if values is None else frozenset(values)

    def grpc_statuses(n: YNode) -> frozenset[int] | None:
        values = r.items(n, r.grpc_status)
        return None if values is None else frozenset(values)

    settings = r.block(
        m,
        eff,
        CircuitBreakerConfig,
        {
            "failure_threshold": at_least_one,
            "failure_rate": lambda n: r.switch(
                n, FailureRateConfig, lambda x: failure_rate(r, x, f"{eff}.failure_rate")
            ),
            "slow_call": lambda n: r.switch(
                n, SlowCallConfig, lambda x: slow_call(r, x, f"{eff}.slow_call")
            ),
            "reset_timeout": r.duration,
            "max_reset_timeout": r.duration,
            "success_threshold": at_least_one,
            "half_open_max_requests": at_least_one,
            "failure_status": statuses,
            "failure_grpc_status": grpc_statuses,
            "probe": lambda n: r.switch(n, ProbeConfig, lambda x: probe(r, x, f"{eff}.probe")),
        },
        switches=switches(CircuitBreakerConfig),
    )
    config = CircuitBreakerConfig(**settings)
    cap = config.max_reset_timeout
    if cap is not None and cap < config.reset_timeout:
        r.error(
            r.spot(f"{eff}.max_reset_timeout"),
            f"max_reset_timeout ({format_duration(cap)}) must not be shorter than "
            f"reset_timeout ({format_duration(config.reset_timeout)})",
        )
        return None
    return config


def failure_rate(r: Reader, node: YNode, eff: str) -> FailureRateConfig | None:
    m = r.mapping(node, keys(FailureRateConfig))
    if m is None:
        return None
    settings = r.block(
        m,
        eff,
        FailureRateConfig,
        {"threshold": r.share, "window": r.duration, "min_calls": lambda n: r.integer(n, lo=1)},
    )
    return FailureRateConfig(**settings)


def slow_call(r: Reader, node: YNode, eff: str) -> SlowCallConfig | None:
    m = r.mapping(node, keys(SlowCallConfig))
    if m is None:
        return None
    settings = r.block(m, eff, SlowCallConfig, {"duration": r.duration, "rate": r.share})
    return SlowCallConfig(**settings)


def probe(r: Reader, node: YNode, eff: str) -> ProbeConfig | None:
    m = r.mapping(node, keys(ProbeConfig))
    if m is None:
        return None
    return ProbeConfig(**r.block(m, eff, ProbeConfig, {"interval": r.duration}))
