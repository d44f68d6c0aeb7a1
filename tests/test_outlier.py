"""Passive outlier detection through Cluster.report(): ejection, return, limits."""

from __future__ import annotations

import asyncio
from collections import Counter

from support import addresses, endpoint_gauge, eventually, service, started

from sidecar.cluster import Cluster
from sidecar.cluster.outlier import OutlierDetector
from sidecar.config.model import OutlierDetectionConfig, ServiceConfig, StaticDiscovery
from sidecar.metrics import Metrics
from sidecar.tasks import TaskOwner
from sidecar.vocab import EndpointState

FOUR = addresses("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004")


def outlier(
    failures: int = 3, ejection: float = 0.3, percent: float = 50
) -> OutlierDetectionConfig:
    return OutlierDetectionConfig(
        consecutive_failures=failures, ejection_time=ejection, max_ejection_percent=percent
    )


async def test_ejected_after_consecutive_failures_and_back_after_ejection_time() -> None:
    metrics = Metrics()
    cfg = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier())
    async with started(cfg, metrics) as cluster:
        bad, good = cluster.endpoints
        cluster.report(bad, False)
        cluster.report(bad, False)
        assert bad.state == "healthy"
        cluster.report(bad, False)
        assert bad.state == "ejected" and not bad.available
        assert endpoint_gauge(metrics, "ejected") == 1
        assert endpoint_gauge(metrics, "healthy") == 1
        assert Counter(e.key for e in (cluster.pick() for _ in range(20)) if e) == {good.key: 20}
        assert cluster.snapshot()["endpoints"][0] == {
            "address": bad.key,
            "state": "ejected",
            "in_flight": 0,
            "ejections": 1,
        }

        await eventually(lambda: bad.state == "healthy", timeout=5)
        assert endpoint_gauge(metrics, "ejected") == 0
        assert endpoint_gauge(metrics, "healthy") == 2
        assert bad in [cluster.pick() for _ in range(2)]
        # Back with a clean slate: it takes the full run of failures again.
        cluster.report(bad, False)
        cluster.report(bad, False)
        assert bad.state == "healthy"


async def test_a_success_resets_the_run_of_failures() -> None:
    cfg = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier())
    async with started(cfg) as cluster:
        e = cluster.endpoints[0]
        for ok in (False, False, True, False, False, True, False, False):
            cluster.report(e, ok)
        assert e.state == "healthy"


async def test_max_ejection_percent_is_honoured() -> None:
    metrics = Metrics()
    cfg = service(StaticDiscovery(FOUR), outlier_detection=outlier(failures=1, ejection=30))
    async with started(cfg, metrics) as cluster:
        for e in cluster.endpoints:
            cluster.report(e, False)
        # 50% of 4: two may be out at once, whatever the others do.
        assert [e.state for e in cluster.endpoints] == ["ejected", "ejected", "healthy", "healthy"]
        assert endpoint_gauge(metrics, "ejected") == 2
        third = cluster.endpoints[2]
        for _ in range(5):
            cluster.report(third, False)
        assert third.state == "healthy"
        assert cluster.pick() is not None


async def test_ejection_is_refused_at_zero_percent() -> None:
    off = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier(failures=1, percent=0))
    async with started(off) as cluster:
        cluster.report(cluster.endpoints[0], False)
        assert cluster.endpoints[0].state == "healthy"


async def test_a_one_endpoint_service_is_never_ejected() -> None:
    # Changed with outlier detection on by default: ejecting the only endpoint turned a
    # failing service into no_healthy_upstream for everyone; it now stays in rotation and
    # the circuit breaker, which sees the whole service, judges it.
    metrics = Metrics()
    one = service(StaticDiscovery(FOUR[:1]), outlier_detection=outlier(failures=1, percent=100))
    async with started(one, metrics) as cluster:
        (only,) = cluster.endpoints
        for _ in range(20):
            cluster.report(only, False)
        assert only.state == "healthy"
        assert only.ejection.ejections == 0
        assert cluster.pick() is only
        assert endpoint_gauge(metrics, "ejected") == 0


async def test_with_every_endpoint_failing_one_stays_available() -> None:
    cfg = service(StaticDiscovery(FOUR), outlier_detection=outlier(failures=1, percent=100))
    async with started(cfg) as cluster:
        for _ in range(5):
            for e in cluster.endpoints:
                cluster.report(e, False)
        states = [e.state for e in cluster.endpoints]
        assert states.count(EndpointState.EJECTED) == 3
        assert states.count(EndpointState.HEALTHY) == 1
        assert cluster.pick() is not None


async def test_the_last_available_endpoint_is_kept_when_the_others_are_unhealthy() -> None:
    cfg = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier(failures=1, percent=100))
    async with started(cfg) as cluster:
        sick, last = cluster.endpoints
        sick.health.healthy = False  # as active health checks would mark it
        cluster.report(last, False)
        assert last.state == "healthy"
        assert cluster.pick() is last


async def test_failing_endpoint_is_ejected_once_there_is_room() -> None:
    cfg = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier(failures=2, ejection=0.2))
    async with started(cfg) as cluster:
        a, b = cluster.endpoints
        for _ in range(2):
            cluster.report(a, False)
            cluster.report(b, False)
        assert (a.state, b.state) == ("ejected", "healthy")  # 50% of 2 is one
        await eventually(lambda: a.state == "healthy")
        cluster.report(b, False)  # still failing: now it can go
        assert b.state == "ejected"


async def test_repeat_ejections_last_longer() -> None:
    cfg = service(StaticDiscovery(FOUR[:2]), outlier_detection=outlier(failures=1, ejection=0.2))
    async with started(cfg) as cluster:
        e = cluster.endpoints[0]
        cluster.report(e, False)
        assert e.ejection.ejections == 1
        await eventually(lambda: e.state == "healthy")
        cluster.report(e, False)
        assert e.ejection.ejections == 2
        # The second ejection lasts 2 x 0.2 s: still out well after the first one's time.
        await asyncio.sleep(0.25)
        assert e.state == "ejected"
        await eventually(lambda: e.state == "healthy")


def test_ejection_time_multiplies_and_is_capped() -> None:
    detector = OutlierDetector("orders", outlier(ejection=30), TaskOwner("t"), lambda: None)
    assert [detector.ejection_time(n) for n in (1, 2, 5, 10, 11)] == [30, 60, 150, 300, 300]
    short = OutlierDetector("orders", outlier(ejection=0.3), TaskOwner("t"), lambda: None)
    assert short.ejection_time(20) == 3.0  # 10 x ejection_time
    long = OutlierDetector("orders", outlier(ejection=600), TaskOwner("t"), lambda: None)
    assert long.ejection_time(3) == 600  # never shorter than one ejection_time
    # The percentage's share (at least one); the last-available rule applies on top.
    assert [detector.max_ejected(n) for n in (0, 1, 2, 3, 4, 5)] == [0, 1, 1, 1, 2, 2]


async def test_state_survives_updates_and_removed_endpoints_are_forgotten() -> None:
    metrics = Metrics()
    cfg = service(StaticDiscovery(FOUR[:3]), outlier_detection=outlier(failures=1, ejection=30))
    cluster = Cluster(cfg, metrics)
    try:
        await cluster.start()
        a, b, c = cluster.endpoints
        cluster.report(a, False)
        assert a.state == "ejected"
        cluster.set_addresses([a.address, c.address, FOUR[3]])  # b goes, d comes
        assert cluster.endpoints[0] is a and a.state == "ejected"
        assert cluster.endpoints[2].state == "healthy"
        cluster.report(b, False)  # a late report for a removed endpoint is ignored
        assert b.state == "healthy"
        cluster.set_addresses([c.address])  # the ejected one goes: its timer is stopped
        assert endpoint_gauge(metrics, "ejected") == 0
        # No discovery task, no timer (the owner is private: nothing else needs the count).
        await eventually(lambda: len(cluster._owner) == 0)  # noqa: SLF001
    finally:
        await cluster.close()


def test_outlier_detection_is_on_by_default() -> None:
    assert service_defaults().outlier_detection == OutlierDetectionConfig()


def service_defaults() -> ServiceConfig:
    return ServiceConfig(name="orders", discovery=StaticDiscovery(FOUR[:1]))
