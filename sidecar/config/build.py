"""The schema: which keys exist where, their defaults, and how they become model objects.

`build` walks the positioned tree once, merges `defaults:` under every route and service,
and returns a `SidecarConfig` (plus, for the checks, which list index each built route came
from). Each key is read through `Reader`, so every mistake is reported and reading goes on;
the caller discards the model when any error was found.

Defaults are merged on the tree, not on the model: a route that writes
`retries: {max_retries: 1}` keeps `defaults.retries.backoff`, and an error in a merged value
is reported where it was written (`defaults.retries...`), once. `null` means "the built-in
default": for the optional blocks (fallback, fault, health_check, outlier_detection) that is
"off", also when `defaults:` switched them on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.config.durations import format_duration
from sidecar.config.model import (
    RETRY_CONDITIONS,
    Address,
    BackoffConfig,
    BudgetConfig,
    CircuitBreakerConfig,
    DiscoveryConfig,
    DnsDiscovery,
    DnsRecord,
    EtcdDiscovery,
    FallbackConfig,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    FileDiscovery,
    HealthCheckConfig,
    LoadBalancerKind,
    MatchConfig,
    OutlierDetectionConfig,
    RegisterConfig,
    RegisterHealthCheck,
    RetryConfig,
    RouteConfig,
    ServiceConfig,
    SidecarConfig,
    StaticDiscovery,
)
from sidecar.config.reader import BAD, NAME, TOKEN, Reader, is_ip, suggest, valid_hostname
from sidecar.config.yamlsafe import YEntry, YMap, YNode

TOP_KEYS = ("listen", "admin", "drain_timeout", "defaults", "services", "routes", "register")
ROUTE_DEFAULT_KEYS = ("timeout", "retries", "fallback", "fault")
SERVICE_DEFAULT_KEYS = (
    "load_balancer",
    "connect_timeout",
    "max_requests",
    "health_check",
    "outlier_detection",
    "circuit_breaker",
)
ROUTE_KEYS = ("name", "match", "service", "rewrite_prefix", *ROUTE_DEFAULT_KEYS)
SERVICE_KEYS = ("endpoints", "discovery", *SERVICE_DEFAULT_KEYS)
DISCOVERY_KINDS = ("static", "dns", "file", "etcd")
MATCH_KEYS = ("prefix", "path", "methods", "headers", "host")
RETRY_KEYS = (
    "max_retries",
    "per_try_timeout",
    "retry_on",
    "backoff",
    "budget",
    "non_idempotent",
    "max_body_bytes",
)
DNS_KEYS = ("name", "port", "record", "refresh", "nameservers")
FILE_KEYS = ("path",)
ETCD_KEYS = ("endpoints", "prefix")
HEALTH_CHECK_KEYS = ("path", "interval", "timeout", "unhealthy_threshold", "healthy_threshold")
OUTLIER_KEYS = ("consecutive_failures", "ejection_time", "max_ejection_percent")
BREAKER_KEYS = (
    "failure_threshold",
    "reset_timeout",
    "success_threshold",
    "half_open_max_requests",
    "failure_status",
)
BACKOFF_KEYS = ("base", "max")
BUDGET_KEYS = ("ratio", "min_per_second")
FALLBACK_KEYS = ("status", "headers", "body")
FAULT_KEYS = ("delay", "abort")
DELAY_KEYS = ("percent", "duration")
ABORT_KEYS = ("percent", "status")
REGISTER_KEYS = ("etcd", "service", "address", "ttl", "health_check")
REGISTER_HEALTH_KEYS = ("path", "interval")
# Every mapping of the schema, by where it sits: the reference config and docs are tested
# against this, so a new key cannot go undocumented.
SCHEMA: dict[str, tuple[str, ...]] = {
    "": TOP_KEYS,
    "defaults": ROUTE_DEFAULT_KEYS + SERVICE_DEFAULT_KEYS,
    "services.*": SERVICE_KEYS,
    "services.*.discovery": DISCOVERY_KINDS,
    "services.*.discovery.dns": DNS_KEYS,
    "services.*.discovery.file": FILE_KEYS,
    "services.*.discovery.etcd": ETCD_KEYS,
    "services.*.health_check": HEALTH_CHECK_KEYS,
    "services.*.outlier_detection": OUTLIER_KEYS,
    "services.*.circuit_breaker": BREAKER_KEYS,
    "routes[*]": ROUTE_KEYS,
    "routes[*].match": MATCH_KEYS,
    "routes[*].retries": RETRY_KEYS,
    "routes[*].retries.backoff": BACKOFF_KEYS,
    "routes[*].retries.budget": BUDGET_KEYS,
    "routes[*].fallback": FALLBACK_KEYS,
    "routes[*].fault": FAULT_KEYS,
    "routes[*].fault.delay": DELAY_KEYS,
    "routes[*].fault.abort": ABORT_KEYS,
    "register": REGISTER_KEYS,
    "register.etcd": ETCD_KEYS,
    "register.health_check": REGISTER_HEALTH_KEYS,
}
LOAD_BALANCERS: tuple[LoadBalancerKind, ...] = ("round_robin", "least_request", "random")
DNS_RECORDS: tuple[DnsRecord, ...] = ("A", "AAAA", "SRV")
RETRY_SHORTHANDS: dict[str, frozenset[int]] = {
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
}
# Responses the sidecar sends itself must be final ones: a 1xx cannot end an exchange.
MIN_RESPONSE_STATUS = 200

_DEFAULT = SidecarConfig()
_NO_HEADERS: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Built:
    config: SidecarConfig
    route_index: list[int] = field(default_factory=list)  # list index of each built route


def merge(own: YMap, defaults: YMap | None) -> YMap:
    """`own` with every key it omits taken from `defaults`; mappings merge recursively."""
    if defaults is None or not defaults.entries:
        return own
    entries = dict(own.entries)
    for key, entry in defaults.entries.items():
        mine = entries.get(key)
        if mine is None:
            entries[key] = entry
        elif isinstance(mine.value, YMap) and isinstance(entry.value, YMap):
            entries[key] = YEntry(key, mine.key_pos, mine.owner, merge(mine.value, entry.value))
    return YMap(entries, own.pos, own.path)


def _subset(m: YMap, keys: tuple[str, ...]) -> YMap:
    return YMap({k: e for k, e in m.entries.items() if k in keys}, m.pos, m.path)


def build(root: YMap, r: Reader, base_dir: Path, source: Path | None) -> Built:
    r.where[""] = root
    # `x-...` keys are free for the user, e.g. to hold YAML anchors (as in docker compose).
    top = YMap({k: e for k, e in root.entries.items() if not k.startswith("x-")}, root.pos, "")
    r.mapping(top, TOP_KEYS)
    listen = r.field(top, "listen", "", r.address, _DEFAULT.listen)
    admin = r.field(top, "admin", "", r.address, _DEFAULT.admin)
    if _same_socket(listen, admin) and "admin" in top.entries:
        r.error(r.spot("admin"), f"must differ from listen ({listen})")
    elif _same_socket(listen, admin):
        r.error(r.spot("listen"), f"must differ from admin ({admin})")
    drain_timeout = r.field(top, "drain_timeout", "", r.duration, _DEFAULT.drain_timeout)

    route_defaults = service_defaults = None
    node = r.child(top, "defaults", "")
    if node is not None and not r.is_null(node):
        defaults = r.mapping(node, ROUTE_DEFAULT_KEYS + SERVICE_DEFAULT_KEYS)
        if defaults is not None:
            route_defaults = _subset(defaults, ROUTE_DEFAULT_KEYS)
            service_defaults = _subset(defaults, SERVICE_DEFAULT_KEYS)
            # Checked on their own too, so a mistake shows even when nothing inherits it.
            _route_settings(r, route_defaults, "defaults")
            _service_settings(r, service_defaults, "defaults")

    declared: list[str] = []
    services: dict[str, ServiceConfig] = {}
    node = r.child(top, "services", "")
    if node is not None and not r.is_null(node):
        smap = r.mapping(node)
        for name, entry in (smap.entries if smap else {}).items():
            declared.append(name)
            eff = f"services.{name}"
            r.where[eff] = entry.value
            if not _valid_name(name):
                r.report(
                    entry.key_pos,
                    entry.owner,
                    f"'{name}' is not a valid service name (use letters, digits, '.', '_' "
                    "and '-', starting with a letter or digit)",
                )
            own = r.mapping(entry.value, SERVICE_KEYS)
            if own is None:
                continue
            merged = merge(own, service_defaults)
            r.where[eff] = merged
            service = _service(r, name, merged, eff, base_dir)
            if service is not None:
                services[name] = service

    built = Built(_DEFAULT)
    routes: list[RouteConfig] = []
    node = r.child(top, "routes", "")
    if node is not None and not r.is_null(node):
        first_use: dict[str, str] = {}
        for i, item in enumerate(r.seq(node) or []):
            eff = f"routes[{i}]"
            r.where[eff] = item
            own = r.mapping(item, ROUTE_KEYS)
            if own is None:
                continue
            merged = merge(own, route_defaults)
            r.where[eff] = merged
            name = r.field(merged, "name", eff, lambda n: r.nonempty(n, lenient=True), str(i))
            if name in first_use:
                r.error(
                    r.spot(f"{eff}.name"),
                    f"duplicate route name '{name}' (also used by {first_use[name]})",
                )
            first_use.setdefault(name, eff)
            route = _route(r, name, merged, eff, declared)
            if route is not None:
                routes.append(route)
                built.route_index.append(i)

    register = None
    node = r.child(top, "register", "")
    if node is not None and not r.is_null(node):
        register = _register(r, node)

    built.config = SidecarConfig(
        listen=listen,
        admin=admin,
        drain_timeout=drain_timeout,
        services=services,
        routes=tuple(routes),
        register=register,
        source=source,
    )
    return built


def _valid_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def _same_socket(a: Address, b: Address) -> bool:
    if a.port != b.port:
        return False
    wildcard = ("0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


# -- services ------------------------------------------------------------------------------


def _service_settings(
    r: Reader, m: YMap, eff: str
) -> tuple[
    LoadBalancerKind,
    float,
    int,
    HealthCheckConfig | None,
    OutlierDetectionConfig | None,
    CircuitBreakerConfig,
]:
    def lb(node: YNode) -> LoadBalancerKind | None:
        value = r.choice(node, LOAD_BALANCERS)
        return next((k for k in LOAD_BALANCERS if k == value), None)

    return (
        r.field(m, "load_balancer", eff, lb, "round_robin"),
        r.field(m, "connect_timeout", eff, r.duration, 1.0),
        r.field(m, "max_requests", eff, lambda n: r.integer(n, lo=1), 1024),
        r.field(m, "health_check", eff, lambda n: _health_check(r, n, f"{eff}.health_check"), None),
        r.field(
            m, "outlier_detection", eff, lambda n: _outlier(r, n, f"{eff}.outlier_detection"), None
        ),
        r.field(
            m,
            "circuit_breaker",
            eff,
            lambda n: _breaker(r, n, f"{eff}.circuit_breaker"),
            CircuitBreakerConfig(),
        ),
    )


def _service(r: Reader, name: str, m: YMap, eff: str, base_dir: Path) -> ServiceConfig | None:
    endpoints = r.child(m, "endpoints", eff)
    discovery_node = r.child(m, "discovery", eff)
    discovery: DiscoveryConfig | None = None
    if endpoints is not None and discovery_node is not None:
        entry = m.entries["discovery"]
        r.report(
            entry.key_pos,
            entry.owner,
            "give either 'endpoints' or 'discovery', not both "
            "('endpoints' is shorthand for discovery: {static: [...]})",
        )
    elif endpoints is not None:
        discovery = _static(r, endpoints, f"{eff}.endpoints")
    elif discovery_node is not None:
        discovery = _discovery(r, discovery_node, f"{eff}.discovery", base_dir)
    else:
        r.error(m, "missing 'endpoints' or 'discovery' (where to find this service)")
    lb, connect_timeout, max_requests, health, outlier, breaker = _service_settings(r, m, eff)
    if discovery is None:
        return None
    return ServiceConfig(
        name=name,
        discovery=discovery,
        load_balancer=lb,
        connect_timeout=connect_timeout,
        max_requests=max_requests,
        health_check=health,
        outlier_detection=outlier,
        circuit_breaker=breaker,
    )


def _discovery(r: Reader, node: YNode, eff: str, base_dir: Path) -> DiscoveryConfig | None:
    m = r.mapping(node, DISCOVERY_KINDS)
    if m is None:
        return None
    kinds = [k for k in m.entries if k in DISCOVERY_KINDS]
    if not kinds:
        r.error(m, "needs exactly one source: static, dns, file or etcd")
        return None
    if len(kinds) > 1:
        second = m.entries[kinds[1]]
        r.report(
            second.key_pos,
            second.owner,
            f"only one discovery source is allowed, got '{kinds[0]}' and '{kinds[1]}'",
        )
        return None
    kind = kinds[0]
    child = r.child(m, kind, eff)
    assert child is not None
    if kind == "static":
        return _static(r, child, f"{eff}.static")
    if kind == "dns":
        return _dns(r, child, f"{eff}.dns")
    if kind == "file":
        return _file(r, child, f"{eff}.file", base_dir)
    return _etcd(r, child, f"{eff}.etcd")


def _static(r: Reader, node: YNode, eff: str) -> StaticDiscovery | None:
    nodes = r.seq(node)
    if nodes is None:
        return None
    if not nodes:
        r.error(node, "must list at least one endpoint 'host:port'")
        return None
    seen: set[Address] = set()
    endpoints: list[Address] = []
    for item in nodes:
        address = r.address(item)
        if address is None:
            continue
        if address in seen:
            r.warn(item, f"endpoint {address} is listed twice; it will get twice the traffic")
        seen.add(address)
        endpoints.append(address)
    if len(endpoints) != len(nodes):
        return None
    return StaticDiscovery(tuple(endpoints))


def _dns(r: Reader, node: YNode, eff: str) -> DnsDiscovery | None:
    m = r.mapping(node, DNS_KEYS)
    if m is None:
        return None

    def record_of(n: YNode) -> DnsRecord | None:
        value = r.choice(n, DNS_RECORDS, upper=True)
        return next((k for k in DNS_RECORDS if k == value), None)

    def hostname(n: YNode) -> str | None:
        value = r.nonempty(n)
        if value is not None and not valid_hostname(value):
            r.error(n, f"'{value}' is not a valid DNS name")
            return None
        return value

    def nameserver(n: YNode) -> Address | None:
        address = r.address(n, default_port=53)
        if address is not None and not is_ip(address.host):
            r.error(n, f"a nameserver must be an IP address, got '{address.host}'")
            return None
        return address

    name = r.required(m, "name", eff, hostname)
    default_record: DnsRecord = "A"
    record = r.field(m, "record", eff, record_of, default_record)
    port_node = r.child(m, "port", eff)
    port = None
    if record == "SRV":
        if port_node is not None and not r.is_null(port_node):
            r.error(port_node, "must not be set for SRV records: they carry their own ports")
        elif name is not None and not name.startswith("_"):
            r.warn(
                r.spot(f"{eff}.name"),
                f"SRV names usually start with '_' (like '_{name.split('.')[0]}._tcp.example'); "
                f"'{name}' will probably have no SRV records",
            )
    elif port_node is None or r.is_null(port_node):
        r.error(m, f"missing required key 'port' ({record} records carry no port)")
    else:
        port = r.integer(port_node, lo=1, hi=65535)
    refresh = r.field(m, "refresh", eff, r.duration, 10.0)
    no_nameservers: list[Address] = []  # the system resolver's
    nameservers = r.field(m, "nameservers", eff, lambda n: r.items(n, nameserver), no_nameservers)
    if name is None or (record != "SRV" and port is None):
        return None
    return DnsDiscovery(name, port, record, refresh, tuple(nameservers))


def _file(r: Reader, node: YNode, eff: str, base_dir: Path) -> FileDiscovery | None:
    m = r.mapping(node, FILE_KEYS)
    if m is None:
        return None
    text = r.required(m, "path", eff, r.nonempty)
    if text is None:
        return None
    # normpath, not resolve(): no symlink lookups, and `..` reads as the user wrote it.
    path = Path(os.path.normpath(base_dir / Path(text).expanduser()))
    if not path.exists():
        r.warn(
            r.spot(f"{eff}.path"),
            f"{path} does not exist (yet); the service has no endpoints until it does",
        )
    return FileDiscovery(path)


def _etcd(r: Reader, node: YNode, eff: str) -> EtcdDiscovery | None:
    m = r.mapping(node, ETCD_KEYS)
    if m is None:
        return None

    def url(n: YNode) -> str | None:
        value = r.string(n)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
            or (port is not None and not 1 <= port <= 65535)
        ):
            r.error(n, f"expected an etcd URL like 'http://127.0.0.1:2379', got '{value}'")
            return None
        return value.rstrip("/")

    def urls(n: YNode) -> list[str] | None:
        values = r.items(n, url)
        if values == []:
            r.error(n, "must list at least one etcd URL")
            return None
        return values

    endpoints = r.required(m, "endpoints", eff, urls)
    prefix = r.required(m, "prefix", eff, r.nonempty)
    if prefix is not None and not prefix.endswith("/"):
        r.warn(
            r.spot(f"{eff}.prefix"),
            f"prefix '{prefix}' does not end with '/', so it also matches the keys of "
            f"'{prefix}-other/...' and the like",
        )
    if endpoints is None or prefix is None:
        return None
    return EtcdDiscovery(tuple(endpoints), prefix)


def _health_check(r: Reader, node: YNode, eff: str) -> HealthCheckConfig | None:
    m = r.mapping(node, HEALTH_CHECK_KEYS)
    if m is None:
        return None
    d = HealthCheckConfig()
    hc = HealthCheckConfig(
        path=r.field(m, "path", eff, r.http_path, d.path),
        interval=r.field(m, "interval", eff, r.duration, d.interval),
        timeout=r.field(m, "timeout", eff, r.duration, d.timeout),
        unhealthy_threshold=r.field(
            m, "unhealthy_threshold", eff, lambda n: r.integer(n, lo=1), d.unhealthy_threshold
        ),
        healthy_threshold=r.field(
            m, "healthy_threshold", eff, lambda n: r.integer(n, lo=1), d.healthy_threshold
        ),
    )
    return hc


def _outlier(r: Reader, node: YNode, eff: str) -> OutlierDetectionConfig | None:
    m = r.mapping(node, OUTLIER_KEYS)
    if m is None:
        return None
    d = OutlierDetectionConfig()
    return OutlierDetectionConfig(
        consecutive_failures=r.field(
            m, "consecutive_failures", eff, lambda n: r.integer(n, lo=1), d.consecutive_failures
        ),
        ejection_time=r.field(m, "ejection_time", eff, r.duration, d.ejection_time),
        max_ejection_percent=r.field(
            m,
            "max_ejection_percent",
            eff,
            lambda n: r.number(n, lo=0, hi=100),
            d.max_ejection_percent,
        ),
    )


def _breaker(r: Reader, node: YNode, eff: str) -> CircuitBreakerConfig | None:
    m = r.mapping(node, BREAKER_KEYS)
    if m is None:
        return None
    d = CircuitBreakerConfig()

    def at_least_one(n: YNode) -> int | None:
        return r.integer(n, lo=1)

    statuses = r.field(m, "failure_status", eff, lambda n: r.items(n, r.status), None)
    return CircuitBreakerConfig(
        failure_threshold=r.field(m, "failure_threshold", eff, at_least_one, d.failure_threshold),
        reset_timeout=r.field(m, "reset_timeout", eff, r.duration, d.reset_timeout),
        success_threshold=r.field(m, "success_threshold", eff, at_least_one, d.success_threshold),
        half_open_max_requests=r.field(
            m, "half_open_max_requests", eff, at_least_one, d.half_open_max_requests
        ),
        failure_status=d.failure_status if statuses is None else frozenset(statuses),
    )


# -- routes --------------------------------------------------------------------------------


def _route_settings(
    r: Reader, m: YMap, eff: str
) -> tuple[float, RetryConfig, FallbackConfig | None, FaultConfig | None]:
    timeout = r.field(m, "timeout", eff, r.duration, 15.0)
    retries = r.field(m, "retries", eff, lambda n: _retries(r, n, f"{eff}.retries"), RetryConfig())
    fallback = r.field(m, "fallback", eff, lambda n: _fallback(r, n, f"{eff}.fallback"), None)
    fault = r.field(m, "fault", eff, lambda n: _fault(r, n, f"{eff}.fault"), None)
    return timeout, retries, fallback, fault


def _route(r: Reader, name: str, m: YMap, eff: str, services: list[str]) -> RouteConfig | None:

    def service_ref(n: YNode) -> str | None:
        value = r.string(n)
        if value is None or value in services:
            return value
        close = suggest(value, services)
        if close:
            hint = f" (did you mean '{close}'?)"
        elif services:
            hint = " (defined: " + ", ".join(services) + ")"
        else:
            hint = " (no services are defined)"
        r.error(n, f"unknown service '{value}'{hint}")
        return None

    match = r.required(m, "match", eff, lambda n: _match(r, n, f"{eff}.match"))
    service = r.required(m, "service", eff, service_ref)
    rewrite = r.field(m, "rewrite_prefix", eff, r.slash_path, None)
    timeout, retries, fallback, fault = _route_settings(r, m, eff)
    if match is None or service is None:
        return None
    return RouteConfig(
        name=name,
        match=match,
        service=service,
        rewrite_prefix=rewrite,
        timeout=timeout,
        retries=retries,
        fallback=fallback,
        fault=fault,
    )


def _match(r: Reader, node: YNode, eff: str) -> MatchConfig | None:
    m = r.mapping(node, MATCH_KEYS)
    if m is None:
        return None
    has_prefix, has_path = "prefix" in m.entries, "path" in m.entries
    if has_prefix and has_path:
        entry = m.entries["path"]
        r.report(entry.key_pos, entry.owner, "give either 'prefix' or 'path', not both")
        return None
    if not has_prefix and not has_path:
        r.error(m, "needs 'prefix' (matches the path and below) or 'path' (exact)")
        return None
    key = "prefix" if has_prefix else "path"
    child = r.child(m, key, eff)
    assert child is not None
    where = r.http_path(child)

    def method(n: YNode) -> str | None:
        value = r.string(n)
        if value is not None and TOKEN.fullmatch(value) is None:
            r.error(n, f"'{value}' is not a valid HTTP method")
            return None
        return None if value is None else value.upper()

    def methods(n: YNode) -> frozenset[str] | None:
        values = r.items(n, method)
        if values == []:
            r.error(n, "must not be empty (leave 'methods' out to match every method)")
            return None
        return None if values is None else frozenset(values)

    def host(n: YNode) -> str | None:
        value = r.nonempty(n)
        if value is None:
            return None
        if ":" in value and not value.startswith("["):
            r.error(n, f"must be a host name without port, got '{value}'")
            return None
        if not valid_hostname(value) and not (
            value.startswith("[") and value.endswith("]") and is_ip(value[1:-1])
        ):
            r.error(n, f"'{value}' is not a valid host name")
            return None
        return value.lower().rstrip(".")

    method_set = r.field(m, "methods", eff, methods, None)
    headers = r.field(m, "headers", eff, lambda n: _headers(r, n), _NO_HEADERS)
    host_name = r.field(m, "host", eff, host, None)
    if where is None:
        return None
    return MatchConfig(
        prefix=where if has_prefix else None,
        path=None if has_prefix else where,
        methods=method_set,
        headers=headers,
        host=host_name,
    )


def _headers(r: Reader, node: YNode) -> tuple[tuple[str, str], ...] | None:
    m = r.mapping(node)
    if m is None:
        return None
    out: dict[str, str] = {}
    ok = True
    for key, entry in m.entries.items():
        name = key.lower()
        if TOKEN.fullmatch(key) is None:
            r.report(entry.key_pos, entry.owner, f"'{key}' is not a valid header name")
            ok = False
            continue
        if name in out:
            r.report(entry.key_pos, entry.owner, f"header '{name}' is given twice")
            ok = False
            continue
        value = r.string(entry.value, lenient=True)
        if value is None:
            ok = False
            continue
        if "\r" in value or "\n" in value:
            r.error(entry.value, "header values must not contain line breaks")
            ok = False
            continue
        out[name] = value
    return tuple(out.items()) if ok else None


def _retries(r: Reader, node: YNode, eff: str) -> RetryConfig | None:
    m = r.mapping(node, RETRY_KEYS)
    if m is None:
        return None
    d = RetryConfig()

    def condition(n: YNode) -> frozenset[str | int] | None:
        value = r.value(n)
        if isinstance(value, int) and not isinstance(value, bool):
            status = r.status(n)
            return None if status is None else frozenset({status})
        if isinstance(value, str):
            if value in RETRY_CONDITIONS:
                return frozenset({value})
            if value.lower() in RETRY_SHORTHANDS:
                return frozenset(RETRY_SHORTHANDS[value.lower()])
            names = [*RETRY_CONDITIONS, *RETRY_SHORTHANDS]
            close = suggest(value, names)
            hint = (
                f"did you mean '{close}'?"
                if close
                else "valid: " + ", ".join(names) + ", or a status"
            )
            r.error(n, f"unknown retry condition '{value}' ({hint})")
            return None
        if value is not BAD:
            r.expected(n, "a retry condition or an HTTP status", value)
        return None

    def conditions(n: YNode) -> frozenset[str | int] | None:
        sets = r.items(n, condition)
        if sets is None:
            return None
        return frozenset().union(*sets)

    backoff_node = r.child(m, "backoff", eff)
    backoff = d.backoff
    if backoff_node is not None and not r.is_null(backoff_node):
        backoff = _backoff(r, backoff_node, f"{eff}.backoff") or d.backoff
    budget = r.field(m, "budget", eff, lambda n: _budget(r, n, f"{eff}.budget"), d.budget)
    return RetryConfig(
        max_retries=r.field(m, "max_retries", eff, lambda n: r.integer(n, lo=0), d.max_retries),
        per_try_timeout=r.field(m, "per_try_timeout", eff, r.duration, d.per_try_timeout),
        retry_on=r.field(m, "retry_on", eff, conditions, d.retry_on),
        backoff=backoff,
        budget=budget,
        non_idempotent=r.field(m, "non_idempotent", eff, r.boolean, d.non_idempotent),
        max_body_bytes=r.field(
            m, "max_body_bytes", eff, lambda n: r.integer(n, lo=0), d.max_body_bytes
        ),
    )


def _backoff(r: Reader, node: YNode, eff: str) -> BackoffConfig | None:
    m = r.mapping(node, BACKOFF_KEYS)
    if m is None:
        return None
    d = BackoffConfig()
    base = r.field(m, "base", eff, r.duration, d.base)
    top = r.field(m, "max", eff, r.duration, d.max)
    if base > top:
        r.error(
            r.spot(f"{eff}.base" if "base" in m.entries else f"{eff}.max"),
            f"base ({format_duration(base)}) must not be larger than max ({format_duration(top)})",
        )
        return None
    return BackoffConfig(base, top)


def _budget(r: Reader, node: YNode, eff: str) -> BudgetConfig | None:
    m = r.mapping(node, BUDGET_KEYS)
    if m is None:
        return None
    d = BudgetConfig()
    return BudgetConfig(
        ratio=r.field(m, "ratio", eff, lambda n: r.number(n, lo=0), d.ratio),
        min_per_second=r.field(
            m, "min_per_second", eff, lambda n: r.number(n, lo=0), d.min_per_second
        ),
    )


def _fallback(r: Reader, node: YNode, eff: str) -> FallbackConfig | None:
    m = r.mapping(node, FALLBACK_KEYS)
    if m is None:
        return None

    def body(n: YNode) -> bytes | None:
        value = r.string(n, lenient=True, hint=" (quote a JSON body: body: '{\"items\": []}')")
        return None if value is None else value.encode()

    return FallbackConfig(
        status=r.field(m, "status", eff, lambda n: r.status(n, MIN_RESPONSE_STATUS), 200),
        headers=r.field(m, "headers", eff, lambda n: _headers(r, n), _NO_HEADERS),
        body=r.field(m, "body", eff, body, b""),
    )


def _fault(r: Reader, node: YNode, eff: str) -> FaultConfig | None:
    m = r.mapping(node, FAULT_KEYS)
    if m is None:
        return None

    def percent(n: YNode) -> float | None:
        return r.number(n, lo=0, hi=100)

    def delay(n: YNode) -> FaultDelay | None:
        dm = r.mapping(n, DELAY_KEYS)
        if dm is None:
            return None
        p = r.required(dm, "percent", f"{eff}.delay", percent)
        d = r.required(dm, "duration", f"{eff}.delay", r.duration)
        return None if p is None or d is None else FaultDelay(p, d)

    def abort(n: YNode) -> FaultAbort | None:
        am = r.mapping(n, ABORT_KEYS)
        if am is None:
            return None
        p = r.required(am, "percent", f"{eff}.abort", percent)
        s = r.required(am, "status", f"{eff}.abort", lambda x: r.status(x, MIN_RESPONSE_STATUS))
        return None if p is None or s is None else FaultAbort(p, s)

    if not any(k in m.entries for k in ("delay", "abort")):
        r.error(m, "needs 'delay' or 'abort' (or leave 'fault' out)")
        return None
    result = FaultConfig(
        delay=r.field(m, "delay", eff, delay, None), abort=r.field(m, "abort", eff, abort, None)
    )
    return result


# -- register ------------------------------------------------------------------------------


def _register(r: Reader, node: YNode) -> RegisterConfig | None:
    eff = "register"
    m = r.mapping(node, REGISTER_KEYS)
    if m is None:
        return None

    def health(n: YNode) -> RegisterHealthCheck | None:
        hm = r.mapping(n, REGISTER_HEALTH_KEYS)
        if hm is None:
            return None
        d = RegisterHealthCheck()
        return RegisterHealthCheck(
            path=r.field(hm, "path", f"{eff}.health_check", r.http_path, d.path),
            interval=r.field(hm, "interval", f"{eff}.health_check", r.duration, d.interval),
        )

    etcd = r.required(m, "etcd", eff, lambda n: _etcd(r, n, f"{eff}.etcd"))
    service = r.required(m, "service", eff, r.name)
    address = r.required(m, "address", eff, r.address)
    ttl = r.field(m, "ttl", eff, r.duration, 10.0)
    health_check = r.field(m, "health_check", eff, health, None)
    if etcd is None or service is None or address is None:
        return None
    return RegisterConfig(etcd, service, address, ttl, health_check)
