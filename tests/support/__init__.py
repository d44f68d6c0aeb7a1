"""Helpers for the discovery, health and registration tests: real servers, bounded waits.

Test files import these directly (`from support import ...`); the daemons live in
`support.etcd` and `support.dnsmasq`. Nothing here mocks the network or the clock, except
`support.fake_upstream`: a scripted client behind the `UpstreamClient` Protocol, with a fake
clock and sleep, for the attempt loop's unit tests (tests/test_attempts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.cluster import Cluster
from sidecar.config.model import (
    Address,
    DiscoveryConfig,
    HealthCheckConfig,
    LoadBalancerKind,
    OutlierDetectionConfig,
    ServiceConfig,
)
from sidecar.metrics import Metrics
from sidecar.resilience.breaker import ServiceBreaker
from sidecar.vocab import BreakerState


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05
) -> None:
    """Wait until `predicate()` holds, polling; AssertionError after `timeout` seconds."""
    for _ in range(max(1, int(timeout / interval))):
        if predicate():
            return
        await asyncio.sleep(interval)
    assert predicate(), f"condition not met within {timeout}s"


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[Address]:
    """Run `app` on 127.0.0.1 on a free port for the duration of the block."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Address("127.0.0.1", port)
    finally:
        await runner.cleanup()


@dataclass
class RawServer:
    """What a `raw_server` saw: connections, request heads, and how many the client closed."""

    address: Address
    connections: int = 0
    closed_by_client: int = 0
    heads: list[bytes] = field(default_factory=list)


@contextlib.asynccontextmanager
async def raw_server(reply: bytes | None) -> AsyncIterator[RawServer]:
    """A TCP server on 127.0.0.1 that answers each request head with the bytes `reply`.

    `reply=None` never answers. The server never closes a connection itself (it ignores
    `Connection: close`), so `closed_by_client` counts the connections the client ended.
    """
    writers: list[asyncio.StreamWriter] = []
    seen: list[RawServer] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = seen[0]
        state.connections += 1
        writers.append(writer)
        try:
            state.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if reply is not None:
                writer.write(reply)
                await writer.drain()
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        state.closed_by_client += 1

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen.append(RawServer(Address("127.0.0.1", port)))
    try:
        yield seen[0]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()


class HealthApp:
    """An app whose /healthz answers `status` (flip it from the test), counting hits."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)

    async def _healthz(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text="ok" if self.status < 400 else "bad")


def current_state(breaker: ServiceBreaker) -> BreakerState:
    """The breaker's state now. Tests that follow it through changes read it through this
    call: mypy keeps what an `assert breaker.state is CLOSED` narrowed across the calls
    that change it, so a later `assert breaker.state is OPEN` would type as never true."""
    return breaker.state


def addresses(*texts: str) -> tuple[Address, ...]:
    """Addresses from "host:port" strings."""
    result = []
    for text in texts:
        host, _, port = text.rpartition(":")
        result.append(Address(host.strip("[]"), int(port)))
    return tuple(result)


def keys(cluster: Cluster) -> set[str]:
    """The cluster's current endpoint addresses."""
    return {e.key for e in cluster.endpoints}


def service(
    discovery: DiscoveryConfig,
    *,
    name: str = "orders",
    load_balancer: LoadBalancerKind = "round_robin",
    health_check: HealthCheckConfig | None = None,
    outlier_detection: OutlierDetectionConfig | None = None,
) -> ServiceConfig:
    return ServiceConfig(
        name=name,
        discovery=discovery,
        load_balancer=load_balancer,
        health_check=health_check,
        outlier_detection=outlier_detection,
    )


def updates(metrics: Metrics, result: str, service_name: str = "orders") -> float:
    """sidecar_discovery_updates_total for `result`."""
    value = metrics.registry.get_sample_value(
        "sidecar_discovery_updates_total", {"service": service_name, "result": result}
    )
    return value or 0.0


def endpoint_gauge(metrics: Metrics, state: str, service_name: str = "orders") -> float:
    """sidecar_endpoints for `state`."""
    value = metrics.registry.get_sample_value(
        "sidecar_endpoints", {"service": service_name, "state": state}
    )
    return value if value is not None else -1.0


@contextlib.asynccontextmanager
async def started(config: ServiceConfig, metrics: Metrics | None = None) -> AsyncIterator[Cluster]:
    """A started cluster, closed at the end."""
    cluster = Cluster(config, metrics or Metrics())
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()
