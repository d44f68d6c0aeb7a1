"""DNS discovery against a real dnsmasq: A and AAAA changes, SRV ports, failures."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import eventually, free_port, keys, service, started, updates
from support.dnsmasq import Dnsmasq, running_dnsmasq

from sidecar.cluster import Cluster
from sidecar.config.model import Address, DnsDiscovery, DnsRecord
from sidecar.discovery.dns import DnsSource
from sidecar.metrics import Metrics

SRV = [
    "_orders._tcp.test,host-a.test,9001,0,10",
    "_orders._tcp.test,host-b.test,9002,0,10",
    "_orders._tcp.test,host-backup.test,9009,10,10",  # higher priority value: a backup
]
HOSTS = """\
127.0.0.2 orders.test
127.0.0.3 orders.test
::1 orders6.test
127.0.0.11 host-a.test
127.0.0.12 host-b.test
127.0.0.19 host-backup.test
"""


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    with running_dnsmasq(tmp_path, HOSTS, SRV) as server:
        yield server


async def first_set(cluster: Cluster, expected: set[str]) -> None:
    """The set the records give. A lookup can fail transiently (once in CI, c-ares said
    "Could not contact DNS servers" to a dnsmasq that had just answered): the source
    retries, which is the behaviour, so the first set may come from a second lookup."""
    await eventually(lambda: keys(cluster) == expected)


def config(
    dns: Dnsmasq, name: str, record: DnsRecord = "A", port: int | None = 8080
) -> DnsDiscovery:
    return DnsDiscovery(
        name=name,
        port=port,
        record=record,
        refresh=0.1,
        nameservers=(Address("127.0.0.1", dns.port),),
    )


async def test_a_record_change_updates_the_set(dns: Dnsmasq) -> None:
    metrics = Metrics()
    async with started(service(config(dns, "orders.test")), metrics) as cluster:
        await first_set(cluster, {"127.0.0.2:8080", "127.0.0.3:8080"})
        staying = next(e for e in cluster.endpoints if e.key == "127.0.0.3:8080")
        staying.in_flight = 2

        dns.set_hosts(HOSTS.replace("127.0.0.2 orders.test", "127.0.0.4 orders.test"))
        await eventually(lambda: keys(cluster) == {"127.0.0.3:8080", "127.0.0.4:8080"})
        assert staying in cluster.endpoints and staying.in_flight == 2
        assert updates(metrics, "success") >= 2
        snap = cluster.snapshot()["discovery"]
        assert (snap["source"], snap["name"], snap["record"]) == ("dns", "orders.test", "A")


async def test_a_vanished_record_keeps_the_last_set(dns: Dnsmasq) -> None:
    metrics = Metrics()
    async with started(service(config(dns, "orders.test")), metrics) as cluster:
        before = {"127.0.0.2:8080", "127.0.0.3:8080"}
        await first_set(cluster, before)
        dns.set_hosts("127.0.0.11 host-a.test\n")  # orders.test is gone
        await eventually(lambda: updates(metrics, "failure") >= 2)
        assert keys(cluster) == before
        assert "DNS A orders.test" in cluster.snapshot()["discovery"]["last_error"]
        dns.set_hosts(HOSTS)
        await eventually(lambda: cluster.snapshot()["discovery"]["last_error"] is None)
        assert keys(cluster) == before


async def test_aaaa_record(dns: Dnsmasq) -> None:
    async with started(service(config(dns, "orders6.test", "AAAA"))) as cluster:
        await first_set(cluster, {"[::1]:8080"})
        assert cluster.endpoints[0].address == Address("::1", 8080)


async def test_srv_gives_targets_and_ports(dns: Dnsmasq) -> None:
    cfg = config(dns, "_orders._tcp.test", "SRV", port=None)
    async with started(service(cfg)) as cluster:
        # The priority-10 backup is left out while priority-0 records exist.
        await first_set(cluster, {"127.0.0.11:9001", "127.0.0.12:9002"})
        # A target's address change is followed (resolved again on every refresh).
        dns.set_hosts(HOSTS.replace("127.0.0.12 host-b.test", "127.0.0.13 host-b.test"))
        await eventually(lambda: keys(cluster) == {"127.0.0.11:9001", "127.0.0.13:9002"})


async def test_unreachable_nameserver_counts_failures_without_blocking_start() -> None:
    cfg = DnsDiscovery(
        name="orders.test",
        port=8080,
        refresh=0.2,
        nameservers=(Address("127.0.0.1", free_port()),),  # nothing listens there
    )
    metrics = Metrics()
    began = time.monotonic()
    async with started(service(cfg), metrics) as cluster:
        # start() is bounded (first_result_timeout), whatever the resolver does.
        assert time.monotonic() - began < 5
        await eventually(lambda: updates(metrics, "failure") >= 1, timeout=10)
        assert cluster.pick() is None
        assert updates(metrics, "success") == 0


async def test_a_failed_lookup_is_retried_long_before_the_refresh(tmp_path: Path) -> None:
    # The nameserver is not up yet when the sidecar starts: the first lookup fails.
    dns = Dnsmasq(tmp_path, HOSTS)
    cfg = DnsDiscovery(
        name="orders.test",
        port=8080,
        refresh=60.0,  # a retry at the refresh would come long after this test's bound
        nameservers=(Address("127.0.0.1", dns.port),),
    )
    metrics = Metrics()
    async with started(service(cfg), metrics) as cluster:
        await eventually(lambda: updates(metrics, "failure") >= 1, timeout=10)
        assert cluster.pick() is None
        dns.start()
        try:
            # Retried after 0.5 s, 1 s, 2 s ... (never more than refresh) until it answers.
            await eventually(lambda: keys(cluster) == {"127.0.0.2:8080", "127.0.0.3:8080"}, 15)
        finally:
            dns.stop()


def test_failure_retry_delay_doubles_up_to_the_refresh() -> None:
    source = DnsSource(DnsDiscovery(name="a.test", port=1, refresh=5.0))
    # Equal jitter: each wait lies in [ceiling/2, ceiling); rand() at its ends shows both.
    top = dataclasses.replace(source.backoff, rand=lambda: 1.0)
    assert [top.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    bottom = dataclasses.replace(source.backoff, rand=lambda: 0.0)
    assert [bottom.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.5, 2.5]
    fast = DnsSource(DnsDiscovery(name="a.test", port=1, refresh=0.1))
    assert dataclasses.replace(fast.backoff, rand=lambda: 1.0).next() == 0.1
