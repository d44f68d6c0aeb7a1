"""Active health checks against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiohttp import web
from support import HealthApp, endpoint_gauge, eventually, free_port, serve, service, started

from sidecar.cluster.health import HealthChecker
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
