"""Active health checks against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiohttp import web
from support import (
    HealthApp,
    endpoint_gauge,
    eventually,
    free_port,
    raw_server,
    serve,
    service,
    started,
)

from sidecar.cluster.health import HealthChecker
from sidecar.cluster.probes import http_check, http_probe, tcp_probe
from sidecar.config.model import Address, HealthCheckConfig, StaticDiscovery
from sidecar.endpoint import Endpoint
from sidecar.metrics import Metrics

FAST = HealthCheckConfig(
    path="/healthz", interval=0.05, timeout=0.5, unhealthy_threshold=2, healthy_threshold=2
)


async def test_failing_endpoint_gets_no_picks_then_recovers() -> None:
    good, bad = HealthApp(), HealthApp()
    metrics = Metrics()
    async with serve(good.app) as good_addr, serve(bad.app) as bad_addr:
        cfg = service(StaticDiscovery((good_addr, bad_addr)), health_check=FAST)
        async with started(cfg, metrics) as cluster:
            g, b = cluster.endpoints
            await eventually(lambda: good.hits >= 2 and bad.hits >= 2)
            assert (g.state, b.state) == ("healthy", "healthy")

            bad.status = 500
            await eventually(lambda: b.state == "unhealthy")
            assert endpoint_gauge(metrics, "unhealthy") == 1
            assert endpoint_gauge(metrics, "healthy") == 1
            picks = Counter(e.key for e in (cluster.pick() for _ in range(50)) if e)
            assert picks == {g.key: 50}
            assert cluster.snapshot()["endpoints"][1]["state"] == "unhealthy"

            bad.status = 204  # any 2xx passes
            await eventually(lambda: b.state == "healthy")
            assert endpoint_gauge(metrics, "unhealthy") == 0
            assert endpoint_gauge(metrics, "healthy") == 2
            assert b.key in {e.key for e in (cluster.pick() for _ in range(4)) if e}


async def test_unreachable_and_slow_endpoints_turn_unhealthy() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()  # far beyond the 0.2 s check timeout
        return web.Response(text="late")

    slow_app = web.Application()
    slow_app.router.add_get("/healthz", slow)
    good = HealthApp()
    nothing = Address("127.0.0.1", free_port())  # connection refused
    config = HealthCheckConfig(
        path="/healthz", interval=0.05, timeout=0.2, unhealthy_threshold=1, healthy_threshold=1
    )
    async with serve(good.app) as good_addr, serve(slow_app) as slow_addr:
        cfg = service(StaticDiscovery((good_addr, slow_addr, nothing)), health_check=config)
        async with started(cfg) as cluster:
            g, s, n = cluster.endpoints
            await eventually(lambda: s.state == "unhealthy" and n.state == "unhealthy")
            assert g.state == "healthy"
            assert cluster.pick() is g
            release.set()


async def test_every_endpoint_unhealthy_means_no_pick() -> None:
    bad = HealthApp(status=503)
    async with (
        serve(bad.app) as addr,
        started(service(StaticDiscovery((addr,)), health_check=FAST)) as cluster,
    ):
        await eventually(lambda: cluster.endpoints[0].state == "unhealthy")
        assert cluster.pick() is None


async def test_new_endpoints_from_discovery_are_checked_too() -> None:
    first, second = HealthApp(), HealthApp(status=500)
    async with (
        serve(first.app) as a1,
        serve(second.app) as a2,
        started(service(StaticDiscovery((a1,)), health_check=FAST)) as cluster,
    ):
        cluster.set_addresses([a1, a2])
        new = cluster.endpoints[1]
        assert new.state == "healthy"  # a new endpoint starts healthy
        await eventually(lambda: new.state == "unhealthy")
        assert second.hits >= 2


def test_thresholds_count_consecutive_results() -> None:
    changes: list[str] = []
    checker = HealthChecker(
        "orders",
        HealthCheckConfig(unhealthy_threshold=3, healthy_threshold=2),
        list,
        lambda: changes.append("x"),
    )
    e = Endpoint(Address("127.0.0.1", 1))
    for ok in (False, False, True, False, False):  # a pass breaks the run
        assert checker.record(e, ok) is False
    assert e.state == "healthy"
    assert checker.record(e, False) is True  # third failure in a row
    assert e.state == "unhealthy"
    assert checker.record(e, True) is False
    assert checker.record(e, False) is False
    assert checker.record(e, True) is False
    assert checker.record(e, True) is True  # second pass in a row
    assert e.state == "healthy"


# -- the probes (sidecar.cluster.probes) ---------------------------------------------------


def answer(status: str, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\nok".encode()


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        (answer("200 OK"), True),
        (answer("204 No Content"), True),
        (answer("299 Whatever"), True),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer("200 OK"), True),
        (answer("302 Found", "Location: /elsewhere\r\n"), False),  # not followed
        (answer("500 Internal Server Error"), False),
        (answer("503 Service Unavailable"), False),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", False),
        (b"HTTP/1.1 2000 OK\r\n\r\n", False),
    ],
)
async def test_http_probe_passes_only_a_2xx(reply: bytes, passes: bool) -> None:
    async with raw_server(reply) as server:
        assert await http_probe(server.address, "/healthz", 2.0) is passes
        assert server.heads[0].startswith(b"GET /healthz HTTP/1.1\r\n")
        await eventually(lambda: server.closed_by_client == 1)


async def test_http_probe_opens_a_new_connection_each_time_and_closes_it() -> None:
    # The server would keep each connection open: only the probe can have closed them.
    async with raw_server(answer("200 OK", "Connection: keep-alive\r\n")) as server:
        results = [await http_probe(server.address, "/healthz", 2.0) for _ in range(3)]
        assert results == [True, True, True]
        assert server.connections == 3
        assert all(b"\r\nconnection: close\r\n" in h.lower() for h in server.heads)
        assert all(f"\r\nHost: {server.address}\r\n".encode() in h for h in server.heads)
        await eventually(lambda: server.closed_by_client == 3)


async def test_http_probe_fails_on_silence_and_refusal_with_the_reason() -> None:
    async with raw_server(None) as silent:
        outcome = await http_check(silent.address, "/healthz", 0.2)
        assert outcome.ok is False and outcome.detail == "timed out after 0.2s"
        await eventually(lambda: silent.closed_by_client == 1)  # nothing left open
    refused = await http_check(Address("127.0.0.1", free_port()), "/healthz", 1.0)
    assert refused.ok is False and refused.detail.startswith("Connect call failed")
    async with raw_server(b"HTTP/1.1 200 OK") as cut:  # head never completed
        assert await http_probe(cut.address, "/", 0.5) is False
    async with raw_server(answer("200 OK")) as ok:
        assert (await http_check(ok.address, "/", 1.0)).detail == "HTTP 200"


async def test_tcp_probe_connects_and_closes_at_once() -> None:
    async with raw_server(None) as server:
        assert await tcp_probe(server.address, 1.0) is True
        await eventually(lambda: server.connections == 1 and server.closed_by_client == 1)
        assert server.heads == []  # nothing was sent
    assert await tcp_probe(Address("127.0.0.1", free_port()), 1.0) is False
