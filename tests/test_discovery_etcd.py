"""etcd discovery against a real etcd: range, watch, value formats, outages."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import eventually, free_port, keys, service, started, updates
from support.etcd import EtcdServer, running_etcd
from support.tcpproxy import TcpProxy

from sidecar.cluster import Cluster
from sidecar.config.model import Address, EtcdDiscovery
from sidecar.discovery.etcd import EtcdSource, parse_instance
from sidecar.discovery.etcdclient import prefix_range_end
from sidecar.metrics import Metrics

PREFIX = "/services/orders/"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path) as server:
        yield server


def config(*urls: str) -> EtcdDiscovery:
    return EtcdDiscovery(endpoints=urls, prefix=PREFIX)


async def test_range_then_watch_put_and_delete(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", '{"address": "127.0.0.1:9001", "zone": "x"}')
    await etcd.put(PREFIX + "b", "127.0.0.1:9002")  # a bare host:port
    await etcd.put("/services/orders-other/c", "127.0.0.1:9999")  # not under the prefix
    metrics = Metrics()
    async with started(service(config(etcd.url)), metrics) as cluster:
        assert keys(cluster) == {"127.0.0.1:9001", "127.0.0.1:9002"}
        a = cluster.endpoints[0]
        a.in_flight = 1

        await etcd.put(PREFIX + "c", '"127.0.0.1:9003"')  # a JSON string
        await eventually(lambda: "127.0.0.1:9003" in keys(cluster), timeout=1.0)

        await etcd.delete(PREFIX + "b")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9001", "127.0.0.1:9003"}, 1.0)
        assert cluster.endpoints[0] is a and a.in_flight == 1

        await etcd.put(PREFIX + "a", '{"address": "127.0.0.1:9011"}')  # instance moved
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9011", "127.0.0.1:9003"}, 1.0)

        await etcd.put(PREFIX + "c", "{not json")  # a bad value: that instance drops out
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9011"}, 1.0)

        assert updates(metrics, "failure") == 0
        assert updates(metrics, "success") == 5  # the range read and four watch events
        snap = cluster.snapshot()["discovery"]
        assert snap["source"] == "etcd" and snap["connected"] is True
        assert snap["prefix"] == PREFIX and snap["revision"] > 0


async def test_outage_keeps_endpoints_and_recovers(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", "127.0.0.1:9001")
    metrics = Metrics()
    async with started(service(config(etcd.url)), metrics) as cluster:
        assert keys(cluster) == {"127.0.0.1:9001"}

        await etcd.astop(signal.SIGKILL)
        await eventually(lambda: updates(metrics, "failure") >= 2)
        assert keys(cluster) == {"127.0.0.1:9001"}
        assert cluster.pick() is not None
        snap = cluster.snapshot()["discovery"]
        assert snap["connected"] is False and snap["last_error"].startswith("etcd:")

        await etcd.astart()  # same ports, same data
        await etcd.put(PREFIX + "b", "127.0.0.1:9002")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9001", "127.0.0.1:9002"}, 10)
        # And the watch is live again: a delete shows within a second.
        await etcd.delete(PREFIX + "a")
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9002"}, 1.0)
        assert cluster.snapshot()["discovery"]["connected"] is True


async def test_changes_during_a_disconnect_are_read_on_reconnect(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", "127.0.0.1:9001")
    proxy = TcpProxy(etcd.client_port)
    await proxy.start()
    metrics = Metrics()
    try:
        async with started(service(config(proxy.url)), metrics) as cluster:
            assert keys(cluster) == {"127.0.0.1:9001"}
            await proxy.cut()  # the sidecar loses etcd; etcd itself carries on
            await eventually(lambda: updates(metrics, "failure") >= 1)
            await etcd.delete(PREFIX + "a")
            await etcd.put(PREFIX + "z", "127.0.0.1:9026")
            assert keys(cluster) == {"127.0.0.1:9001"}  # unseen while disconnected
            await proxy.restore()
            await eventually(lambda: keys(cluster) == {"127.0.0.1:9026"}, 10)
    finally:
        await proxy.close()


async def test_a_silent_partition_is_detected_by_the_watch_probe(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", "127.0.0.1:9001")
    proxy = TcpProxy(etcd.client_port)
    await proxy.start()
    metrics = Metrics()
    cfg = config(proxy.url)
    # Probe a quiet watch every 0.2 s instead of 5 s; the probe's own timeout is 3 s.
    source = EtcdSource(cfg, probe_interval=0.2)
    cluster = Cluster(service(cfg), metrics, source=source)
    try:
        await cluster.start()
        assert keys(cluster) == {"127.0.0.1:9001"}
        await eventually(lambda: source.watching)
        proxy.blackhole()  # no reset, no EOF: only silence
        await eventually(lambda: updates(metrics, "failure") >= 1, timeout=10)
        assert source.connected is False
        assert "liveness probe" in (cluster.last_error or "")
        assert keys(cluster) == {"127.0.0.1:9001"}
        await proxy.restore()
        await etcd.put(PREFIX + "b", "127.0.0.1:9002")
        await eventually(lambda: len(cluster.endpoints) == 2, timeout=15)
    finally:
        await cluster.close()
        await proxy.close()


async def test_start_while_etcd_is_down_then_it_comes_up(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", "127.0.0.1:9001")
    await etcd.astop()
    metrics = Metrics()
    began = time.monotonic()
    async with started(service(config(etcd.url)), metrics) as cluster:
        assert time.monotonic() - began < 3  # the first failure ends start()'s wait
        assert cluster.pick() is None
        assert updates(metrics, "failure") >= 1
        await etcd.astart()
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9001"}, 10)


async def test_fails_over_to_the_next_etcd_endpoint(etcd: EtcdServer) -> None:
    await etcd.put(PREFIX + "a", "127.0.0.1:9001")
    dead = f"http://127.0.0.1:{free_port()}"
    async with started(service(config(dead, etcd.url))) as cluster:
        await eventually(lambda: keys(cluster) == {"127.0.0.1:9001"})
        await etcd.put(PREFIX + "b", "127.0.0.1:9002")
        await eventually(lambda: len(cluster.endpoints) == 2, 1.0)
        assert cluster.snapshot()["discovery"]["endpoint"] == etcd.url


def test_parse_instance_and_prefix_range() -> None:
    assert parse_instance(b'{"address": "10.0.0.5:8080", "service": "x"}') == Address(
        "10.0.0.5", 8080
    )
    assert parse_instance(b" 10.0.0.5:8080\n") == Address("10.0.0.5", 8080)
    assert parse_instance(b'"[::1]:80"') == Address("::1", 80)
    for bad in (b"{}", b'{"address": 5}', b"[1]", b"{oops", b"nothing"):
        with pytest.raises(ValueError):
            parse_instance(bad)
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\x00"
