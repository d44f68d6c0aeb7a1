"""Building the whole config: the top-level keys, `defaults:` merging, and `register:`.

`build` walks the positioned tree once, merges `defaults:` under every route and service,
and returns a `SidecarConfig` (plus, for the checks, which list index each built route came
from). The blocks are built by `services`, `routes` and `discovery`; every key is read
through `Reader`, so every mistake is reported and reading goes on; the caller discards
the model when any error was found. Which keys exist, and every default, come from the
model (`schema`): nothing here restates them.

Defaults are merged on the tree, not on the model: a route that writes
`retries: {max_retries: 1}` keeps `defaults.retries.backoff`, and an error in a merged value
is reported where it was written (`defaults.retries...`), once. `null` means "the built-in
default": for the optional blocks (fallback, fault, health_check) that is "off", also when
`defaults:` switched them on. The switchable blocks (outlier_detection and the breaker's
failure_rate, slow_call and probe) are on or off by `true` / `false`; null is off, and
`true` under a `defaults:` mapping takes that mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.config import discovery, routes, services
from sidecar.config.addresses import is_ip, valid_hostname
from sidecar.config.model import (
    Address,
    EscapedSlashes,
    Http2Config,
    RegisterConfig,
    RegisterHealthCheck,
    RouteConfig,
    ServiceConfig,
    SidecarConfig,
)
from sidecar.config.reader import NAME, Reader
from sidecar.config.schema import (
    DEFAULT_KEYS,
    DEFAULTS_KEY,
    ROUTE_DEFAULT_KEYS,
    SERVICE_DEFAULT_KEYS,
    SWITCH_KEYS,
    TOP_KEYS,
    choices,
    default,
    keys,
)
from sidecar.config.show import quote
from sidecar.config.yamlsafe import YEntry, YMap, YNode, YScalar, join

ESCAPED_SLASHES = choices(EscapedSlashes)
MAX_WINDOW = 2**31 - 1  # HTTP/2 flow-control windows (RFC 9113 section 6.9.1)
MIN_CONNECTION_WINDOW = 65535  # the connection window can only be raised from its initial size


@dataclass(slots=True)
class Built:
    config: SidecarConfig
    route_index: list[int] = field(default_factory=list)  # list index of each built route


def merge(own: YMap, defaults: YMap | None, on: Callable[[YNode], bool]) -> YMap:
    """`own` with every key it omits taken from `defaults`; mappings merge recursively, and
    a switchable block written `true` (`on`) takes the mapping `defaults` gives it."""
    if defaults is None or not defaults.entries:
        return own
    entries = dict(own.entries)
    for key, entry in defaults.entries.items():
        mine = entries.get(key)
        if mine is None:
            entries[key] = entry
        elif isinstance(mine.value, YMap) and isinstance(entry.value, YMap):
            entries[key] = YEntry(key, mine.key_pos, mine.owner, merge(mine.value, entry.value, on))
        elif key in SWITCH_KEYS and isinstance(entry.value, YMap) and on(mine.value):
            entries[key] = entry
    return YMap(entries, own.pos, own.path)


def _subset(m: YMap, names: tuple[str, ...]) -> YMap:
    return YMap({k: e for k, e in m.entries.items() if k in names}, m.pos, m.path)


def build(root: YMap, r: Reader, base_dir: Path, source: Path | None) -> Built:
    r.where[""] = root
    # `x-...` keys are free for the user, e.g. to hold YAML anchors (as in docker compose).
    top = YMap({k: e for k, e in root.entries.items() if not k.startswith("x-")}, root.pos, "")
    r.mapping(top, TOP_KEYS)

    def is_true(node: YNode) -> bool:
        return isinstance(node, YScalar) and r.value(node) is True

    settings = r.block(
        top,
        "",
        SidecarConfig,
        {
            "listen": r.address,
            "admin": r.address,
            "drain_timeout": r.duration,
            "listen_path_escaped_slashes": lambda n: r.choice(n, ESCAPED_SLASHES),
            "admin_hosts": lambda n: _admin_hosts(r, n),
            "http2": lambda n: _http2(r, n),
            "register": lambda n: _register(r, n),
        },
        handled=("services", "routes"),
    )
    listen: Address = settings.get("listen", default(SidecarConfig, "listen"))
    admin: Address = settings.get("admin", default(SidecarConfig, "admin"))
    if _same_socket(listen, admin) and "admin" in top.entries:
        r.error(r.spot("admin"), f"must differ from listen ({listen})")
    elif _same_socket(listen, admin):
        r.error(r.spot("listen"), f"must differ from admin ({admin})")

    route_defaults = service_defaults = None
    node = r.child(top, DEFAULTS_KEY, "")
    if node is not None and not r.is_null(node):
        defaults = r.mapping(node, DEFAULT_KEYS)
        if defaults is not None:
            route_defaults = _subset(defaults, ROUTE_DEFAULT_KEYS)
            service_defaults = _subset(defaults, SERVICE_DEFAULT_KEYS)
            # Checked on their own too, so a mistake shows even when nothing inherits it.
            routes.check_defaults(r, route_defaults)
            services.check_defaults(r, service_defaults)

    declared: list[str] = []
    built_services: dict[str, ServiceConfig] = {}
    node = r.child(top, "services", "")
    if node is not None and not r.is_null(node):
        smap = r.mapping(node)
        for name, entry in (smap.entries if smap else {}).items():
            declared.append(name)
            eff = join("services", name)
            r.where[eff] = entry.value
            if NAME.fullmatch(name) is None:
                r.report(
                    entry.key_pos,
                    entry.owner,
                    f"{quote(name)} is not a valid service name (use letters, digits, '.', '_' "
                    "and '-', starting with a letter or digit)",
                )
            own = r.mapping(entry.value, keys(ServiceConfig))
            if own is None:
                continue
            merged = merge(own, service_defaults, is_true)
            r.where[eff] = merged
            service = services.service(r, name, merged, eff, base_dir)
            if service is not None:
                built_services[name] = service

    built = Built(SidecarConfig())
    built_routes: list[RouteConfig] = []
    node = r.child(top, "routes", "")
    if node is not None and not r.is_null(node):
        first_use: dict[str, str] = {}
        for i, item in enumerate(r.seq(node) or []):
            eff = f"routes[{i}]"
            r.where[eff] = item
            own = r.mapping(item, keys(RouteConfig))
            if own is None:
                continue
            merged = merge(own, route_defaults, is_true)
            r.where[eff] = merged
            name = r.field(merged, "name", eff, lambda n: r.nonempty(n, lenient=True), str(i))
            if name in first_use:
                r.error(
                    r.spot(f"{eff}.name"),
                    f"duplicate route name {quote(name)} (also used by {first_use[name]})",
                )
            first_use.setdefault(name, eff)
            route = routes.route(r, name, merged, eff, declared)
            if route is not None:
                built_routes.append(route)
                built.route_index.append(i)

    built.config = SidecarConfig(
        **settings,
        services=built_services,
        routes=tuple(built_routes),
        source=source,
        substituted=dict(r.substituted),
    )
    return built


def _same_socket(a: Address, b: Address) -> bool:
    if a.port != b.port:
        return False
    wildcard = ("0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


def _admin_hosts(r: Reader, node: YNode) -> tuple[str, ...] | None:
    """DNS names accepted as the admin API's Host, besides localhost and IP literals."""
    nodes = r.seq(node)
    if nodes is None:
        return None
    names: list[str] = []
    ok = True
    for item in nodes:
        value = r.nonempty(item)
        if value is None:
            ok = False
            continue
        bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        name = value.lower().rstrip(".")
        if is_ip(bare) or name == "localhost":
            r.warn(
                item,
                f"{quote(value)} is always accepted (IP addresses and localhost need no "
                "entry); admin_hosts is for other DNS names",
            )
            continue
        if ":" in value:
            r.error(item, f"must be a host name without port, got {quote(value)}")
            ok = False
        elif not valid_hostname(value):
            r.error(item, f"{quote(value)} is not a valid DNS name")
            ok = False
        else:
            names.append(name)
    return tuple(names) if ok else None


def _http2(r: Reader, node: YNode) -> Http2Config | None:
    m = r.mapping(node, keys(Http2Config))
    if m is None:
        return None
    settings = r.block(
        m,
        "http2",
        Http2Config,
        {
            "max_concurrent_streams": lambda n: r.integer(n, lo=1, hi=1000),
            "max_header_list_size": lambda n: r.integer(n, lo=1, hi=MAX_WINDOW),
            "stream_window": lambda n: r.integer(n, lo=1, hi=MAX_WINDOW),
            "connection_window": lambda n: r.integer(n, lo=MIN_CONNECTION_WINDOW, hi=MAX_WINDOW),
        },
    )
    return Http2Config(**settings)


def _register(r: Reader, node: YNode) -> RegisterConfig | None:
    eff = "register"
    m = r.mapping(node, keys(RegisterConfig))
    if m is None:
        return None

    def health(n: YNode) -> RegisterHealthCheck | None:
        hm = r.mapping(n, keys(RegisterHealthCheck))
        if hm is None:
            return None
        return RegisterHealthCheck(
            **r.block(
                hm,
                f"{eff}.health_check",
                RegisterHealthCheck,
                {"path": r.http_path, "interval": r.duration},
            )
        )

    etcd = r.required(m, "etcd", eff, lambda n: discovery.etcd(r, n, f"{eff}.etcd"))
    service = r.required(m, "service", eff, r.name)
    address = r.required(m, "address", eff, r.address)
    settings = r.block(
        m,
        eff,
        RegisterConfig,
        {"ttl": r.duration, "health_check": health},
        handled=("etcd", "service", "address"),
    )
    if etcd is None or service is None or address is None:
        return None
    return RegisterConfig(etcd=etcd, service=service, address=address, **settings)
