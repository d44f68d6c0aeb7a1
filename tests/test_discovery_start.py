"""Cluster.start(): concurrent with other clusters' start(), with itself, and cancellable.

The sources here are fakes behind the DiscoverySource protocol that answer only when the
test says so, so each property is shown by what start() callers saw, not by timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support import HealthApp, eventually, keys, serve, service

from sidecar.cluster import Cluster
from sidecar.config.model import Address, FileDiscovery, HealthCheckConfig
from sidecar.discovery import DiscoverySink
from sidecar.metrics import Metrics


class GatedSource:
    """Reports `addresses` once `gate` is set; then watches forever."""

    kind = "gated"

    def __init__(self, gate: asyncio.Event, addresses: Sequence[Address]) -> None:
        self.gate = gate
        self.addresses = tuple(addresses)
        self.runs = 0

    async def run(self, sink: DiscoverySink) -> None:
        self.runs += 1
        await self.gate.wait()
        sink.discovered(self.addresses)
        await asyncio.Event().wait()

    def describe(self) -> dict[str, Any]:
        return {}


class BarrierSource(GatedSource):
    """Answers only once all `parties` sources of its group are running."""

    def __init__(self, group: list[BarrierSource], parties: int, address: Address) -> None:
        super().__init__(asyncio.Event(), [address])
        self.group, self.parties = group, parties
        group.append(self)

    async def run(self, sink: DiscoverySink) -> None:
        self.runs += 1
        if sum(s.runs for s in self.group) == self.parties:
            for source in self.group:
                source.gate.set()
        await self.gate.wait()
        sink.discovered(self.addresses)
        await asyncio.Event().wait()


def dynamic(name: str = "orders", **kwargs: Any) -> Any:
    # Any non-static discovery config makes the cluster run its source.
    return service(FileDiscovery(Path("/nonexistent")), name=name, **kwargs)


async def test_clusters_started_together_each_get_their_first_result() -> None:
    # Each source answers only once every one of them runs: started one after another,
    # the first start() would time out waiting for sources not started yet.
    group: list[BarrierSource] = []
    metrics = Metrics()
    clusters = [
        Cluster(
            dynamic(f"s{i}"),
            metrics,
            source=BarrierSource(group, 5, Address("127.0.0.1", 9000 + i)),
            first_result_timeout=30,
        )
        for i in range(5)
    ]

    async def start(cluster: Cluster) -> set[str]:
        await cluster.start()
        return keys(cluster)  # what this caller saw when its start() returned

    try:
        seen = await asyncio.gather(*(start(c) for c in clusters))
        assert seen == [{f"127.0.0.1:{9000 + i}"} for i in range(5)]
        assert [s.runs for s in group] == [1] * 5
    finally:
        for cluster in clusters:
            await cluster.close()


async def test_two_starts_of_one_cluster_both_wait_for_the_first_result() -> None:
    gate = asyncio.Event()
    source = GatedSource(gate, [Address("127.0.0.1", 9001)])
    cluster = Cluster(dynamic(), Metrics(), source=source, first_result_timeout=30)
    try:
        first = asyncio.ensure_future(cluster.start())
        second = asyncio.ensure_future(cluster.start())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not first.done() and not second.done()  # neither returned without endpoints
        gate.set()
        await asyncio.gather(first, second)
        assert keys(cluster) == {"127.0.0.1:9001"}
        assert source.runs == 1  # one source task, however many callers
    finally:
        await cluster.close()


async def test_a_cancelled_start_leaves_discovery_and_health_checks_running() -> None:
    app = HealthApp()
    async with serve(app.app) as address:
        gate = asyncio.Event()
        check = HealthCheckConfig(path="/healthz", interval=0.05, timeout=1.0)
        cluster = Cluster(
            dynamic(health_check=check),
            Metrics(),
            source=GatedSource(gate, [address]),
            first_result_timeout=30,
        )
        try:
            waiting = asyncio.ensure_future(cluster.start())
            for _ in range(10):
                await asyncio.sleep(0)
            waiting.cancel()  # say, a reload given up while discovery was still quiet
            await asyncio.gather(waiting, return_exceptions=True)
            assert waiting.cancelled()
            gate.set()
            await eventually(lambda: keys(cluster) == {str(address)})
            await eventually(lambda: app.hits >= 2)  # the checker runs all the same
        finally:
            await cluster.close()


async def test_a_runtime_starts_its_new_services_at_once(caplog: Any) -> None:
    """Start-up (and every reload) waits for each dynamic service's first discovery answer;
    one after another, three unreachable nameservers cost three such waits in a row.

    Shown without timing: a nameserver that never answers sees all three services' queries
    while no service has yet given up waiting (which each logs)."""
    from sidecar.config.model import (
        DnsDiscovery,
        MatchConfig,
        RouteConfig,
        ServiceConfig,
        SidecarConfig,
    )
    from sidecar.runtime import Runtime
    from sidecar.upstream.h1 import UpstreamPool

    queries: list[bytes] = []

    class Silent(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            queries.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Silent, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    names = ("alpha", "bravo", "charlie")
    services = {
        n: ServiceConfig(
            name=n,
            discovery=DnsDiscovery(f"{n}.test", 80, "A", 10.0, (Address("127.0.0.1", port),)),
        )
        for n in names
    }
    routes = (RouteConfig(name="r", match=MatchConfig(prefix="/"), service="alpha"),)
    pool = UpstreamPool()
    runtime = Runtime(SidecarConfig(services=services, routes=routes), Metrics(), {"http1": pool})
    caplog.set_level("WARNING", logger="sidecar.discovery")
    starting = asyncio.ensure_future(runtime.start_new())
    try:
        await eventually(lambda: all(any(n.encode() in q for q in queries) for n in names))
        assert not any("no discovery result" in r.getMessage() for r in caplog.records)
    finally:
        await starting
        await runtime.close_all()
        await pool.close()
        transport.close()
