"""The typed, frozen configuration: what the rest of the sidecar reads.

Nothing here parses YAML or reports errors; `sidecar.config.loader` builds these objects
from a file after validating it. Every duration is a float number of seconds.

This module is the one source of the schema: each dataclass field is the YAML key of the
same name, and its default is the built-in default (the builder only passes the keys a
file wrote). Field metadata marks the exceptions, read by `sidecar.config.schema`:
`NOT_A_KEY` (filled by the builder, never written), `OWN` (a route or service key that
`defaults:` cannot set), `SWITCH` (a block that `true` turns on with its defaults and
`false` or null turns off) and `keys` (the YAML keys that fill a field, when not its name).
docs/configuration.md and config/reference.yaml mirror these defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

from sidecar.config.show import bounded

LoadBalancerKind = Literal["round_robin", "least_request", "random"]
DnsRecord = Literal["A", "AAAA", "SRV"]
Protocol = Literal["http1", "h2c"]
EscapedSlashes = Literal["reject", "keep"]

# Symbolic retry conditions; numeric statuses are kept as ints beside them.
RETRY_CONNECT_FAILURE = "connect-failure"
RETRY_RESET = "reset"
RETRY_PER_TRY_TIMEOUT = "per-try-timeout"
# gRPC status conditions (docs/grpc.md): retried only when listed, never by default.
RETRY_GRPC_CONDITIONS: Mapping[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
RETRY_CONDITIONS = (RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_PER_TRY_TIMEOUT)
GRPC_STATUS_MAX = 16  # gRPC status codes are 0 (OK) .. 16 (UNAUTHENTICATED)

# Field metadata (see the module docstring).
NOT_A_KEY: Mapping[str, object] = MappingProxyType({"keys": ()})
OWN: Mapping[str, object] = MappingProxyType({"own": True})
SWITCH: Mapping[str, object] = MappingProxyType({"switch": True})


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
    # A ceiling; a failure-aware throttle under it caps outages (docs/resilience.md).
    # 0.3, not 0.25: at 20 % random failures max_retries 3 asks for 0.248 retries per
    # request, and at 1,000 req/s a 0.25 ceiling would refuse some of them.
    ratio: float = 0.3
    min_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 2
    per_try_timeout: float | None = None
    # Strings from RETRY_CONDITIONS and ints (HTTP statuses); shorthands are expanded.
    retry_on: frozenset[str | int] = frozenset(
        {RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_PER_TRY_TIMEOUT, 502, 503, 504}
    )
    # gRPC statuses (values of RETRY_GRPC_CONDITIONS) listed in retry_on.
    retry_on_grpc: frozenset[int] = field(default=frozenset(), metadata=NOT_A_KEY)
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
    status: int = 503  # answered to a non-gRPC request
    grpc_status: int = 14  # answered (Trailers-Only) to a gRPC request: UNAVAILABLE


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
    name: str = field(metadata=OWN)  # defaults to the route's index as a string
    match: MatchConfig = field(metadata=OWN)
    service: str = field(metadata=OWN)
    rewrite_prefix: str | None = field(default=None, metadata=OWN)
    timeout: float = 15.0
    retries: RetryConfig = RetryConfig()
    fallback: FallbackConfig | None = None
    fault: FaultConfig | None = None


@dataclass(frozen=True, slots=True)
class StaticDiscovery:
    kind: ClassVar[str] = "static"  # its key under `discovery:`
    endpoints: tuple[Address, ...] = field(metadata=NOT_A_KEY)  # written as the list itself


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    kind: ClassVar[str] = "dns"  # its key under `discovery:`
    name: str
    port: int | None = None  # required for A/AAAA; SRV records carry their own
    record: DnsRecord = "A"
    refresh: float = 10.0
    nameservers: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class FileDiscovery:
    kind: ClassVar[str] = "file"  # its key under `discovery:`
    path: Path  # absolute: resolved against the config file's folder


@dataclass(frozen=True, slots=True)
class EtcdDiscovery:
    kind: ClassVar[str] = "etcd"  # its key under `discovery:`
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
    grpc: bool = False  # h2c services: grpc.health.v1.Health/Check instead of GET path
    grpc_service: str = ""  # the service name asked about; "" is the whole server


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    consecutive_failures: int = 5
    ejection_time: float = 30.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class FailureRateConfig:
    threshold: float = 0.5  # share of failed calls, 0 < x <= 1
    window: float = 10.0  # seconds, sliding in time buckets
    # Below this many calls in the window the rate rules wait. 50, not 20: with 20, a
    # fresh window at 20 % random failures reaches 50 % by chance about once in 300 starts.
    min_calls: int = 50


@dataclass(frozen=True, slots=True)
class SlowCallConfig:
    duration: float = 1.0  # an attempt whose response head takes longer is slow
    rate: float = 0.8  # share of slow calls that trips the breaker, 0 < x <= 1


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    interval: float = 0.5  # recovery probes while open; jitter only shortens it


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    failure_rate: FailureRateConfig | None = field(  # None: the rule is off
        default=FailureRateConfig(), metadata=SWITCH
    )
    slow_call: SlowCallConfig | None = field(default=None, metadata=SWITCH)  # off unless set
    reset_timeout: float = 5.0  # the first open period; failed trials double it
    # Each failed half-open trial doubles the open period up to this; None: the larger of
    # 60 s and reset_timeout (see `open_period_cap`).
    max_reset_timeout: float | None = None
    success_threshold: int = 1
    half_open_max_requests: int = 1
    failure_status: frozenset[int] = frozenset({500, 502, 503, 504})
    failure_grpc_status: frozenset[int] = frozenset({2, 4, 13, 14})
    probe: ProbeConfig | None = field(default=ProbeConfig(), metadata=SWITCH)  # None: no probes

    @property
    def open_period_cap(self) -> float:
        if self.max_reset_timeout is not None:
            return self.max_reset_timeout
        return max(60.0, self.reset_timeout)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str = field(metadata=NOT_A_KEY)  # its key under `services:`
    # `endpoints: [...]` is shorthand for `discovery: {static: [...]}`.
    discovery: DiscoveryConfig = field(
        metadata=MappingProxyType({"keys": ("endpoints", "discovery"), "own": True})
    )
    load_balancer: LoadBalancerKind = "round_robin"
    connect_timeout: float = 1.0
    max_requests: int = 1024
    health_check: HealthCheckConfig | None = None
    # On by default; never ejects a service's last available endpoint.
    outlier_detection: OutlierDetectionConfig | None = field(
        default=OutlierDetectionConfig(), metadata=SWITCH
    )
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    # Pooled connections idle longer are closed; an upstream's Keep-Alive: timeout=N lowers
    # it, retiring a connection at least max(10 %, 250 ms) before N.
    idle_timeout: float = 4.0
    protocol: Protocol = "http1"  # how the sidecar talks to the endpoints


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
class Http2Config:
    """HTTP/2 limits on the app-facing listener (and the h2c upstream pool)."""

    max_concurrent_streams: int = 100  # 1..1000
    max_header_list_size: int = 65536
    stream_window: int = 65535
    connection_window: int = 1048576


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    listen: Address = Address("127.0.0.1", 15001)
    admin: Address = Address("127.0.0.1", 15000)
    drain_timeout: float = 15.0
    listen_path_escaped_slashes: EscapedSlashes = "reject"
    admin_hosts: tuple[str, ...] = ()  # DNS names besides localhost accepted as admin Host
    http2: Http2Config = Http2Config()
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    register: RegisterConfig | None = None
    source: Path | None = field(default=None, metadata=NOT_A_KEY)  # the file, for reloads
    # Effective key path (`routes[0].match.headers.x-token`) -> the text as written, for the
    # string values that came from `${VAR}` substitution: /admin/config shows the reference,
    # never the value. Not part of the settings (equal configs stay equal).
    substituted: Mapping[str, str] = field(
        default_factory=dict, compare=False, repr=False, metadata=NOT_A_KEY
    )


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
        # One line, bounded: values are quoted short where messages are made; this is the
        # backstop for anything else (a YAML parser message, a long path).
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        prefix = "warning: " if self.warning else ""
        key = f"{bounded(self.path)}: " if self.path else ""
        return f"{prefix}{bounded(where)}{key}{bounded(self.message)}"


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds every error found (warnings too)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems if not p.warning))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]
