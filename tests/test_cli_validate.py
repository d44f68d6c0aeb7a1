# ruff: noqa: E501  -- expected messages stay on one line each, as the user sees them
"""`python -m sidecar validate`: OK and exit 0, or one line per problem on
stderr and exit 1; warnings start with `warning:` and do not fail the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"


def validate(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=os.environ | (env or {}),
        check=False,
    )


def test_valid_file_prints_ok() -> None:
    result = validate("-c", str(DATA / "valid" / "full.yaml"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_reference_config_is_valid() -> None:
    result = validate("-c", "config/reference.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_invalid_file_prints_each_problem_and_exits_1() -> None:
    path = "tests/data/invalid/many_errors.yaml"
    result = validate("-c", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:1:9: listen: expected an address 'host:port', got 'localhost' (missing port)",
        f"{path}:2:16: drain_timeout: must be > 0, got -5s",
        f"{path}:6:20: services.orders.load_balancer: must be one of round_robin, least_request, random, got 'round-robin' (did you mean 'round_robin'?)",
        f"{path}:7:22: services.orders.connect_timeout: expected a duration like '250ms' or '2s', got '1.5x'",
        f"{path}:11:14: routes[0].timeout: expected a duration like '250ms' or '2s', got '2 hours'",
        f"{path}:13:20: routes[0].retries.max_retries: expected an integer, got 1.5",
        f"{path}:14:24: routes[0].retries.budget.ratio: must be >= 0, got -0.1",
        f"{path}:15:23: routes[0].retries.non_idempotent: expected true or false, got 'yes'",
        f"{path}:17:25: routes[0].fault.delay.percent: must be between 0 and 100, got 150",
    ]


def test_typo_gets_a_suggestion() -> None:
    path = "tests/data/invalid/typo_suggestion.yaml"
    result = validate("-c", path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:9:7: routes[0].retries.per_try_timout: unknown key (did you mean 'per_try_timeout'?)"
    ]


def test_warnings_go_to_stderr_and_still_exit_0(tmp_path: Path) -> None:
    path = tmp_path / "warn.yaml"
    path.write_text(
        "admin: 0.0.0.0:15000\n"
        "services:\n"
        "  orders:\n"
        "    endpoints: ['127.0.0.1:8080']\n"
        "routes:\n"
        "  - match: {prefix: /}\n"
        "    service: orders\n"
        "    retries: {non_idempotent: true}\n"
    )
    result = validate("-c", str(path))
    assert (result.returncode, result.stdout) == (0, "OK\n")
    assert result.stderr.splitlines() == [
        f"warning: {path}:1:8: admin: the admin API (metrics, config, reload) on 0.0.0.0:15000 is reachable from other hosts; keep it on 127.0.0.1 or [::1]",
        f"warning: {path}:8:31: routes[0].retries.non_idempotent: non_idempotent: true retries POST and PATCH too; the upstream may apply such a request twice",
    ]


def test_errors_come_before_warnings(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("admin: 0.0.0.0:15000\ndrain_timeout: 0s\n")
    result = validate("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:2:16: drain_timeout: must be > 0, got 0s",
        f"warning: {path}:1:8: admin: the admin API (metrics, config, reload) on 0.0.0.0:15000 is reachable from other hosts; keep it on 127.0.0.1 or [::1]",
    ]


def test_hostile_files_give_one_normal_line() -> None:
    for name, line in [
        (
            "python_tag",
            ":3:16: services.orders.endpoints: the YAML tag '!!python/object/apply:os.system' is not allowed (only plain mappings, lists, strings, numbers, booleans and null)",
        ),
        (
            "alias_bomb",
            ":6:8: the document expands to more than 100000 values (aliases repeat their whole anchor; is this an alias bomb?)",
        ),
        ("deep_nesting", ":1:72: nesting is deeper than 64 levels"),
    ]:
        path = f"tests/data/invalid/{name}.yaml"
        result = validate("-c", path)
        assert (result.returncode, result.stderr) == (1, f"{path}{line}\n")


def test_missing_file() -> None:
    result = validate("-c", "no/such/file.yaml")
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        result.stderr
        == "no/such/file.yaml: cannot read the config file: No such file or directory\n"
    )


def test_config_path_from_environment() -> None:
    result = validate(env={"SIDECAR_CONFIG": str(DATA / "valid" / "minimal.yaml")})
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_default_config_path(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sidecar.yaml").write_text((DATA / "valid" / "minimal.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_new_key_mistakes_print_one_line_each() -> None:
    path = "tests/data/invalid/rate_bare_number.yaml"
    result = validate("-c", path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}:5:34: services.orders.circuit_breaker.failure_rate.threshold: must be a share: '50%' or 0.5, got 50 (did you mean '50%'?)",
        f"{path}:6:26: services.orders.circuit_breaker.slow_call.rate: must be a share: '50%' or 0.5, got 80 (did you mean '80%'?)",
    ]


def test_slow_call_warning_names_the_route_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "slow.yaml"
    path.write_text(
        "services:\n"
        "  orders:\n"
        "    endpoints: ['127.0.0.1:8080']\n"
        "    circuit_breaker: {slow_call: {duration: 2s}}\n"
        "routes:\n"
        "  - {name: orders-read, match: {prefix: /}, service: orders, timeout: 2s}\n"
    )
    result = validate("-c", str(path))
    assert (result.returncode, result.stdout) == (0, "OK\n")
    assert result.stderr.splitlines() == [
        f"warning: {path}:4:45: services.orders.circuit_breaker.slow_call.duration: slow_call.duration (2s) is not shorter than the timeout (2s) of route 'orders-read' (routes[0]): its attempts time out (and count as failures) before they can count as slow"
    ]


def test_discovery_file_that_is_a_device_is_an_error() -> None:
    path = "tests/data/invalid/file_not_regular.yaml"
    result = validate("-c", path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:4:21: services.orders.discovery.file.path: must be a regular file, got a character device: /dev/zero"
    ]


def test_huge_and_hostile_keys_and_values_give_bounded_lines(tmp_path: Path) -> None:
    """A 1 MiB key and a 3 MiB value are never echoed whole; newlines, NULs and terminal
    escapes never break a line or reach the terminal raw."""
    head = (
        "services:\n"
        "  orders:\n"
        "    endpoints: ['127.0.0.1:8080']\n"
        '    load_balancer: "round\\nrobin\\0\\e[2J"\n'
        "routes:\n"
        "  - match: {prefix: /}\n"
        "    service: orders\n"
    )
    hostile = (
        "{path}:4:20: services.orders.load_balancer: must be one of round_robin, least_request, "
        "random, got 'round\\nrobin\\x00\\x1b[2J' (did you mean 'round_robin'?)"
    )
    value_file, key_file = tmp_path / "value.yaml", tmp_path / "key.yaml"
    value_file.write_text(head + f"    timeout: {'v' * (3 << 20)}\n")
    key_file.write_text(head + f"    ? {'k' * (1 << 20)}\n    : 1\n")
    expected = {
        value_file: f"{value_file}:8:14: routes[0].timeout: expected a duration like '250ms' or '2s', got '{'v' * 80}...' (3145728 characters)",
        key_file: f"{key_file}:8:7: routes[0].{'k' * 80}...(1048576 characters): unknown key (valid keys: name, match, service, rewrite_prefix, timeout, retries, fallback, fault)",
    }
    for path, line in expected.items():
        result = validate("-c", str(path))
        assert result.returncode == 1
        assert len(result.stderr) < 1000
        assert "\x00" not in result.stderr and "\x1b" not in result.stderr
        assert result.stderr.splitlines() == [hostile.format(path=path), line]
