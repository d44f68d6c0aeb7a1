# ruff: noqa: E501  -- expected messages stay on one line each, as the user sees them
"""Valid configs: what they load to, env substitution, durations, defaults, the dump,
the reference config and docs, and every warning with its exact text."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_config, load_config_text
from sidecar.config.addresses import parse_address
from sidecar.config.checks import format_statuses, worst_backoff
from sidecar.config.dump import config_to_dict
from sidecar.config.durations import format_duration, parse_duration
from sidecar.config.envsubst import EnvError, has_reference, substitute
from sidecar.config.model import (
    Address,
    BackoffConfig,
    CircuitBreakerConfig,
    DnsDiscovery,
    EtcdDiscovery,
    FailureRateConfig,
    FallbackConfig,
    FaultAbort,
    FileDiscovery,
    HealthCheckConfig,
    Http2Config,
    OutlierDetectionConfig,
    ProbeConfig,
    RetryConfig,
    RouteConfig,
    ServiceConfig,
    SidecarConfig,
    SlowCallConfig,
    StaticDiscovery,
)
from sidecar.config.reader import Reader
from sidecar.config.schema import SCHEMA, keys
from sidecar.config.show import bounded, clip, escape, quote
from sidecar.config.yamlsafe import YMap
from sidecar.discovery import parse_address as discovery_parse_address
from sidecar.discovery.etcd import parse_instance
from sidecar.discovery.file import parse_endpoint_list
from sidecar.redact import mask_url

ROOT = Path(__file__).parent.parent
VALID = Path(__file__).parent / "data" / "valid"


def load(name: str, env: dict[str, str] | None = None) -> SidecarConfig:
    cfg, warnings = load_config(VALID / name, env={} if env is None else env)
    assert warnings == []
    return cfg


def test_contract_example_loads() -> None:
    cfg = load("full.yaml")
    assert cfg.listen == Address("127.0.0.1", 15001)
    assert cfg.admin == Address("127.0.0.1", 15000)
    assert cfg.drain_timeout == 15.0
    assert cfg.source == VALID / "full.yaml"
    orders = cfg.services["orders"]
    assert orders.discovery == StaticDiscovery(
        (Address("127.0.0.1", 8080), Address("127.0.0.1", 8081))
    )
    assert orders.load_balancer == "least_request"
    assert orders.health_check == HealthCheckConfig()
    assert orders.outlier_detection == OutlierDetectionConfig()
    assert orders.circuit_breaker == CircuitBreakerConfig()
    assert cfg.services["users"].discovery == DnsDiscovery(
        "users.internal",
        8080,
        "A",
        10.0,
        (Address("127.0.0.1", 5353), Address("127.0.0.2", 53)),
    )
    assert cfg.services["billing"].discovery == DnsDiscovery(
        "_billing._tcp.internal", None, "SRV", 10.0, ()
    )
    assert cfg.services["stock"].discovery == EtcdDiscovery(
        ("http://127.0.0.1:2379",), "/services/stock/"
    )
    route = cfg.routes[0]
    assert route.name == "orders-read"
    assert route.match.prefix == "/orders" and route.match.path is None
    assert route.match.methods == frozenset({"GET", "HEAD"})
    assert route.match.headers == (("x-tenant", "acme"),)
    assert route.match.host == "orders.internal"
    assert route.rewrite_prefix == "/"
    assert route.timeout == 2.0
    assert route.retries == RetryConfig(per_try_timeout=0.5)
    assert route.fallback == FallbackConfig(
        200, (("content-type", "application/json"),), b'{"items": []}'
    )
    assert cfg.routes[1].match.path == "/users/me"
    assert cfg.register is not None
    assert cfg.register.address == Address("127.0.0.1", 8080)
    assert cfg.register.etcd == EtcdDiscovery(("http://127.0.0.1:2379",), "/services/")
    assert cfg.register.health_check is not None
    assert cfg.register.health_check.interval == 5.0


def test_minimal_config_gets_every_default() -> None:
    cfg = load("minimal.yaml")
    assert cfg.listen == SidecarConfig().listen and cfg.admin == SidecarConfig().admin
    service = cfg.services["orders"]
    assert (service.load_balancer, service.connect_timeout, service.max_requests) == (
        "round_robin",
        1.0,
        1024,
    )
    assert service.health_check is None
    assert service.outlier_detection == OutlierDetectionConfig()  # on by default
    assert service.circuit_breaker == CircuitBreakerConfig()
    assert (service.idle_timeout, service.protocol) == (4.0, "http1")
    (route,) = cfg.routes
    assert (route.name, route.timeout, route.retries) == ("0", 15.0, RetryConfig())
    assert route.fallback is None and route.fault is None and cfg.register is None


# -- environment ---------------------------------------------------------------------------

ENV = {"ORDERS_HOST": "127.0.0.1", "MAX_REQUESTS": "3", "ROUTE_NAME": "42", "VERSION": "2"}


def test_env_substitution_is_typed_like_yaml() -> None:
    cfg = load("env.yaml", ENV)
    assert cfg.listen == Address("127.0.0.1", 15001)  # default used
    service = cfg.services["orders"]
    assert service.discovery == StaticDiscovery((Address("127.0.0.1", 8080),))
    assert service.max_requests == 3  # plain ${N}: the integer 3
    assert service.circuit_breaker.failure_threshold == 7
    route = cfg.routes[0]
    assert route.name == "42"  # quoted: stays a string
    assert route.match.headers == (("x-version", "2"), ("x-literal", "${NOT_A_VARIABLE}"))
    assert route.timeout == 2.0
    assert route.retries.non_idempotent is False
    assert route.retries.per_try_timeout is None  # ${PER_TRY:-} is empty: null: default


def test_env_values_override_defaults_and_are_typed() -> None:
    env = ENV | {
        "LISTEN_PORT": "16001",
        "THRESHOLD": "2",
        "TIMEOUT": "750ms",
        "RETRY_POST": "yes",
        "PER_TRY": "250ms",
    }
    cfg, warnings = load_config(VALID / "env.yaml", env=env)
    assert cfg.listen.port == 16001
    assert cfg.services["orders"].circuit_breaker.failure_threshold == 2
    assert cfg.routes[0].timeout == 0.75
    assert cfg.routes[0].retries.non_idempotent is True  # `yes` is a YAML boolean
    assert cfg.routes[0].retries.per_try_timeout == 0.25
    assert [w.message for w in warnings] == [
        "non_idempotent: true retries POST and PATCH too; the upstream may apply such a request twice",
        "3 attempts of 250ms plus up to 75ms of back-off can take 825ms, more than the route timeout (750ms); later attempts will be cut short",
    ]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    cfg, _ = load_config(VALID / "env.yaml")
    assert cfg.services["orders"].max_requests == 3


BASE = "services: {orders: {endpoints: ['127.0.0.1:8080']}}\nroutes: [{match: {prefix: /}, service: orders}]\n"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('drain_timeout: "${T}"\n', {"T": "3"}, None),  # a quoted "3" is still a duration
        (
            "services: {orders: {endpoints: ['127.0.0.1:1'], max_requests: \"${N}\"}}\n",
            {"N": "3"},
            "<config>:1:63: services.orders.max_requests: expected an integer, got '3'",
        ),
        (
            "services: {orders: {endpoints: ['${E}']}}\n",
            {"E": "[127.0.0.1:1, 127.0.0.1:2]"},
            "<config>:1:33: services.orders.endpoints[0]: '[127.0.0.1:1, 127.0.0.1:2]' is not a valid '[IPv6]:port' address",
        ),
        (
            "services:\n  orders: {endpoints: ['127.0.0.1:1']}\n  other:\n    endpoints: ['127.0.0.1:1']\n    max_requests: ${N}\n",
            {"N": ""},
            None,
        ),  # empty: null: default
        (
            "drain_timeout: ${T:-${U}}\n",
            {},
            "<config>:1:16: drain_timeout: nested variable references are not supported in '${T:-${U}'",
        ),
        (
            "drain_timeout: ${}\n",
            {},
            "<config>:1:16: drain_timeout: malformed variable reference '${}' (write ${NAME} or ${NAME:-default}; $${ for a literal ${)",
        ),
        (
            "drain_timeout: ${T\n",
            {},
            "<config>:1:16: drain_timeout: malformed variable reference '${T' (write ${NAME} or ${NAME:-default}; $${ for a literal ${)",
        ),
        ("drain_timeout: ${T}\n", {"T": "0"}, "<config>:1:16: drain_timeout: must be > 0, got 0"),
        ("x-unused: ${NOT_SET}\n", {}, None),  # ignored keys are never substituted
    ],
)
def test_env_edge_cases(text: str, env: dict[str, str], message: str | None) -> None:
    text = text + "routes: []\n" if "routes" not in text else text
    if message is None:
        load_config_text(text, env=env)
        return
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env=env)
    assert [str(p) for p in info.value.errors] == [message]


def test_substitute() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert substitute("x${A}y${A}", env) == "x1y1"
    assert substitute("${EMPTY:-d}${MISSING:-d2}", env) == "dd2"
    assert substitute("${EMPTY}", env) == ""
    assert substitute("$A $ {A} $${A}", env) == "$A $ {A} ${A}"
    with pytest.raises(EnvError, match="'MISSING' is not set"):
        substitute("${MISSING}", env)


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        (".5s", 0.5),
        ("2", 2.0),
        (2, 2.0),
        (0.5, 0.5),
        ("-1s", -1.0),
        ("0s", 0.0),
        ("fast", None),
        ("1 s", None),
        ("1e3s", None),
        ("s", None),
        ("", None),
        (True, None),
        (float("inf"), None),
        (None, None),
    ],
)
def test_parse_duration(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (2.0, "2s"),
        (1.5, "1.5s"),
        (90.0, "90s"),
        (120.0, "2m"),
        (3600.0, "1h"),
        (0.0005, "0.5ms"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_durations_in_every_form() -> None:
    cfg = load("durations.yaml")
    assert cfg.drain_timeout == 1.5
    service = cfg.services["orders"]
    assert service.connect_timeout == 0.25
    assert service.circuit_breaker.reset_timeout == 120.0
    assert service.outlier_detection is not None
    assert service.outlier_detection.ejection_time == 90.0
    assert service.health_check is not None
    assert (service.health_check.interval, service.health_check.timeout) == (3600.0, 0.5)
    route = cfg.routes[0]
    assert route.timeout == 3.0
    assert route.retries.per_try_timeout == 0.5
    assert route.retries.backoff == BackoffConfig(0.001, 0.001)


# -- defaults, shorthand, paths, names, retry_on --------------------------------------------


def test_defaults_merge_deeply_under_routes_and_services() -> None:
    cfg = load("defaults_merge.yaml")
    orders, users = cfg.services["orders"], cfg.services["users"]
    assert orders.connect_timeout == 2.0 and users.connect_timeout == 0.5
    # circuit_breaker merged key by key with the service's own reset_timeout
    assert orders.circuit_breaker == CircuitBreakerConfig(
        failure_threshold=10, reset_timeout=5.0, failure_status=frozenset({502, 503, 504})
    )
    assert users.circuit_breaker.failure_threshold == 10
    assert orders.health_check == HealthCheckConfig(path="/ready")
    assert users.health_check is None  # null switches the default off
    inherits, overrides, no_fallback = cfg.routes
    assert inherits.timeout == 5.0
    assert inherits.retries.max_retries == 3
    assert inherits.retries.backoff == BackoffConfig(0.01, 1.0)
    assert inherits.fallback == FallbackConfig(503, (("content-type", "text/plain"),), b"busy")
    assert overrides.timeout == 1.0
    assert overrides.retries.max_retries == 1
    assert overrides.retries.backoff == BackoffConfig(0.01, 1.0)  # kept from defaults
    assert (overrides.retries.budget.ratio, overrides.retries.budget.min_per_second) == (0.5, 0.0)
    assert overrides.fallback == FallbackConfig(
        503, (("x-fallback", "1"), ("content-type", "text/plain")), b"busy"
    )
    assert no_fallback.fallback is None


def test_endpoints_is_shorthand_for_static_discovery() -> None:
    cfg = load("shorthand.yaml")
    assert cfg.services["short"].discovery == cfg.services["long"].discovery
    assert cfg.services["short"].discovery == StaticDiscovery(
        (Address("127.0.0.1", 8080), Address("::1", 8081), Address("localhost", 8082))
    )
    assert str(Address("::1", 8081)) == "[::1]:8081"


def test_file_discovery_path_is_relative_to_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load("file_discovery.yaml")
    expected = FileDiscovery(VALID / "endpoints" / "orders.yaml")
    assert cfg.services["orders"].discovery == expected
    assert cfg.services["parent"].discovery == expected  # `..` normalised
    discovery = cfg.services["orders"].discovery
    assert isinstance(discovery, FileDiscovery) and discovery.path.is_absolute()


def test_relative_path_given_relative_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(VALID.parent)
    cfg, _ = load_config("valid/file_discovery.yaml", env={})
    assert cfg.services["orders"].discovery == FileDiscovery(VALID / "endpoints" / "orders.yaml")
    assert cfg.source == Path("valid/file_discovery.yaml")


def test_text_without_path_resolves_against_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(VALID)
    text = "services: {o: {discovery: {file: {path: endpoints/orders.yaml}}}}\nroutes: [{match: {prefix: /}, service: o}]\n"
    cfg, warnings = load_config_text(text, env={})
    assert warnings == []
    assert cfg.services["o"].discovery == FileDiscovery(VALID / "endpoints" / "orders.yaml")
    assert cfg.source is None


def test_route_names_default_to_their_index() -> None:
    cfg = load("route_names.yaml")
    assert [r.name for r in cfg.routes] == ["0", "named", "2"]


def test_default_route_name_can_collide_with_an_explicit_one() -> None:
    text = "services: {o: {endpoints: ['127.0.0.1:1']}}\nroutes:\n  - {name: '1', match: {prefix: /a}, service: o}\n  - {match: {prefix: /b}, service: o}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.errors] == [
        "<config>:4:5: routes[1]: duplicate route name '1' (also used by routes[0])"
    ]


def test_retry_on_shorthands_expand() -> None:
    gateway, mixed, none = load("retry_on.yaml").routes
    assert gateway.retries.retry_on == {502, 503, 504}
    assert mixed.retries.retry_on == {"connect-failure", "reset", 429, 500, 502, 503, 504}
    assert none.retries.retry_on == frozenset()
    text = BASE.replace("service: orders}", "service: orders, retries: {retry_on: [5xx]}}")
    cfg, _ = load_config_text(text + "x-: 1\n", env={})
    assert cfg.routes[0].retries.retry_on == set(range(500, 600))


def test_anchors_aliases_merge_keys_and_x_keys() -> None:
    cfg = load("anchors.yaml")
    assert cfg.services["orders"].discovery == cfg.services["orders-copy"].discovery
    retries = cfg.routes[0].retries
    assert retries.max_retries == 3  # written key beats the merged one
    assert retries.backoff == BackoffConfig(0.01, 0.1)


def test_methods_headers_and_host_are_normalised() -> None:
    text = (
        "services: {o: {endpoints: ['127.0.0.1:1']}}\n"
        "routes: [{match: {prefix: /, methods: [get, Post], headers: {X-Tenant: Acme, yes: 2}, host: API.Example.COM}, service: o}]\n"
    )
    cfg, _ = load_config_text(text, env={})
    match = cfg.routes[0].match
    assert match.methods == frozenset({"GET", "POST"})
    assert match.headers == (("x-tenant", "Acme"), ("yes", "2"))  # keys as written, values too
    assert match.host == "api.example.com"


def test_loading_is_deterministic_and_returns_frozen_config() -> None:
    a, b = load("full.yaml"), load("full.yaml")
    assert a == b
    with pytest.raises(AttributeError):
        a.routes[0].timeout = 1.0  # type: ignore[misc]  # the write is the point: it must fail


# -- the JSON dump -------------------------------------------------------------------------


def test_config_to_dict_is_json_ready() -> None:
    cfg = load("full.yaml")
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert data["listen"] == "127.0.0.1:15001"
    assert data["drain_timeout"] == 15.0
    assert data["source"] == str(VALID / "full.yaml")
    orders = data["services"]["orders"]
    assert orders["discovery"] == {"static": ["127.0.0.1:8080", "127.0.0.1:8081"]}
    assert orders["circuit_breaker"]["failure_status"] == [500, 502, 503, 504]
    assert data["services"]["users"]["discovery"] == {
        "dns": {
            "name": "users.internal",
            "port": 8080,
            "record": "A",
            "refresh": 10.0,
            "nameservers": ["127.0.0.1:5353", "127.0.0.2:53"],
        }
    }
    assert data["services"]["stock"]["discovery"] == {
        "etcd": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/services/stock/"}
    }
    route = data["routes"][0]
    assert route["match"] == {
        "prefix": "/orders",
        "path": None,
        "methods": ["GET", "HEAD"],
        "headers": {"x-tenant": "acme"},
        "host": "orders.internal",
    }
    assert route["retries"]["retry_on"] == [
        "connect-failure",
        "per-try-timeout",
        "reset",
        502,
        503,
        504,
    ]
    assert route["retries"]["per_try_timeout"] == 0.5
    assert route["fallback"] == {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": '{"items": []}',
    }
    assert data["routes"][1]["match"]["headers"] == {}
    assert data["register"]["address"] == "127.0.0.1:8080"


def test_config_to_dict_file_discovery_and_defaults() -> None:
    data = config_to_dict(load("file_discovery.yaml"))
    assert data["services"]["orders"]["discovery"] == {
        "file": {"path": str(VALID / "endpoints" / "orders.yaml")}
    }
    assert json.dumps(config_to_dict(SidecarConfig()))  # the empty default config too


def test_config_to_dict_masks_etcd_passwords() -> None:
    assert mask_url("http://user:secret@127.0.0.1:2379") == "http://user:***@127.0.0.1:2379"
    assert mask_url("http://127.0.0.1:2379") == "http://127.0.0.1:2379"
    cfg = SidecarConfig(
        register=None,
        services={},
    )
    assert "secret" not in json.dumps(config_to_dict(cfg))
    text = "services: {o: {discovery: {etcd: {endpoints: ['https://u:secret@127.0.0.1:2379'], prefix: /s/}}}}\nroutes: [{match: {prefix: /}, service: o}]\n"
    cfg, _ = load_config_text(text, env={})
    dumped = json.dumps(config_to_dict(cfg))
    assert "secret" not in dumped and "u:***@127.0.0.1:2379" in dumped


# -- reference config and docs -------------------------------------------------------------

REFERENCE = ROOT / "config" / "reference.yaml"
DOCS = ROOT / "docs" / "configuration.md"


def test_reference_config_is_valid_without_warnings() -> None:
    cfg, warnings = load_config(REFERENCE, env={})
    assert [str(w) for w in warnings] == []
    for address in (cfg.listen, cfg.admin):
        assert address.host == "127.0.0.1"
    for service in cfg.services.values():
        assert isinstance(service.discovery, StaticDiscovery)
        assert all(a.host == "127.0.0.1" for a in service.discovery.endpoints)


def test_reference_config_shows_the_defaults_it_claims() -> None:
    cfg, _ = load_config(REFERENCE, env={})
    orders = cfg.services["orders"]
    defaults = SidecarConfig()
    assert (cfg.listen, cfg.admin, cfg.drain_timeout) == (
        defaults.listen,
        defaults.admin,
        defaults.drain_timeout,
    )
    assert orders.health_check == HealthCheckConfig()
    assert orders.outlier_detection == OutlierDetectionConfig()
    assert orders.circuit_breaker == CircuitBreakerConfig()
    assert (orders.load_balancer, orders.connect_timeout, orders.max_requests) == (
        "round_robin",
        1.0,
        1024,
    )
    assert cfg.routes[0].retries == RetryConfig(per_try_timeout=0.5)


def test_reference_config_and_docs_mention_every_key() -> None:
    reference, docs = REFERENCE.read_text(), DOCS.read_text()
    for where, names in SCHEMA.items():
        for key in names:
            assert re.search(rf"(^|[\s{{,#-]){key}:", reference, re.M), (
                f"{where}.{key} missing from reference.yaml"
            )
            assert f"`{key}" in docs or f".{key}`" in docs, f"{where}.{key} missing from docs"


def test_reference_commented_register_block_is_valid_too() -> None:
    text = REFERENCE.read_text()
    block = text[text.index("# register:") :]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    full = text[: text.index("# register:")] + uncommented + "\n"
    cfg, warnings = load_config_text(full, env={})
    assert warnings == [] and cfg.register is not None
    assert cfg.register.health_check is not None


# -- warnings ------------------------------------------------------------------------------

SERVICE = "services:\n  orders:\n    endpoints: ['127.0.0.1:8080']\n"


def warnings_of(text: str) -> list[str]:
    _, warnings = load_config_text(text, env={})
    assert all(w.warning for w in warnings)
    return [str(w) for w in warnings]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    timeout: 1s\n    retries: {max_retries: 2, per_try_timeout: 500ms}\n",
            [
                "warning: <config>:8:48: routes[0].retries.per_try_timeout: 3 attempts of 500ms plus up to 75ms of back-off can take 1.575s, more than the route timeout (1s); later attempts will be cut short"
            ],
            id="attempts-exceed-route-timeout",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    timeout: 1s\n    retries: {per_try_timeout: 2s}\n",
            [
                "warning: <config>:8:32: routes[0].retries.per_try_timeout: per_try_timeout (2s) is not shorter than the route timeout (1s): the route timeout fires first, so a slow attempt is never retried"
            ],
            id="per-try-not-shorter",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {non_idempotent: true}\n",
            [
                "warning: <config>:7:31: routes[0].retries.non_idempotent: non_idempotent: true retries POST and PATCH too; the upstream may apply such a request twice"
            ],
            id="non-idempotent",
        ),
        pytest.param(
            "defaults: {retries: {non_idempotent: true}}\n"
            + SERVICE
            + "routes:\n  - {match: {prefix: /a}, service: orders}\n  - {match: {prefix: /b}, service: orders}\n",
            [
                "warning: <config>:1:38: defaults.retries.non_idempotent: non_idempotent: true retries POST and PATCH too; the upstream may apply such a request twice"
            ],
            id="non-idempotent-from-defaults-once",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - {name: all, match: {prefix: /api}, service: orders}\n  - {name: get, match: {prefix: /api/v1, methods: [GET]}, service: orders}\n  - {name: exact, match: {path: /api}, service: orders}\n  - {name: other, match: {prefix: /apiary}, service: orders}\n",
            [
                "warning: <config>:6:24: routes[1].match: this route can never match: routes[0] ('all') comes first and matches every request it would",
                "warning: <config>:7:26: routes[2].match: this route can never match: routes[0] ('all') comes first and matches every request it would",
            ],
            id="shadowed-route",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - {match: {prefix: /, methods: [GET]}, service: orders}\n  - {match: {prefix: /, headers: {x-a: b}}, service: orders}\n  - {match: {prefix: /x, host: a.example}, service: orders}\n  - {match: {prefix: /x, methods: [GET], headers: {x-a: b}, host: a.example}, service: orders}\n",
            [
                "warning: <config>:8:13: routes[3].match: this route can never match: routes[0] ('0') comes first and matches every request it would"
            ],
            id="shadowed-by-conditions",
        ),
        pytest.param(
            "admin: 0.0.0.0:15000\n"
            + SERVICE
            + "routes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:1:8: admin: the admin API (metrics, config, reload) on 0.0.0.0:15000 is reachable from other hosts; keep it on 127.0.0.1 or [::1]"
            ],
            id="admin-not-loopback",
        ),
        pytest.param(
            "listen: '[::]:15001'\nadmin: '[::1]:15000'\n"
            + SERVICE
            + "routes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:1:9: listen: [::]:15001 is reachable from other hosts, which can then call every configured service through the sidecar; keep it on 127.0.0.1 unless that is intended"
            ],
            id="listen-not-loopback",
        ),
        pytest.param(
            "listen: localhost:15001\n"
            + SERVICE
            + "routes: [{match: {prefix: /}, service: orders}]\n",
            [],
            id="localhost-is-loopback",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    fault: {delay: {percent: 10, duration: 200ms}, abort: {percent: 5, status: 503}}\n",
            [
                "warning: <config>:7:12: routes[0].fault: fault injection is on: it delays 10% of requests by 200ms and aborts 5% with 503"
            ],
            id="fault-injection",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    fault: {abort: {percent: 0, status: 503}}\n",
            [],
            id="fault-at-zero-percent",
        ),
        pytest.param(
            SERVICE
            + "    circuit_breaker: {failure_threshold: 1}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:4:42: services.orders.circuit_breaker.failure_threshold: a failure_threshold of 1 opens the breaker on every single failed attempt"
            ],
            id="breaker-threshold-one",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {retry_on: [5xx, 429]}\n",
            [
                "warning: <config>:7:25: routes[0].retries.retry_on: retry_on includes 429, 501, 505-599, which the circuit breaker of service 'orders' does not count as failures (failure_status); repeated failures of that kind never open it"
            ],
            id="retry-on-status-breaker-ignores",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {max_retries: 0, retry_on: [429]}\n",
            [],
            id="retry-on-without-retries",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {retry_on: []}\n",
            [
                "warning: <config>:7:25: routes[0].retries.retry_on: retry_on is empty, so max_retries: 2 never retries anything"
            ],
            id="empty-retry-on",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {budget: {ratio: 0, min_per_second: 0}}\n",
            [
                "warning: <config>:7:23: routes[0].retries.budget: a retry budget with ratio 0 and min_per_second 0 allows no retries at all"
            ],
            id="zero-budget",
        ),
        pytest.param(
            SERVICE
            + "  spare:\n    endpoints: ['127.0.0.1:8081']\nroutes: [{match: {prefix: /}, service: orders}]\n",
            ["warning: <config>:4:3: services.spare: service 'spare' is not used by any route"],
            id="unused-service",
        ),
        pytest.param(
            "services: {}\nroutes: []\n",
            [
                "warning: <config>:2:9: routes: no routes are configured: every request gets 404 no_route"
            ],
            id="no-routes",
        ),
        pytest.param(
            SERVICE
            + "    health_check: {interval: 1s, timeout: 2s}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:4:43: services.orders.health_check.timeout: health check timeout (2s) is not shorter than its interval (1s); slow checks will overlap"
            ],
            id="health-check-overlap",
        ),
        pytest.param(
            "services:\n  orders:\n    endpoints: ['127.0.0.1:8080', '127.0.0.1:8080']\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:3:35: services.orders.endpoints[1]: endpoint 127.0.0.1:8080 is listed twice; it will get twice the traffic"
            ],
            id="duplicate-endpoint",
        ),
        pytest.param(
            "services:\n  orders:\n    discovery: {dns: {name: orders.internal, record: SRV}}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:3:29: services.orders.discovery.dns.name: SRV names usually start with '_' (like '_orders._tcp.example'); 'orders.internal' will probably have no SRV records"
            ],
            id="srv-name",
        ),
        pytest.param(
            "services:\n  orders:\n    discovery: {etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /services/orders}}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:3:70: services.orders.discovery.etcd.prefix: prefix '/services/orders' does not end with '/', so it also matches the keys of '/services/orders-other/...' and the like"
            ],
            id="etcd-prefix",
        ),
    ],
)
def test_warning(text: str, expected: list[str]) -> None:
    assert warnings_of(text) == expected


def test_warning_for_missing_endpoints_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "services:\n  orders:\n    discovery: {file: {path: eps/orders.yaml}}\nroutes: [{match: {prefix: /}, service: orders}]\n"
    )
    _, warnings = load_config(path, env={})
    assert [str(w) for w in warnings] == [
        f"warning: {path}:3:30: services.orders.discovery.file.path: {tmp_path}/eps/orders.yaml does not exist (yet); the service has no endpoints until it does"
    ]


def test_inherited_route_specific_warning_names_the_route() -> None:
    text = (
        "defaults: {timeout: 1s, retries: {per_try_timeout: 1s}}\n"
        + SERVICE
        + "routes:\n  - {name: a, match: {prefix: /a}, service: orders}\n  - {name: b, match: {prefix: /b}, service: orders, timeout: 5s}\n"
    )
    assert warnings_of(text) == [
        "warning: <config>:1:52: defaults.retries.per_try_timeout: per_try_timeout (1s) is not shorter than the route timeout (1s): the route timeout fires first, so a slow attempt is never retried (in route 'a')"
    ]


def test_warnings_come_with_errors_in_config_error() -> None:
    text = "admin: 0.0.0.0:15000\nlisten: nope\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.problems] == [
        "warning: <config>:1:8: admin: the admin API (metrics, config, reload) on 0.0.0.0:15000 is reachable from other hosts; keep it on 127.0.0.1 or [::1]",
        "<config>:2:9: listen: expected an address 'host:port', got 'nope' (missing port)",
    ]


def test_worst_backoff_and_status_ranges() -> None:
    retries = RetryConfig(max_retries=5, backoff=BackoffConfig(0.1, 0.3))
    assert worst_backoff(retries) == pytest.approx(0.1 + 0.2 + 0.3 + 0.3 + 0.3)
    assert worst_backoff(RetryConfig(max_retries=10**9, backoff=BackoffConfig(1.0, 1.0))) == 1e9
    assert worst_backoff(RetryConfig(max_retries=0)) == 0
    assert format_statuses([504, 500, 502, 503, 501]) == "500-504"
    assert format_statuses([429, 500, 503]) == "429, 500, 503"


# -- the keys for resilience, gRPC and hardening --------------------------------------------


def test_new_keys_load() -> None:
    cfg = load("new_keys.yaml")
    assert cfg.listen_path_escaped_slashes == "keep"
    assert cfg.admin_hosts == ("sidecar.internal", "admin.example")  # lower-cased, no dot
    assert cfg.http2 == Http2Config(250, 32768, 1048576, 16777216)
    greeter, orders, users = (cfg.services[n] for n in ("greeter", "orders", "users"))
    assert (greeter.protocol, greeter.idle_timeout) == ("h2c", 2.0)  # idle_timeout: defaults
    assert greeter.health_check == HealthCheckConfig(grpc=True, grpc_service="helloworld.Greeter")
    assert greeter.outlier_detection is None
    assert greeter.circuit_breaker == CircuitBreakerConfig(
        # window from defaults, merged key by key
        failure_rate=FailureRateConfig(threshold=0.25, window=30.0, min_calls=50),
        slow_call=SlowCallConfig(duration=0.25, rate=0.9),
        reset_timeout=2.0,
        max_reset_timeout=20.0,
        failure_grpc_status=frozenset({14}),
        probe=ProbeConfig(interval=1.0),
    )
    assert greeter.circuit_breaker.open_period_cap == 20.0
    assert (orders.protocol, orders.idle_timeout) == ("http1", 30.0)
    assert orders.outlier_detection == OutlierDetectionConfig(consecutive_failures=3)
    assert orders.circuit_breaker == CircuitBreakerConfig(
        failure_rate=None, slow_call=SlowCallConfig(), probe=None
    )
    assert users.outlier_detection is None  # null: off
    # `true` under a defaults mapping takes that mapping
    assert users.circuit_breaker.failure_rate == FailureRateConfig(window=30.0)
    greet = cfg.routes[0]
    assert greet.retries.retry_on == {"connect-failure"}
    assert greet.retries.retry_on_grpc == {14, 4}
    assert greet.fault is not None and greet.fault.abort == FaultAbort(0, 503, 8)


def test_breaker_cap_defaults_to_the_larger_of_60s_and_reset_timeout() -> None:
    assert CircuitBreakerConfig().open_period_cap == 60.0
    text = (
        SERVICE
        + "    circuit_breaker: {reset_timeout: 90s}\nroutes: [{match: {prefix: /}, service: orders}]\n"
    )
    cfg, _ = load_config_text(text, env={})
    breaker = cfg.services["orders"].circuit_breaker
    assert (breaker.max_reset_timeout, breaker.open_period_cap) == (None, 90.0)
    assert config_to_dict(cfg)["services"]["orders"]["circuit_breaker"]["max_reset_timeout"] == 90.0


@pytest.mark.parametrize(
    ("defaults", "own", "expected"),
    [
        ("", "", OutlierDetectionConfig()),
        ("", "outlier_detection: true", OutlierDetectionConfig()),
        ("", "outlier_detection: {}", OutlierDetectionConfig()),
        ("", "outlier_detection: false", None),
        ("", "outlier_detection: null", None),
        ("", "outlier_detection: ~", None),
        ("outlier_detection: {ejection_time: 5s}", "", OutlierDetectionConfig(ejection_time=5.0)),
        (
            "outlier_detection: {ejection_time: 5s}",
            "outlier_detection: true",
            OutlierDetectionConfig(ejection_time=5.0),
        ),
        (
            "outlier_detection: {ejection_time: 5s}",
            "outlier_detection: {consecutive_failures: 2}",
            OutlierDetectionConfig(2, 5.0),
        ),
        ("outlier_detection: {ejection_time: 5s}", "outlier_detection: false", None),
        ("outlier_detection: false", "", None),
        (
            "outlier_detection: false",
            "outlier_detection: {consecutive_failures: 2}",
            OutlierDetectionConfig(2),
        ),
        ("outlier_detection: false", "outlier_detection: true", OutlierDetectionConfig()),
    ],
)
def test_switchable_blocks(
    defaults: str, own: str, expected: OutlierDetectionConfig | None
) -> None:
    text = (
        (f"defaults:\n  {defaults}\n" if defaults else "")
        + SERVICE
        + (f"    {own}\n" if own else "")
        + "routes: [{match: {prefix: /}, service: orders}]\n"
    )
    cfg, _ = load_config_text(text, env={})
    assert cfg.services["orders"].outlier_detection == expected


# -- one schema, and every default from the model -------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        "",
        "circuit_breaker: {}",
        "circuit_breaker: null",
        "circuit_breaker: {failure_rate: true, probe: true, slow_call: false}",
        "circuit_breaker: {failure_rate: {}, probe: {}}",
        "outlier_detection: true",
        "outlier_detection: {}",
        "health_check: null",
        "load_balancer: null\n    idle_timeout: ~",
    ],
)
def test_absent_empty_and_null_service_blocks_give_the_model_defaults(written: str) -> None:
    text = SERVICE + f"    {written}\nroutes: [{{match: {{prefix: /}}, service: orders}}]\n"
    cfg, _ = load_config_text(text, env={})
    expected = ServiceConfig(
        name="orders", discovery=StaticDiscovery((Address("127.0.0.1", 8080),))
    )
    assert cfg.services["orders"] == expected


@pytest.mark.parametrize(
    "written",
    [
        "",
        "retries: {}",
        "retries: null",
        "retries: {backoff: {}, budget: {}}",
        "retries: {backoff: null}",
        "timeout: null",
    ],
)
def test_absent_empty_and_null_route_blocks_give_the_model_defaults(written: str) -> None:
    text = SERVICE + f"routes:\n  - match: {{prefix: /}}\n    service: orders\n    {written}\n"
    cfg, _ = load_config_text(text, env={})
    (route,) = cfg.routes
    assert route == RouteConfig(name="0", match=route.match, service="orders")


def test_keys_are_the_model_fields() -> None:
    for where, names in SCHEMA.items():
        assert len(set(names)) == len(names), where
    assert keys(CircuitBreakerConfig) == tuple(
        f.name for f in dataclasses.fields(CircuitBreakerConfig)
    )
    assert "retry_on_grpc" not in keys(RetryConfig)  # filled from retry_on
    assert keys(ServiceConfig)[:2] == ("endpoints", "discovery")  # `name` is the mapping key
    assert "source" not in SCHEMA[""] and "substituted" not in SCHEMA[""]
    assert SCHEMA["defaults"][-2:] == ("idle_timeout", "protocol")


def test_a_field_without_a_reader_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Block:
        a: int = 1
        b: int = 2

    r = Reader("<test>", {})
    with pytest.raises(TypeError, match="Block: keys"):
        r.block(YMap(), "x", Block, {"a": r.duration})
    assert r.block(YMap(), "x", Block, {"a": r.duration}, handled=("b",)) == {}


# -- one address parser ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ("orders.local:80", Address("orders.local", 80)),
        ("Orders.LOCAL:80", Address("orders.local", 80)),
        ("[::0001]:80", Address("::1", 80)),
        ("[FE80::A]:443", Address("fe80::a", 443)),
        ("127.0.0.1:0080", Address("127.0.0.1", 80)),
    ],
)
def test_yaml_file_and_etcd_give_equal_addresses(written: str, address: Address) -> None:
    text = f"services: {{o: {{endpoints: ['{written}']}}}}\nroutes: [{{match: {{prefix: /}}, service: o}}]\n"
    cfg, _ = load_config_text(text, env={})
    assert cfg.services["o"].discovery == StaticDiscovery((address,))
    assert parse_endpoint_list(f"- '{written}'\n".encode()) == (address,)
    assert parse_instance(written.encode()) == address
    assert parse_instance(json.dumps({"address": written}).encode()) == address
    assert discovery_parse_address(f" {written} ") == address == parse_address(written)


def test_discovery_refuses_what_the_config_refuses() -> None:
    for bad in ("bad_host!:80", "300.1.1.1:80", "a b:80", "h:http", "h:" + "9" * 5000):
        with pytest.raises(ValueError):
            discovery_parse_address(bad)
        with pytest.raises(ValueError):
            parse_instance(bad.encode())


# -- how values appear in messages -----------------------------------------------------------


def test_quote_and_clip() -> None:
    assert quote("abc") == "'abc'"
    assert quote("a" * 80) == "'" + "a" * 80 + "'"
    assert quote("a" * (1 << 20)) == "'" + "a" * 80 + "...' (1048576 characters)"
    assert clip("1" * 81) == "1" * 80 + "... (81 characters)"
    assert (
        escape("a\nb\tc\r\x00\x7f\x9b\u2028\u202e\u00e9")
        == "a\\nb\\tc\\r\\x00\\x7f\\x9b\\u2028\\u202e\u00e9"
    )
    # an escape is never split, and escaped text counts as shown
    assert quote("\x00" * 30) == "'" + "\\x00" * 20 + "...' (30 characters)"
    assert bounded("x\ny") == "x\\ny" and len(bounded("z" * 10_000)) < 450


def test_has_reference() -> None:
    assert has_reference("${A}") and has_reference("x ${A:-d} y") and has_reference("$${A} ${B}")
    assert not has_reference("$${A}") and not has_reference("plain") and not has_reference("$A")


# -- passwords in URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("http://user:secret@127.0.0.1:2379", "http://user:***@127.0.0.1:2379"),
        ("http://127.0.0.1:2379", "http://127.0.0.1:2379"),
        ("http://user@host/", "http://user@host/"),  # no password
        ("https://:tok@h/v3/kv/range", "https://:***@h/v3/kv/range"),
        ("http://u:p@ss@h:1/x@y", "http://u:***@h:1/x@y"),  # a raw '@' in the password
        (
            "etcd: http://u:s3cret@127.0.0.1:1/v3/kv/range: Cannot connect to host; tried http://v:t@h2",
            "etcd: http://u:***@127.0.0.1:1/v3/kv/range: Cannot connect to host; tried http://v:***@h2",
        ),
        ("['http://a:1', 'http://u:p@h']", "['http://a:1', 'http://u:***@h']"),
        ("mail me: user:pass@example.com", "mail me: user:pass@example.com"),  # not a URL
    ],
)
def test_mask_url(text: str, masked: str) -> None:
    assert mask_url(text) == masked


# -- the dump shows ${VAR} references, never their values ------------------------------------


def test_dump_shows_substituted_strings_as_written() -> None:
    text = (
        "services:\n"
        "  orders:\n"
        "    endpoints: ['${HOST}:8080', '127.0.0.1:8081']\n"
        "    max_requests: ${N}\n"
        "  stock:\n"
        "    discovery: {etcd: {endpoints: ['http://u:${PASS}@127.0.0.1:2379', '${ETCD}'], prefix: /s/}}\n"
        "defaults:\n"
        "  fallback: {headers: {X-Default: '${TOKEN:-none}'}}\n"
        "routes:\n"
        "  - match: {prefix: /, headers: {Authorization: 'Bearer ${TOKEN}', x-plain: '$${TOKEN}'}}\n"
        "    service: orders\n"
        "    fallback: {body: '${BODY}', headers: {x-token: '${TOKEN}'}}\n"
        "  - match: {prefix: /stock}\n"
        "    service: stock\n"
    )
    env = {
        "HOST": "10.1.2.3",
        "N": "3",
        "PASS": "pw-secret",
        "ETCD": "http://admin:etcd-secret@127.0.0.1:2380",
        "TOKEN": "tok-secret",
        "BODY": "body-secret",
    }
    cfg, _ = load_config_text(text, env=env)
    # The runtime sees the values.
    assert cfg.routes[0].match.headers == (
        ("authorization", "Bearer tok-secret"),
        ("x-plain", "${TOKEN}"),
    )
    assert cfg.services["orders"].discovery == StaticDiscovery(
        (Address("10.1.2.3", 8080), Address("127.0.0.1", 8081))
    )
    data = config_to_dict(cfg)
    dumped = json.dumps(data)
    for secret in ("secret", "10.1.2.3"):
        assert secret not in dumped
    route = data["routes"][0]
    assert route["match"]["headers"] == {"authorization": "Bearer ${TOKEN}", "x-plain": "${TOKEN}"}
    assert route["fallback"]["headers"] == {"x-token": "${TOKEN}", "x-default": "${TOKEN:-none}"}
    assert route["fallback"]["body"] == "${BODY}"
    assert data["routes"][1]["fallback"]["headers"] == {"x-default": "${TOKEN:-none}"}
    orders = data["services"]["orders"]
    assert orders["discovery"] == {"static": ["${HOST}:8080", "127.0.0.1:8081"]}
    assert orders["max_requests"] == 3  # not a string: shown as its value
    assert data["services"]["stock"]["discovery"]["etcd"]["endpoints"] == [
        "http://u:***@127.0.0.1:2379",  # a password is masked even as a reference
        "${ETCD}",
    ]
    # Equal settings stay equal configs, however they were written.
    plain, _ = load_config_text(text.replace("${N}", "3"), env=env)
    assert plain == cfg and plain.substituted != cfg.substituted


def test_dump_masks_url_passwords_anywhere() -> None:
    text = (
        "services: {o: {discovery: {etcd: {endpoints: ['https://u:secret@127.0.0.1:2379'], prefix: /s/}}}}\n"
        "routes: [{match: {prefix: /}, service: o, fallback: {body: 'see http://a:hunter2@h/x'}}]\n"
    )
    cfg, _ = load_config_text(text, env={})
    dumped = json.dumps(config_to_dict(cfg))
    assert "secret" not in dumped and "hunter2" not in dumped
    assert "u:***@127.0.0.1:2379" in dumped and "http://a:***@h/x" in dumped
    assert cfg.routes[0].fallback is not None
    assert cfg.routes[0].fallback.body == b"see http://a:hunter2@h/x"  # the runtime's copy


def test_dump_of_new_keys() -> None:
    data = config_to_dict(load("new_keys.yaml"))
    assert json.loads(json.dumps(data)) == data
    assert data["http2"] == {
        "max_concurrent_streams": 250,
        "max_header_list_size": 32768,
        "stream_window": 1048576,
        "connection_window": 16777216,
    }
    assert data["admin_hosts"] == ["sidecar.internal", "admin.example"]
    greeter = data["services"]["greeter"]
    assert greeter["circuit_breaker"]["failure_rate"] == {
        "threshold": 0.25,
        "window": 30.0,
        "min_calls": 50,
    }
    assert greeter["circuit_breaker"]["probe"] == {"interval": 1.0}
    assert greeter["outlier_detection"] is None
    assert data["routes"][0]["retries"]["retry_on_grpc"] == [4, 14]
    assert "substituted" not in data


# -- warnings for the new keys --------------------------------------------------------------

SLOW = "    circuit_breaker: {slow_call: {duration: 1s}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            SERVICE
            + SLOW
            + "routes:\n  - {name: quick, match: {prefix: /a}, service: orders, timeout: 1s}\n  - {name: fine, match: {prefix: /b}, service: orders, timeout: 2s}\n",
            [
                "warning: <config>:4:45: services.orders.circuit_breaker.slow_call.duration: slow_call.duration (1s) is not shorter than the timeout (1s) of route 'quick' (routes[0]): its attempts time out (and count as failures) before they can count as slow"
            ],
            id="slow-call-vs-timeout",
        ),
        pytest.param(
            SERVICE
            + SLOW
            + "routes:\n  - {name: tries, match: {prefix: /a}, service: orders, timeout: 5s, retries: {per_try_timeout: 800ms}}\n",
            [
                "warning: <config>:4:45: services.orders.circuit_breaker.slow_call.duration: slow_call.duration (1s) is not shorter than the per_try_timeout (800ms) of route 'tries' (routes[0]): its attempts time out (and count as failures) before they can count as slow"
            ],
            id="slow-call-vs-per-try-timeout",
        ),
        pytest.param(
            "defaults: {circuit_breaker: {slow_call: {duration: 3s}}, timeout: 2s}\n"
            + SERVICE
            + "routes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:1:52: defaults.circuit_breaker.slow_call.duration: slow_call.duration (3s) is not shorter than the timeout (2s) of route '0' (routes[0]): its attempts time out (and count as failures) before they can count as slow"
            ],
            id="slow-call-from-defaults",
        ),
        pytest.param(
            SERVICE
            + "    circuit_breaker: {failure_rate: {window: 5s, min_calls: 51}}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:4:61: services.orders.circuit_breaker.failure_rate.min_calls: min_calls (51) is reached only at 10.2 calls per second or more over the 5s window; below that the failure_rate and slow_call rules never act (only failure_threshold opens the breaker): lower min_calls or widen the window"
            ],
            id="min-calls-unreachable",
        ),
        pytest.param(
            SERVICE
            + "    circuit_breaker: {failure_rate: {window: 5s, min_calls: 50}}\nroutes: [{match: {prefix: /}, service: orders}]\n",
            [],
            id="min-calls-at-ten-per-second",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    fault: {abort: {percent: 5, grpc_status: 8}}\n",
            [
                "warning: <config>:7:12: routes[0].fault: fault injection is on: it aborts 5% with gRPC status 8 (503 to other requests)"
            ],
            id="fault-grpc-only",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    fault: {abort: {percent: 5, status: 502, grpc_status: 13}}\n",
            [
                "warning: <config>:7:12: routes[0].fault: fault injection is on: it aborts 5% with 502 (gRPC requests: status 13)"
            ],
            id="fault-http-and-grpc",
        ),
        pytest.param(
            "admin_hosts: [10.0.0.1, '[::1]', LOCALHOST, admin.internal]\n"
            + SERVICE
            + "routes: [{match: {prefix: /}, service: orders}]\n",
            [
                "warning: <config>:1:15: admin_hosts[0]: '10.0.0.1' is always accepted (IP addresses and localhost need no entry); admin_hosts is for other DNS names",
                "warning: <config>:1:25: admin_hosts[1]: '[::1]' is always accepted (IP addresses and localhost need no entry); admin_hosts is for other DNS names",
                "warning: <config>:1:34: admin_hosts[2]: 'LOCALHOST' is always accepted (IP addresses and localhost need no entry); admin_hosts is for other DNS names",
            ],
            id="admin-hosts-ip",
        ),
        pytest.param(
            SERVICE
            + "routes:\n  - match: {prefix: /}\n    service: orders\n    retries: {retry_on: [unavailable]}\n",
            [],
            id="grpc-only-retry-on-is-not-empty",
        ),
    ],
)
def test_warning_for_new_keys(text: str, expected: list[str]) -> None:
    assert warnings_of(text) == expected
