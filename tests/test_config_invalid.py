# ruff: noqa: E501  -- expected messages stay on one line each, as the user sees them
"""Invalid configs: one file per mistake in tests/data/invalid, each with its exact messages.

A message is `FILE:LINE:COL: key.path: what is wrong`; the table below holds what follows
FILE, so a change of wording or position shows up here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import ConfigError, load_config, load_config_text
from sidecar.config.schema import SCHEMA
from sidecar.config.yamlsafe import MAX_BYTES, MAX_DEPTH, MAX_NODES

INVALID = Path(__file__).parent / "data" / "invalid"

EXPECTED: dict[str, list[str]] = {
    "alias_bomb": [
        ":6:8: the document expands to more than 100000 values (aliases repeat their whole anchor; is this an alias bomb?)",
    ],
    "backoff_base_above_max": [
        ":8:24: routes[0].retries.backoff.base: base (500ms) must not be larger than max (250ms)",
    ],
    "bad_address": [
        ":3:17: services.orders.endpoints[0]: expected an address 'host:port', got '127.0.0.1' (missing port)",
    ],
    "bad_duration": [
        ":7:14: routes[0].timeout: expected a duration like '250ms' or '2s', got 'fast'",
    ],
    "bad_grpc_retry_on": [
        ":8:27: routes[0].retries.retry_on[0]: unknown retry condition 'unavailble' (did you mean 'unavailable'?)",
        ":8:39: routes[0].retries.retry_on[1]: unknown retry condition 'resource_exhausted' (did you mean 'resource-exhausted'?)",
    ],
    "bad_match": [
        ":6:15: routes[0].match.prefix: must not contain '.' or '..' segments, got '/orders/../admin'",
        ":7:17: routes[0].match.methods[0]: 'GET POST' is not a valid HTTP method",
        ":8:18: routes[0].match.headers: 'x tenant' is not a valid header name",
        ":9:13: routes[0].match.host: must be a host name without port, got 'orders.internal:8080'",
    ],
    "bad_port": [
        ":1:9: listen: port must be between 1 and 65535, got 70000",
        ":4:17: services.orders.endpoints[0]: port must be between 1 and 65535, got 0",
    ],
    "bad_protocol": [
        ":2:13: defaults.protocol: must be one of http1, h2c, got 'h2' (did you mean 'h2c'?)",
        ":6:19: services.orders.idle_timeout: must be > 0, got 0s",
    ],
    "bad_retry_on": [
        ":8:18: routes[0].retries.retry_on[0]: unknown retry condition 'connect_failure' (did you mean 'connect-failure'?)",
        ":8:40: routes[0].retries.retry_on[2]: unknown retry condition 'timeout' (did you mean 'per-try-timeout'?)",
    ],
    "bool_not_integer": [
        ":4:19: services.orders.max_requests: expected an integer, got yes",
    ],
    "deep_nesting": [
        ":1:72: nesting is deeper than 64 levels",
    ],
    "defaults_error": [
        ":2:12: defaults.timeout: must be > 0, got 0s",
        ":3:30: defaults.retries.backof: unknown key (did you mean 'backoff'?)",
        ":4:3: defaults.service: unknown key (valid keys: timeout, retries, fallback, fault, load_balancer, connect_timeout, max_requests, health_check, outlier_detection, circuit_breaker, idle_timeout, protocol)",
    ],
    "dns_ports": [
        ":4:12: services.a-records.discovery.dns: missing required key 'port' (A records carry no port)",
        ":7:62: services.srv-records.discovery.dns.port: must not be set for SRV records: they carry their own ports",
        ":7:82: services.srv-records.discovery.dns.nameservers[0]: a nameserver must be an IP address, got 'dns.internal'",
    ],
    "duplicate_key": [
        ":8:5: routes[0]: duplicate key 'timeout' (first written at line 7)",
    ],
    "duplicate_route_name": [
        ":8:11: routes[1].name: duplicate route name 'orders' (also used by routes[0])",
    ],
    "empty": [
        ": the config file is empty; expected a mapping with 'services' and 'routes'",
    ],
    "empty_endpoints": [
        ":3:16: services.orders.endpoints: must list at least one endpoint 'host:port'",
    ],
    "endpoints_and_discovery": [
        ":4:5: services.orders: give either 'endpoints' or 'discovery', not both ('endpoints' is shorthand for discovery: {static: [...]})",
    ],
    "etcd_and_register": [
        ":4:27: services.orders.discovery.etcd.endpoints[0]: expected an etcd URL like 'http://127.0.0.1:2379', got '127.0.0.1:2379'",
        ":4:54: services.orders.discovery.etcd.prefix: must not be empty",
        ":9:3: register: missing required key 'service'",
        ":9:22: register.etcd.endpoints: must list at least one etcd URL",
    ],
    "failure_rate_window": [
        ":5:31: services.orders.circuit_breaker.failure_rate.window: must be > 0, got 0s",
        ":5:46: services.orders.circuit_breaker.failure_rate.min_calls: must be >= 1, got 0",
        ":6:30: services.orders.circuit_breaker.slow_call.duration: must be > 0, got -1s",
        ":7:26: services.orders.circuit_breaker.probe.interval: must be > 0, got 0ms",
    ],
    "fallback_body_mapping": [
        ":9:13: routes[0].fallback.body: expected a string, got a mapping (quote a JSON body: body: '{\"items\": []}')",
    ],
    "fault_abort_without_status": [
        ":8:14: routes[0].fault.abort: needs 'status' (the answer to HTTP requests) or 'grpc_status' (to gRPC requests), or both",
    ],
    "file_not_regular": [
        ":4:21: services.orders.discovery.file.path: must be a regular file, got a character device: /dev/zero",
    ],
    "grpc_health_check_http1": [
        ":4:27: services.greeter.health_check.grpc: grpc: true needs protocol: h2c (service 'greeter' uses http1, which cannot carry gRPC)",
    ],
    "grpc_status_out_of_range": [
        ":5:50: services.greeter.circuit_breaker.failure_grpc_status[1]: must be a gRPC status between 0 and 16, got 17",
        ":5:54: services.greeter.circuit_breaker.failure_grpc_status[2]: expected a gRPC status (0..16), got 'UNAVAILABLE'",
        ":9:48: routes[0].fault.abort.grpc_status: must be a gRPC status between 0 and 16, got -1",
    ],
    "hardening_keys": [
        ":1:30: listen_path_escaped_slashes: must be one of reject, keep, got 'decode'",
        ":2:31: admin_hosts[1]: 'bad host' is not a valid DNS name",
        ":2:43: admin_hosts[2]: must be a host name without port, got 'sidecar.local:15000'",
        ":2:66: admin_hosts[3]: must not be empty",
        ":4:27: http2.max_concurrent_streams: must be between 1 and 1000, got 1001",
        ":5:25: http2.max_header_list_size: must be between 1 and 2147483647, got 0",
        ":6:18: http2.stream_window: must be between 1 and 2147483647, got 2147483648",
        ":7:22: http2.connection_window: must be between 65535 and 2147483647, got 1024",
    ],
    "ipv6_without_brackets": [
        ":3:17: services.orders.endpoints[0]: IPv6 addresses need brackets, e.g. '[::1]:8080', got '::1:8080'",
    ],
    "listen_equals_admin": [
        ":1:9: listen: must differ from admin (127.0.0.1:15000)",
    ],
    "many_errors": [
        ":1:9: listen: expected an address 'host:port', got 'localhost' (missing port)",
        ":2:16: drain_timeout: must be > 0, got -5s",
        ":6:20: services.orders.load_balancer: must be one of round_robin, least_request, random, got 'round-robin' (did you mean 'round_robin'?)",
        ":7:22: services.orders.connect_timeout: expected a duration like '250ms' or '2s', got '1.5x'",
        ":11:14: routes[0].timeout: expected a duration like '250ms' or '2s', got '2 hours'",
        ":13:20: routes[0].retries.max_retries: expected an integer, got 1.5",
        ":14:24: routes[0].retries.budget.ratio: must be >= 0, got -0.1",
        ":15:23: routes[0].retries.non_idempotent: expected true or false, got 'yes'",
        ":17:25: routes[0].fault.delay.percent: must be between 0 and 100, got 150",
    ],
    "max_reset_below_reset": [
        ":6:43: services.orders.circuit_breaker.max_reset_timeout: max_reset_timeout (10s) must not be shorter than reset_timeout (30s)",
    ],
    "missing_keys": [
        ":5:5: routes[0]: missing required key 'service'",
        ":7:5: routes[1]: missing required key 'match'",
    ],
    "negative_number": [
        ":8:20: routes[0].retries.max_retries: must be >= 0, got -1",
    ],
    "no_discovery": [
        ":3:5: services.orders: missing 'endpoints' or 'discovery' (where to find this service)",
    ],
    "not_mapping": [
        ":1:1: the top level must be a mapping of settings (listen, services, routes, ...), got a list",
    ],
    "prefix_and_path": [
        ":5:26: routes[0].match: give either 'prefix' or 'path', not both",
        ":7:12: routes[1].match: needs 'prefix' (matches the path and below) or 'path' (exact)",
    ],
    "prefix_without_slash": [
        ":5:22: routes[0].match.prefix: must start with '/', got 'orders'",
    ],
    "python_tag": [
        ":3:16: services.orders.endpoints: the YAML tag '!!python/object/apply:os.system' is not allowed (only plain mappings, lists, strings, numbers, booleans and null)",
    ],
    "rate_bare_number": [
        ":5:34: services.orders.circuit_breaker.failure_rate.threshold: must be a share: '50%' or 0.5, got 50 (did you mean '50%'?)",
        ":6:26: services.orders.circuit_breaker.slow_call.rate: must be a share: '50%' or 0.5, got 80 (did you mean '80%'?)",
    ],
    "rate_out_of_range": [
        ":5:34: services.orders.circuit_breaker.failure_rate.threshold: must be a share above 0% and at most 100%, got '150%'",
        ":6:26: services.orders.circuit_breaker.slow_call.rate: must be a share above 0 and at most 1 ('50%' or 0.5), got 0",
        ":10:34: services.users.circuit_breaker.failure_rate.threshold: expected a share like '50%' or 0.5, got 'half'",
        ":11:26: services.users.circuit_breaker.slow_call.rate: must be a share above 0% and at most 100%, got '0%'",
    ],
    "recursive_alias": [
        ":4:11: alias '*s' refers to a collection that contains it (recursive aliases are not allowed)",
    ],
    "status_out_of_range": [
        ":5:29: services.orders.circuit_breaker.failure_status[1]: must be an HTTP status between 100 and 599, got 600",
        ":10:36: routes[0].fault.abort.status: must be an HTTP status between 200 and 599, got 99",
    ],
    "switch_wrong_type": [
        ":4:24: services.orders.outlier_detection: expected a mapping, true or false, got 5",
        ":6:21: services.orders.circuit_breaker.failure_rate: expected a mapping, true or false, got a list",
        ":7:14: services.orders.circuit_breaker.probe: expected a mapping, true or false, got '500ms'",
    ],
    "two_discovery_sources": [
        ":5:7: services.orders.discovery: only one discovery source is allowed, got 'static' and 'dns'",
    ],
    "typo_suggestion": [
        ":9:7: routes[0].retries.per_try_timout: unknown key (did you mean 'per_try_timeout'?)",
    ],
    "unknown_key": [
        ":7:5: routes[0].colour: unknown key (valid keys: name, match, service, rewrite_prefix, timeout, retries, fallback, fault)",
    ],
    "unknown_service": [
        ":6:14: routes[0].service: unknown service 'ordres' (did you mean 'orders'?)",
    ],
    "unset_env": [
        ":3:17: services.orders.endpoints[0]: environment variable 'ORDERS_ADDR' is not set (write ${ORDERS_ADDR:-default} to give a default)",
    ],
    "wrong_type": [
        ":8:20: routes[0].retries.max_retries: expected an integer, got 'three'",
    ],
    "yaml_syntax": [
        ":4:1: invalid YAML: did not find expected ',' or ']' (while parsing a flow sequence at line 3)",
    ],
    "zero_duration": [
        ":7:14: routes[0].timeout: must be > 0, got 0s",
    ],
}


def problems(path: Path | str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return [str(p) for p in info.value.problems]


def test_every_invalid_file_has_expectations() -> None:
    assert sorted(p.stem for p in INVALID.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_file_gives_exact_messages(name: str) -> None:
    path = INVALID / f"{name}.yaml"
    assert problems(path) == [f"{path}{line}" for line in EXPECTED[name]]


def test_file_name_is_printed_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(INVALID)
    assert problems("zero_duration.yaml") == [
        "zero_duration.yaml:7:14: routes[0].timeout: must be > 0, got 0s"
    ]


def test_config_error_message_holds_the_errors_only(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "admin: 0.0.0.0:15000\n"
        "services: { a: { endpoints: ['127.0.0.1:1'] } }\n"
        "routes: [{ match: { prefix: / }, service: b }]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert str(err) == f"{path}:3:43: routes[0].service: unknown service 'b' (defined: a)"
    assert [str(p) for p in err.errors] == [str(err)]
    assert [p.warning for p in err.problems] == [True, False]  # sorted by position


def test_missing_file() -> None:
    path = INVALID / "does-not-exist.yaml"
    assert problems(path) == [f"{path}: cannot read the config file: No such file or directory"]


def test_unreadable_file_a_directory() -> None:
    # Tests run as root, where chmod 000 does not stop reads; a directory cannot be read.
    assert problems(INVALID) == [f"{INVALID}: cannot read the config file: Is a directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("listen: caf\u00e9\n".encode("latin-1"))
    assert problems(path) == [f"{path}: the config file is not UTF-8 text (byte 0xe9 at offset 11)"]


def test_too_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# padding\n" * (MAX_BYTES // 10 + 1))
    assert problems(path) == [
        f"{path}: the config file is larger than the limit of {MAX_BYTES} bytes"
    ]


def test_too_many_values_without_aliases(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text("x-list:\n" + "- 1\n" * (MAX_NODES + 10))
    assert problems(path) == [f"{path}:99999:3: the document has more than {MAX_NODES} values"]


def test_deep_block_nesting(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("".join(f"{'  ' * i}k{i}:\n" for i in range(200)))
    assert problems(path) == [f"{path}:64:127: nesting is deeper than {MAX_DEPTH} levels"]


def test_very_deep_flow_nesting_stops_early() -> None:
    # A million brackets: refused at depth MAX_DEPTH, long before the parser gets far.
    text = "a: " + "[" * 1_000_000
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.problems] == [
        f"<config>:1:{4 + MAX_DEPTH - 1}: nesting is deeper than {MAX_DEPTH} levels"
    ]


def test_alias_bomb_in_mapping_values_and_merge_keys() -> None:
    lines = ["a0: &a0 {k: v}"]
    for i in range(1, 12):
        refs = ", ".join(f"k{j}: *a{i - 1}" for j in range(10))
        lines.append(f"a{i}: &a{i} {{{refs}}}")
    lines.append("x: { <<: *a11 }")
    with pytest.raises(ConfigError) as info:
        load_config_text("\n".join(lines), env={})
    (problem,) = info.value.problems
    assert "expands to more than" in problem.message


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object:os.system",
        "!!python/name:os.system",
        "!!python/object/new:subprocess.Popen",
        "!!binary",
        "!custom",
        "!!set",
    ],
)
def test_no_tag_is_constructed(tag: str) -> None:
    text = f"listen: {tag} {{}}\n" if tag in ("!!set",) else f"listen: {tag} x\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    (problem,) = info.value.problems
    assert str(problem) == (
        f"<config>:1:9: listen: the YAML tag '{tag}' is not allowed (only plain mappings, "
        "lists, strings, numbers, booleans and null)"
    )


def test_several_documents_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("listen: 127.0.0.1:1\n---\nadmin: 127.0.0.1:2\n", env={})
    assert [str(p) for p in info.value.problems] == [
        "<config>:2:1: invalid YAML: expected a single document in the stream, "
        "but found another document"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "just a string\n",
            "<config>:1:1: the top level must be a mapping of settings "
            "(listen, services, routes, ...), got 'just a string'",
        ),
        ("", "<config>: the config file is empty; expected a mapping with 'services' and 'routes'"),
        (
            "~\n",
            "<config>:1:1: the top level must be a mapping of settings "
            "(listen, services, routes, ...), got '~'",
        ),
    ],
)
def test_top_level_must_be_a_mapping(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.problems] == [message]


BASE = "services: {orders: {endpoints: ['127.0.0.1:8080']}}\nroutes:\n"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("timeout: 0", "routes[0].timeout: must be > 0, got 0"),
        ("timeout: -1s", "routes[0].timeout: must be > 0, got -1s"),
        ("timeout: 25h", "routes[0].timeout: must be at most 24h, got 25h"),
        ("timeout: .inf", "routes[0].timeout: expected a duration like '250ms' or '2s', got .inf"),
        ("timeout: true", "routes[0].timeout: expected a duration like '250ms' or '2s', got true"),
        (
            "timeout: [1s]",
            "routes[0].timeout: expected a duration like '250ms' or '2s', got a list",
        ),
        ("timeout: 2 s", "routes[0].timeout: expected a duration like '250ms' or '2s', got '2 s'"),
        (
            "retries: {per_try_timeout: 0ms}",
            "routes[0].retries.per_try_timeout: must be > 0, got 0ms",
        ),
        ("retries: {backoff: {base: 0s}}", "routes[0].retries.backoff.base: must be > 0, got 0s"),
        (
            "retries: {max_retries: true}",
            "routes[0].retries.max_retries: expected an integer, got true",
        ),
        ("retries: {max_body_bytes: -1}", "routes[0].retries.max_body_bytes: must be >= 0, got -1"),
        (
            "retries: {budget: {min_per_second: -1}}",
            "routes[0].retries.budget.min_per_second: must be >= 0, got -1",
        ),
        (
            "retries: {retry_on: [99]}",
            "routes[0].retries.retry_on[0]: must be an HTTP status between 100 and 599, got 99",
        ),
        (
            "retries: {retry_on: [{a: b}]}",
            "routes[0].retries.retry_on[0]: expected a retry condition or an HTTP status, got a mapping",
        ),
        ("retries: {retry_on: 503}", "routes[0].retries.retry_on: expected a list, got 503"),
        ("retries: 3", "routes[0].retries: expected a mapping, got 3"),
        (
            "fallback: {status: 600}",
            "routes[0].fallback.status: must be an HTTP status between 200 and 599, got 600",
        ),
        (
            "fallback: {headers: {x-a: {b: c}}}",
            "routes[0].fallback.headers.x-a: expected a string, got a mapping",
        ),
        ("fault: {}", "routes[0].fault: needs 'delay' or 'abort' (or leave 'fault' out)"),
        ("fault: {delay: {percent: 5}}", "routes[0].fault.delay: missing required key 'duration'"),
        (
            "fault: {abort: {percent: -1, status: 503}}",
            "routes[0].fault.abort.percent: must be between 0 and 100, got -1",
        ),
        ("rewrite_prefix: api", "routes[0].rewrite_prefix: must start with '/', got 'api'"),
        ("name: ''", "routes[0].name: must not be empty"),
    ],
)
def test_route_value_errors(route: str, message: str) -> None:
    text = BASE + f"  - {{match: {{prefix: /}}, service: orders, {route}}}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{path: orders}", "routes[0].match.path: must start with '/', got 'orders'"),
        (
            "{prefix: '/a?b=1'}",
            "routes[0].match.prefix: must be a path without query or fragment, got '/a?b=1'",
        ),
        (
            "{prefix: /a, methods: []}",
            "routes[0].match.methods: must not be empty (leave 'methods' out to match every method)",
        ),
        (
            "{prefix: /a, headers: {x-a: 1, X-A: 2}}",
            "routes[0].match.headers: header 'x-a' is given twice",
        ),
        (
            "{prefix: /a, host: 'bad host'}",
            "routes[0].match.host: 'bad host' is not a valid host name",
        ),
        ("{prefix: /a, hots: x}", "routes[0].match.hots: unknown key (did you mean 'host'?)"),
        ("/a", "routes[0].match: expected a mapping, got '/a'"),
    ],
)
def test_match_errors(match: str, message: str) -> None:
    text = BASE + f"  - {{match: {match}, service: orders}}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ("{endpoints: '127.0.0.1:1'}", "services.s.endpoints: expected a list, got '127.0.0.1:1'"),
        (
            "{endpoints: ['[::1]']}",
            "services.s.endpoints[0]: expected an address '[IPv6]:port', got '[::1]' (missing port)",
        ),
        (
            "{endpoints: ['[nope]:80']}",
            "services.s.endpoints[0]: '[nope]:80' is not a valid '[IPv6]:port' address",
        ),
        (
            "{endpoints: ['bad_host!:80']}",
            "services.s.endpoints[0]: 'bad_host!' is not a valid host name or IP address",
        ),
        (
            "{endpoints: ['300.1.1.1:80']}",
            "services.s.endpoints[0]: '300.1.1.1' is not a valid host name or IP address",
        ),
        (
            "{endpoints: ['h:http']}",
            "services.s.endpoints[0]: port must be a number between 1 and 65535, got 'http'",
        ),
        (
            "{endpoints: [':80']}",
            "services.s.endpoints[0]: expected an address 'host:port', got ':80' (missing host)",
        ),
        (
            "{endpoints: [8080]}",
            "services.s.endpoints[0]: expected an address 'host:port', got 8080",
        ),
        (
            "{discovery: {}}",
            "services.s.discovery: needs exactly one source: static, dns, file or etcd",
        ),
        (
            "{discovery: {consul: {}, static: ['127.0.0.1:1']}}",
            "services.s.discovery.consul: unknown key (valid keys: static, dns, file, etcd)",
        ),
        ("{discovery: {file: {path: ''}}}", "services.s.discovery.file.path: must not be empty"),
        (
            "{discovery: {dns: {name: 'a b', port: 1}}}",
            "services.s.discovery.dns.name: 'a b' is not a valid DNS name",
        ),
        (
            "{discovery: {dns: {name: a, port: 1, record: MX}}}",
            "services.s.discovery.dns.record: must be one of A, AAAA, SRV, got 'MX'",
        ),
        (
            "{discovery: {dns: {name: a, port: 1, refresh: 0s}}}",
            "services.s.discovery.dns.refresh: must be > 0, got 0s",
        ),
        (
            "{discovery: {etcd: {endpoints: ['ftp://127.0.0.1:2379'], prefix: /s/}}}",
            "services.s.discovery.etcd.endpoints[0]: expected an etcd URL like 'http://127.0.0.1:2379', got 'ftp://127.0.0.1:2379'",
        ),
        (
            "{discovery: {etcd: {endpoints: ['http://127.0.0.1:99999'], prefix: /s/}}}",
            "services.s.discovery.etcd.endpoints[0]: expected an etcd URL like 'http://127.0.0.1:2379', got 'http://127.0.0.1:99999'",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], load_balancer: hash}",
            "services.s.load_balancer: must be one of round_robin, least_request, random, got 'hash'",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], max_requests: 0}",
            "services.s.max_requests: must be >= 1, got 0",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], health_check: {path: healthz}}",
            "services.s.health_check.path: must start with '/', got 'healthz'",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], health_check: {healthy_threshold: 0}}",
            "services.s.health_check.healthy_threshold: must be >= 1, got 0",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], outlier_detection: {max_ejection_percent: 101}}",
            "services.s.outlier_detection.max_ejection_percent: must be between 0 and 100, got 101",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], circuit_breaker: {failure_threshold: 0}}",
            "services.s.circuit_breaker.failure_threshold: must be >= 1, got 0",
        ),
        (
            "{endpoints: ['127.0.0.1:1'], circuit_breaker: {failure_status: ['5xx']}}",
            "services.s.circuit_breaker.failure_status[0]: expected an HTTP status, got '5xx'",
        ),
        ("{endpoints: ['127.0.0.1:1'], circuit_breaker: {reset_timeout: 30}}", None),
        ("[]", "services.s: expected a mapping, got a list"),
        ("", "services.s: expected a mapping, got null"),
    ],
)
def test_service_errors(service: str, message: str | None) -> None:
    text = f"services:\n  s: {service}\nroutes: [{{match: {{prefix: /}}, service: s}}]\n"
    if message is None:
        load_config_text(text, env={})
        return
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


def test_bad_service_name() -> None:
    text = "services:\n  'a b': {endpoints: ['127.0.0.1:1']}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.errors] == [
        "<config>:2:3: services: 'a b' is not a valid service name (use letters, digits, "
        "'.', '_' and '-', starting with a letter or digit)"
    ]


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (
            "{etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /s/}, service: p}",
            "register: missing required key 'address'",
        ),
        (
            "{etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /s/}, service: p, address: 127.0.0.1:1, ttl: 0s}",
            "register.ttl: must be > 0, got 0s",
        ),
        (
            "{etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /s/}, service: p, address: 127.0.0.1:1, health_check: {interval: fast}}",
            "register.health_check.interval: expected a duration like '250ms' or '2s', got 'fast'",
        ),
        (
            "{etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /s/}, service: 'p q', address: 127.0.0.1:1}",
            "register.service: 'p q' is not a valid name (use letters, digits, '.', '_' and '-', starting with a letter or digit)",
        ),
        ("yes", "register: expected a mapping, got yes"),
    ],
)
def test_register_errors(register: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(
            BASE + f"  - {{match: {{prefix: /}}, service: orders}}\nregister: {register}\n", env={}
        )
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


def test_explicit_tag_with_bad_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("drain_timeout: !!int abc\n", env={})
    assert [str(p) for p in info.value.errors] == [
        "<config>:1:16: drain_timeout: 'abc' is not a valid !!int"
    ]


def test_defaults_error_is_reported_once_where_written() -> None:
    text = (
        "defaults:\n"
        "  retries: {backoff: {base: 1s, max: 10ms}}\n"
        + BASE
        + "  - {match: {prefix: /a}, service: orders}\n"
        + "  - {match: {prefix: /b}, service: orders}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.problems] == [
        "<config>:2:29: defaults.retries.backoff.base: base (1s) must not be larger than max (10ms)"
    ]


def test_merged_default_conflicting_with_route_value_is_reported_at_the_route() -> None:
    text = (
        "defaults:\n"
        "  retries: {backoff: {max: 100ms}}\n"
        + BASE
        + "  - {match: {prefix: /a}, service: orders, retries: {backoff: {base: 1s}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.problems] == [
        "<config>:5:70: routes[0].retries.backoff.base: base (1s) must not be larger than "
        "max (100ms)"
    ]


def test_route_service_must_be_a_string() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + "  - {match: {prefix: /}, service: 7}\n", env={})
    assert [str(p) for p in info.value.problems] == [
        "<config>:3:35: routes[0].service: expected a string, got 7"
    ]


def test_too_large_text_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("#" * (MAX_BYTES + 1), env={})
    assert [str(p) for p in info.value.problems] == [
        f"<config>: the config is larger than the limit of {MAX_BYTES} characters"
    ]


def test_undefined_alias() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("listen: *nowhere\n", env={})
    assert [str(p) for p in info.value.problems] == [
        "<config>:1:9: invalid YAML: found undefined alias 'nowhere'"
    ]


# -- discovery files that are not regular files -----------------------------------------


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.mkdir(), "a directory"),
        (os.mkfifo, "a named pipe (FIFO)"),
    ],
    ids=["directory", "fifo"],
)
def test_discovery_file_must_be_a_regular_file(
    tmp_path: Path, make: Callable[[Path], None], what: str
) -> None:
    target = tmp_path / "endpoints"
    make(target)
    config = tmp_path / "c.yaml"
    config.write_text(
        "services:\n  orders:\n    discovery: {file: {path: endpoints}}\n"
        "routes: [{match: {prefix: /}, service: orders}]\n"
    )
    assert problems(config) == [
        f"{config}:3:30: services.orders.discovery.file.path: must be a regular file, got {what}: {target}"
    ]


def test_discovery_file_through_a_symlink_to_a_regular_file_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text("- 127.0.0.1:1\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    text = "services: {o: {discovery: {file: {path: link.yaml}}}}\nroutes: [{match: {prefix: /}, service: o}]\n"
    config = tmp_path / "c.yaml"
    config.write_text(text)
    load_config(config, env={})


# -- every key of the schema is read --------------------------------------------------------


def _base() -> dict[str, Any]:
    return {
        "services": {"s": {"endpoints": ["127.0.0.1:1"]}},
        "routes": [{"match": {"prefix": "/"}, "service": "s"}],
    }


def _container(doc: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """The mapping at schema path `where` in a valid document (created), and its real path."""
    if where == "":
        return doc, ""
    if where == "defaults":
        return doc.setdefault("defaults", {}), "defaults"
    service = doc["services"]["s"]
    route = doc["routes"][0]
    starts: dict[str, tuple[dict[str, Any], str]] = {
        "services.*": (service, "services.s"),
        "routes[*]": (route, "routes[0]"),
        "register": (
            doc.setdefault(
                "register",
                {
                    "etcd": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/r/"},
                    "service": "p",
                    "address": "127.0.0.1:2",
                },
            ),
            "register",
        ),
        "http2": (doc.setdefault("http2", {}), "http2"),
    }
    head = next(k for k in starts if where == k or where.startswith(k + "."))
    node, real = starts[head]
    rest = where[len(head) :].lstrip(".")
    seeds: dict[str, dict[str, Any]] = {
        "dns": {"name": "a.example", "port": 53},
        "file": {"path": "/dev/null"},
        "etcd": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/s/"},
        "delay": {"percent": 1, "duration": "1s"},
        "abort": {"percent": 1, "status": 503},
    }
    for part in rest.split(".") if rest else []:
        if part == "discovery":
            node.pop("endpoints", None)
        if part == "fault" and not node.get("fault"):
            node["fault"] = {"delay": {"percent": 0, "duration": "1s"}}
        child = node.setdefault(part, dict(seeds.get(part, {})))
        if part in ("dns", "file", "etcd"):
            for other in [k for k in node if k != part]:
                node.pop(other)
        node, real = child, f"{real}.{part}"
    return node, real


CASES = [(where, key) for where, keys in SCHEMA.items() for key in keys]


@pytest.mark.parametrize(("where", "key"), CASES, ids=[f"{w}.{k}" for w, k in CASES])
def test_every_schema_key_is_read_and_checked(where: str, key: str) -> None:
    """A key the builder forgot would be accepted silently: give each one a value of a
    type no key takes (a list of lists of lists) and expect an error at that key."""
    doc = _base()
    node, real = _container(doc, where)
    if key in ("prefix", "path"):
        node.pop("prefix", None)
    if where.endswith(".discovery"):
        node.clear()
    if key == "discovery":
        node.pop("endpoints")
    node[key] = [[[]]]
    with pytest.raises(ConfigError) as info:
        load_config_text(yaml.safe_dump(doc), env={})
    target = f"{real}.{key}" if real else key
    paths = [p.path for p in info.value.errors]
    assert any(p == target or p.startswith((target + ".", target + "[")) for p in paths), paths


# -- value errors of the keys for resilience, gRPC and hardening --------------------------


@pytest.mark.parametrize(
    ("service", "message"),
    [
        (
            "circuit_breaker: {failure_rate: {threshold: 0.5, min_calls: 1.5}}",
            "services.s.circuit_breaker.failure_rate.min_calls: expected an integer, got 1.5",
        ),
        (
            "circuit_breaker: {failure_rate: {threshold: true}}",
            "services.s.circuit_breaker.failure_rate.threshold: expected a share like '50%' or 0.5, got true",
        ),
        (
            "circuit_breaker: {failure_rate: {threshold: 100.5}}",
            "services.s.circuit_breaker.failure_rate.threshold: must be a share above 0 and at most 1 ('50%' or 0.5), got 100.5",
        ),
        (
            "circuit_breaker: {failure_rate: {threshold: -0.5}}",
            "services.s.circuit_breaker.failure_rate.threshold: must be a share above 0 and at most 1 ('50%' or 0.5), got -0.5",
        ),
        (
            "circuit_breaker: {failure_rate: {window: 25h}}",
            "services.s.circuit_breaker.failure_rate.window: must be at most 24h, got 25h",
        ),
        (
            "circuit_breaker: {failure_rate: {windw: 1s}}",
            "services.s.circuit_breaker.failure_rate.windw: unknown key (did you mean 'window'?)",
        ),
        (
            "circuit_breaker: {slow_call: {duration: fast}}",
            "services.s.circuit_breaker.slow_call.duration: expected a duration like '250ms' or '2s', got 'fast'",
        ),
        (
            "circuit_breaker: {max_reset_timeout: 1s}",
            "services.s.circuit_breaker.max_reset_timeout: max_reset_timeout (1s) must not be shorter than reset_timeout (5s)",
        ),
        (
            "circuit_breaker: {failure_grpc_status: 14}",
            "services.s.circuit_breaker.failure_grpc_status: expected a list, got 14",
        ),
        (
            "outlier_detection: {consecutive_failures: 0}",
            "services.s.outlier_detection.consecutive_failures: must be >= 1, got 0",
        ),
        (
            "health_check: {grpc: yes please}",
            "services.s.health_check.grpc: expected true or false, got 'yes please'",
        ),
        (
            "protocol: HTTP1",
            "services.s.protocol: must be one of http1, h2c, got 'HTTP1' (did you mean 'http1'?)",
        ),
        (
            "idle_timeout: [1s]",
            "services.s.idle_timeout: expected a duration like '250ms' or '2s', got a list",
        ),
        # valid: accepted as they are
        ("circuit_breaker: {failure_rate: {threshold: 100%}, slow_call: {rate: 1}}", None),
        ("circuit_breaker: {failure_rate: {threshold: ' 12.5 %'}}", None),
        ("circuit_breaker: {reset_timeout: 90s}", None),  # the cap follows: max(60s, 90s)
        ("circuit_breaker: {reset_timeout: 2s, max_reset_timeout: 2s}", None),
        ("protocol: h2c\n    health_check: {grpc: true}", None),
    ],
)
def test_new_service_key_errors(service: str, message: str | None) -> None:
    text = (
        "services:\n  s:\n    endpoints: ['127.0.0.1:1']\n    "
        + service
        + "\nroutes: [{match: {prefix: /}, service: s}]\n"
    )
    if message is None:
        load_config_text(text, env={})
        return
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "fault: {abort: {percent: 5, status: null}}",
            "routes[0].fault.abort: needs 'status' (the answer to HTTP requests) or 'grpc_status' (to gRPC requests), or both",
        ),
        (
            "fault: {abort: {status: 503}}",
            "routes[0].fault.abort: missing required key 'percent'",
        ),
        (
            "fault: {abort: {percent: 5, grpc_status: '14'}}",
            "routes[0].fault.abort.grpc_status: expected a gRPC status (0..16), got '14'",
        ),
        (
            "retries: {retry_on: [Unavailable]}",
            "routes[0].retries.retry_on[0]: unknown retry condition 'Unavailable' (did you mean 'unavailable'?)",
        ),
        ("fault: {abort: {percent: 5, grpc_status: 8}}", None),
        ("retries: {retry_on: [unavailable, cancelled, 503]}", None),
    ],
)
def test_new_route_key_errors(route: str, message: str | None) -> None:
    text = BASE + f"  - {{match: {{prefix: /}}, service: orders, {route}}}\n"
    if message is None:
        load_config_text(text, env={})
        return
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ("admin_hosts: admin.internal", "admin_hosts: expected a list, got 'admin.internal'"),
        ("admin_hosts: [[a]]", "admin_hosts[0]: expected a string, got a list"),
        (
            "admin_hosts: ['-bad-.example']",
            "admin_hosts[0]: '-bad-.example' is not a valid DNS name",
        ),
        (
            "http2: {max_concurrent_streams: 0}",
            "http2.max_concurrent_streams: must be between 1 and 1000, got 0",
        ),
        (
            "http2: {limits: 1}",
            "http2.limits: unknown key (valid keys: max_concurrent_streams, max_header_list_size, stream_window, connection_window)",
        ),
        (
            "listen_path_escaped_slashes: true",
            "listen_path_escaped_slashes: expected one of reject, keep, got true",
        ),
        ("http2: {connection_window: 65535, stream_window: 2147483647}", None),
    ],
)
def test_new_top_level_key_errors(top: str, message: str | None) -> None:
    text = top + "\n" + BASE + "  - {match: {prefix: /}, service: orders}\n"
    if message is None:
        load_config_text(text, env={})
        return
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [p.path + ": " + p.message for p in info.value.errors] == [message]


# -- long and hostile keys and values stay on one bounded line ----------------------------


def test_a_huge_key_is_named_cut_and_counted() -> None:
    key = "k" * (1 << 20)
    # An explicit key (`? key`): YAML allows implicit keys of at most 1024 characters.
    text = BASE + "  - match: {prefix: /}\n    service: orders\n    ? " + key + "\n    : 1\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    (line,) = [str(p) for p in info.value.errors]
    assert line == (
        f"<config>:5:7: routes[0].{'k' * 80}...(1048576 characters): unknown key "
        "(valid keys: name, match, service, rewrite_prefix, timeout, retries, fallback, fault)"
    )


def test_a_huge_value_is_quoted_cut_and_counted() -> None:
    value = "v" * (3 << 20)
    text = BASE + "  - {match: {prefix: /}, service: orders, timeout: " + value + "}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert [str(p) for p in info.value.errors] == [
        f"<config>:3:52: routes[0].timeout: expected a duration like '250ms' or '2s', got '{'v' * 80}...' (3145728 characters)"
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"a\\nb"', "'a\\nb'"),
        ('"tab\\there"', "'tab\\there'"),
        ('"nul\\0x"', "'nul\\x00x'"),
        ('"esc\\e[31mred"', "'esc\\x1b[31mred'"),
        ('"line\\Lsep"', "'line\\u2028sep'"),
        ('"rtl\\u202eoverride"', "'rtl\\u202eoverride'"),
    ],
    ids=["newline", "tab", "nul", "escape", "line-separator", "bidi"],
)
def test_control_characters_in_values_are_escaped(value: str, shown: str) -> None:
    text = BASE + f"  - {{match: {{prefix: /}}, service: orders, timeout: {value}}}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    (line,) = [str(p) for p in info.value.errors]
    assert line == (
        f"<config>:3:52: routes[0].timeout: expected a duration like '250ms' or '2s', got {shown}"
    )


def test_control_characters_in_keys_are_escaped() -> None:
    text = BASE + '  - {match: {prefix: /}, service: orders, "bad\\nkey": 1}\n'
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    (problem,) = info.value.errors
    assert str(problem).startswith("<config>:3:43: routes[0].bad\\nkey: unknown key (")


def test_huge_values_in_every_kind_of_message_stay_bounded() -> None:
    big = "x" * 100_000
    doc = {
        "listen": big,
        "services": {
            big: {"endpoints": [f"{big}:80", "h:" + "9" * 100_000]},
            "ok": {"endpoints": ["127.0.0.1:1"], "load_balancer": big, big + "k": 1},
        },
        "routes": [
            {
                "name": big,
                "match": {"prefix": f"/{big}?", "methods": [f"{big} x"], "host": f"{big}:1"},
                "service": big + "y",
            },
            {
                "name": big,
                "match": {"prefix": "/", "headers": {big + " ": "v"}},
                "service": "ok",
                "retries": {"retry_on": [big]},
            },
        ],
        "register": {
            "etcd": {"endpoints": [f"http://u:{big}@h:99999"], "prefix": "/r/"},
            "service": big,
            "address": "1" * 100_000,
        },
        "drain_timeout": "${" + "N" * 100_000 + "}",
    }
    text = yaml.safe_dump(doc, width=float("inf"))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    lines = [str(p) for p in info.value.problems]
    assert len(lines) >= 12, lines
    for line in lines:
        assert "\n" not in line and len(line) < 600, line[:300]
        assert "x" * 81 not in line and "9" * 81 not in line and "N" * 81 not in line, line
        assert "characters)" in line or "u:***@h:99999" in line, line
