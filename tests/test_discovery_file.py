"""File discovery against real files: rewrites, bad content, missing files."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from support import eventually, keys, service, started, updates

from sidecar.config.model import Address, FileDiscovery
from sidecar.discovery import parse_address
from sidecar.discovery.file import parse_endpoint_list
from sidecar.metrics import Metrics


def write(path: Path, text: str) -> None:
    """Replace the file atomically, as the docs ask writers to."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_rewrite_changes_the_endpoint_set(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n- 127.0.0.1:9002\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        # start() waited for the first read.
        assert keys(cluster) == {"127.0.0.1:9001", "127.0.0.1:9002"}
        assert updates(metrics, "success") == 1
        staying = cluster.endpoints[1]
        staying.in_flight = 3

        write(path, "- 127.0.0.1:9002\n- 127.0.0.1:9003\n")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9002", "127.0.0.1:9003"})
        assert cluster.endpoints[0] is staying and staying.in_flight == 3
        assert updates(metrics, "success") == 2
        assert updates(metrics, "failure") == 0
        snap = cluster.snapshot()["discovery"]
        assert snap["source"] == "file" and snap["path"] == str(path)
        assert snap["last_update"] is not None


async def test_json_and_in_place_rewrites_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "orders.json"
    path.write_text(json.dumps(["127.0.0.1:9001"]))
    async with started(service(FileDiscovery(path))) as cluster:
        assert keys(cluster) == {"127.0.0.1:9001"}
        # Same size, same inode, written within the same mtime tick: the content hash
        # still tells the versions apart.
        path.write_text(json.dumps(["127.0.0.1:9002"]))
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9002"})


async def test_malformed_file_keeps_the_last_set_and_counts_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n- 127.0.0.1:9002\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        before = list(cluster.endpoints)

        write(path, "- 127.0.0.1:9001\n- [unclosed\n")
        await eventually(lambda: updates(metrics, "failure") == 1)
        assert cluster.endpoints == before
        assert "not valid YAML" in cluster.snapshot()["discovery"]["last_error"]

        write(path, "- 127.0.0.1:9001\n- 127.0.0.1:99999\n")  # valid YAML, bad port
        await eventually(lambda: updates(metrics, "failure") == 2)
        assert cluster.endpoints == before
        assert (
            "[1]: port must be between 1 and 65535" in cluster.snapshot()["discovery"]["last_error"]
        )

        write(path, "")  # truncated mid-write, most likely
        await eventually(lambda: updates(metrics, "failure") == 3)
        assert cluster.endpoints == before

        write(path, "- 127.0.0.1:9003\n")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9003"})
        assert cluster.snapshot()["discovery"]["last_error"] is None
        assert updates(metrics, "success") == 2


async def test_missing_file_counts_one_failure_then_appearing_file_applies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "later.yaml"
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        assert cluster.endpoints == []
        assert cluster.pick() is None
        assert updates(metrics, "failure") == 1
        # Several polls of the same missing file are one failure, not one per poll.
        await asyncio.sleep(1.2)
        assert updates(metrics, "failure") == 1
        write(path, "[]\n")  # an explicit empty list is a valid (empty) set
        await eventually(lambda: updates(metrics, "success") == 1)
        assert cluster.endpoints == []
        write(path, "- localhost:8080\n")
        await eventually(lambda: keys(cluster) == {"localhost:8080"})


def test_parse_endpoint_list() -> None:
    assert parse_endpoint_list(b'["10.0.0.1:80", "[::1]:8080"]') == (
        Address("10.0.0.1", 80),
        Address("::1", 8080),
    )
    assert parse_endpoint_list(b"[]") == ()
    for bad, message in [
        (b"", "empty file"),
        (b"orders: 1", "expected a list"),
        (b"- 1", 'expected a "host:port" string'),
        (b"- [a, b]", 'expected a "host:port" string'),
        (b"- nohost", "expected an address 'host:port'"),
        (b"- ::1:80", "need brackets"),
        (b"- 'a b:80'", "is not a valid host name"),
        (b"- a:0", "port must be"),
        (b"- !!python/object:os.system x", "not valid YAML"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_endpoint_list(bad)


def test_parse_address() -> None:
    assert parse_address(" orders.internal:8080 ") == Address("orders.internal", 8080)
    assert parse_address("[fe80::1]:443") == Address("fe80::1", 443)
    with pytest.raises(ValueError):
        parse_address("[::1]8080")
