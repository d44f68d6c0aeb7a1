"""The typed, frozen configuration: what the rest of the sidecar reads.

Nothing here parses YAML or reports errors; `sidecar.config.loader` builds these objects
from a file after validating it. Every duration is a float number of seconds. Defaults
live here, once, and the README's config reference mirrors them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

LoadBalancerKind = Literal["round_robin", "least_request", "random"]
DnsRecord = Literal["A", "AAAA", "SRV"]

# Symbolic retry conditions; numeric statuses are kept as ints beside them.
RETRY_CONNECT_FAILURE = "connect-failure"
RETRY_RESET = "reset"
RETRY_PER_TRY_TIMEOUT = "per-try-timeout"
RETRY_CONDITIONS = (RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_PER_TRY_TIMEOUT)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6 literal
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    ratio: float = 0.2
    min_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 2
    per_try_timeout: float | None = None
    # Strings from RETRY_CONDITIONS and ints (HTTP statuses); shorthands are expanded.
    retry_on: frozenset[str | int] = frozenset(
        {RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_PER_TRY_TIMEOUT, 502, 503, 504}
    )
    backoff: BackoffConfig = BackoffConfig()
    budget: BudgetConfig = BudgetConfig()
    non_idempotent: bool = False
    max_body_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class FaultDelay:
    percent: float
    duration: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    percent: float
    status: int


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class MatchConfig:
    prefix: str | None = None  # exactly one of prefix / path is set
    path: str | None = None
    methods: frozenset[str] | None = None  # upper-case
    headers: tuple[tuple[str, str], ...] = ()  # names lower-case, values exact
    host: str | None = None  # lower-case, without port


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str  # defaults to the route's index as a string
    match: MatchConfig
    service: str
    rewrite_prefix: str | None = None
    timeout: float = 15.0
    retries: RetryConfig = RetryConfig()
    fallback: FallbackConfig | None = None
    fault: FaultConfig | None = None


@dataclass(frozen=True, slots=True)
class StaticDiscovery:
    endpoints: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    name: str
    port: int | None = None  # required for A/AAAA; SRV records carry their own
    record: DnsRecord = "A"
    refresh: float = 10.0
    nameservers: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class FileDiscovery:
    path: Path  # absolute: resolved against the config file's folder


@dataclass(frozen=True, slots=True)
class EtcdDiscovery:
    endpoints: tuple[str, ...]  # base URLs such as http://127.0.0.1:2379
    prefix: str


DiscoveryConfig = StaticDiscovery | DnsDiscovery | FileDiscovery | EtcdDiscovery


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str = "/healthz"
    interval: float = 10.0
    timeout: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    consecutive_failures: int = 5
    ejection_time: float = 30.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    reset_timeout: float = 30.0
    success_threshold: int = 1
    half_open_max_requests: int = 1
    failure_status: frozenset[int] = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    discovery: DiscoveryConfig
    load_balancer: LoadBalancerKind = "round_robin"
    connect_timeout: float = 1.0
    max_requests: int = 1024
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


@dataclass(frozen=True, slots=True)
class RegisterHealthCheck:
    path: str = "/healthz"
    interval: float = 5.0


@dataclass(frozen=True, slots=True)
class RegisterConfig:
    etcd: EtcdDiscovery
    service: str
    address: Address
    ttl: float = 10.0
    health_check: RegisterHealthCheck | None = None


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    listen: Address = Address("127.0.0.1", 15001)
    admin: Address = Address("127.0.0.1", 15000)
    drain_timeout: float = 15.0
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    register: RegisterConfig | None = None
    source: Path | None = None  # the file this was loaded from, for reloads


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation finding, printed as `file:line:col: key.path: message`."""

    message: str
    path: str = ""  # dotted key path, e.g. routes[2].retries.max_retries
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    warning: bool = False

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        prefix = "warning: " if self.warning else ""
        key = f"{self.path}: " if self.path else ""
        return f"{prefix}{where}{key}{self.message}"


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds every error found (warnings too)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems if not p.warning))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]
