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
from sidecar.discovery.file import (
    MAX_FILE_BYTES,
    FileRefused,
    parse_endpoint_list,
    read_at_most,
    read_endpoint_file,
)
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


def replace_with_symlink(path: Path, target: str) -> None:
    tmp = path.with_suffix(".link")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def replace_with_fifo(path: Path) -> None:
    tmp = path.with_suffix(".fifo")
    os.mkfifo(tmp)
    os.replace(tmp, path)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
async def test_a_device_is_refused_and_the_last_set_stays(tmp_path: Path, device: str) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        before = list(cluster.endpoints)
        # Before the fix this read /dev/zero without end (st_size is 0 for a device).
        replace_with_symlink(path, device)
        await eventually(lambda: updates(metrics, "failure") == 1)
        assert cluster.endpoints == before
        error = cluster.snapshot()["discovery"]["last_error"]
        assert error == f"not a regular file: {path} (a character device)"
        # Polling goes on: one failure for the one bad state, and a good file applies.
        await asyncio.sleep(1.2)
        assert updates(metrics, "failure") == 1
        write(path, "- 127.0.0.1:9002\n")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9002"})
        assert cluster.snapshot()["discovery"]["last_error"] is None


async def test_a_fifo_is_refused_without_blocking_the_poll(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        before = list(cluster.endpoints)
        replace_with_fifo(path)  # no writer ever opens it: a blocking open would hang
        await eventually(lambda: updates(metrics, "failure") == 1)
        assert cluster.endpoints == before
        assert cluster.snapshot()["discovery"]["last_error"] == (
            f"not a regular file: {path} (a FIFO)"
        )
        write(path, "- 127.0.0.1:9002\n")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9002"})
    # Leaving the block closed the cluster: no worker thread was left blocked on the FIFO.


async def test_a_fifo_at_start_up_is_a_first_result(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    os.mkfifo(path)
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        # start() waited for the first poll, which answered at once with a failure
        # (a blocked open would have given no result at all within start()'s wait).
        assert updates(metrics, "failure") == 1
        assert cluster.endpoints == []
        assert "not a regular file" in cluster.snapshot()["discovery"]["last_error"]


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "orders.d"
    path.mkdir()
    async with started(service(FileDiscovery(path))) as cluster:
        assert cluster.snapshot()["discovery"]["last_error"] == (
            f"not a regular file: {path} (a directory)"
        )


async def test_an_oversized_file_is_refused_and_the_last_set_stays(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        before = list(cluster.endpoints)
        line = "- 127.0.0.1:9002\n"
        write(path, line * (MAX_FILE_BYTES // len(line) + 1))  # valid YAML, just too big
        await eventually(lambda: updates(metrics, "failure") == 1)
        assert cluster.endpoints == before
        assert cluster.snapshot()["discovery"]["last_error"] == (
            f"{path}: larger than {MAX_FILE_BYTES} bytes, the limit for an endpoint list"
        )


async def test_the_same_content_restored_after_a_failure_applies_again(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    write(path, "- 127.0.0.1:9001\n")
    metrics = Metrics()
    async with started(service(FileDiscovery(path)), metrics) as cluster:
        path.unlink()
        await eventually(lambda: updates(metrics, "failure") == 1)
        assert cluster.snapshot()["discovery"]["last_error"] is not None
        write(path, "- 127.0.0.1:9001\n")
        await eventually(lambda: updates(metrics, "success") == 2)
        assert cluster.snapshot()["discovery"]["last_error"] is None
        assert keys(cluster) == {"127.0.0.1:9001"}


def test_read_at_most_stops_one_byte_past_the_limit() -> None:
    # A pipe, whose size nothing announces, as a device's or a procfs file's.
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 100)
        os.close(w)
        w = -1
        assert read_at_most(r, 10) == b"x" * 11
        assert read_at_most(r, 1000) == b"x" * 89  # the rest, up to EOF
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_read_endpoint_file_bounds(tmp_path: Path) -> None:
    path = tmp_path / "eps.yaml"
    path.write_bytes(b"[]" + b" " * 8)
    st, data = read_endpoint_file(path, limit=10)
    assert data == b"[]" + b" " * 8 and st.st_size == 10
    with pytest.raises(FileRefused, match="larger than 9 bytes"):
        read_endpoint_file(path, limit=9)
    with pytest.raises(FileRefused, match="not a regular file: /dev/zero"):
        read_endpoint_file(Path("/dev/zero"))
    with pytest.raises(FileNotFoundError):
        read_endpoint_file(tmp_path / "missing")


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
