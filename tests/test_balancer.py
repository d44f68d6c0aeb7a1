"""Balancers over a cluster's endpoints (spread, preference, skipping) and the Cluster seam."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import addresses, endpoint_gauge, eventually, service, updates

from sidecar.cluster import Cluster
from sidecar.cluster.balancer import LeastRequest, RandomBalancer, RoundRobin, make_balancer
from sidecar.config.model import Address, FileDiscovery, LoadBalancerKind, StaticDiscovery
from sidecar.discovery import DiscoverySink
from sidecar.endpoint import Endpoint
from sidecar.metrics import Metrics

FOUR = addresses("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004")


def cluster(kind: LoadBalancerKind, addrs: tuple[Address, ...] = FOUR) -> Cluster:
    return Cluster(service(StaticDiscovery(addrs), load_balancer=kind), Metrics())


def picks(c: Cluster, n: int, exclude: list[Endpoint] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        e = c.pick(exclude or ())
        assert e is not None
        counts[e.key] += 1
    return counts


def test_round_robin_spreads_evenly() -> None:
    c = cluster("round_robin")
    assert picks(c, 400) == {e.key: 100 for e in c.endpoints}


def test_round_robin_skips_unavailable_and_stays_even() -> None:
    c = cluster("round_robin")
    a, b, d, e = c.endpoints
    b.health.healthy = False
    d.ejection.ejected = True
    counts = picks(c, 200)
    # The skipped endpoints' turns are not handed to their neighbours: still 50/50.
    assert counts == {a.key: 100, e.key: 100}


@pytest.mark.parametrize("kind", ["round_robin", "least_request", "random"])
def test_every_balancer_skips_unhealthy_and_ejected(kind: LoadBalancerKind) -> None:
    c = cluster(kind)
    a, b, d, e = c.endpoints
    a.health.healthy = False
    b.ejection.ejected = True
    d.health.healthy = False
    d.ejection.ejected = True
    assert set(picks(c, 100)) == {e.key}


@pytest.mark.parametrize("kind", ["round_robin", "least_request", "random"])
def test_none_when_nothing_is_available(kind: LoadBalancerKind) -> None:
    c = cluster(kind)
    for e in c.endpoints:
        e.health.healthy = False
    assert c.pick() is None
    assert cluster(kind, ()).pick() is None


@pytest.mark.parametrize("kind", ["round_robin", "least_request", "random"])
def test_retries_prefer_an_endpoint_not_tried_yet(kind: LoadBalancerKind) -> None:
    c = cluster(kind)
    a, b, d, e = c.endpoints
    tried = [a, b]
    assert set(picks(c, 200, tried)) <= {d.key, e.key}
    # When every available endpoint was tried, an already tried one is better than none.
    d.health.healthy = False
    e.ejection.ejected = True
    assert set(picks(c, 50, tried)) <= {a.key, b.key}
    a.health.healthy = False
    assert set(picks(c, 20, tried)) == {b.key}


def test_least_request_prefers_the_less_busy_endpoint() -> None:
    c = cluster("least_request", FOUR[:2])
    busy, idle = c.endpoints
    busy.in_flight = 5
    # With two endpoints both are always drawn: the idle one wins every time.
    assert picks(c, 100) == {idle.key: 100}
    busy.in_flight, idle.in_flight = 0, 3
    assert picks(c, 100) == {busy.key: 100}


def test_least_request_power_of_two_choices_over_three() -> None:
    c = Cluster(
        service(StaticDiscovery(FOUR[:3]), load_balancer="least_request"),
        Metrics(),
        balancer=LeastRequest(random.Random(7)),
    )
    idle, medium, busiest = c.endpoints
    medium.in_flight, busiest.in_flight = 3, 9
    counts = picks(c, 600)
    # The busiest only wins a draw against itself, which two distinct draws rule out;
    # the idle one wins 2 of the 3 possible pairs.
    assert counts[busiest.key] == 0
    assert counts[idle.key] > counts[medium.key] > 0


def test_random_covers_all_endpoints() -> None:
    c = cluster("random")
    counts = picks(c, 400)
    assert set(counts) == {e.key for e in c.endpoints}
    # Roughly uniform: each expected 100; these bounds fail with negligible probability.
    assert all(40 < n < 160 for n in counts.values())


def test_make_balancer_names() -> None:
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("least_request"), LeastRequest)
    assert isinstance(make_balancer("random"), RandomBalancer)
    with pytest.raises(ValueError, match="unknown"):
        make_balancer("fastest")  # type: ignore[arg-type]  # an unknown name is the point


def test_endpoint_state_and_availability() -> None:
    e = Endpoint(Address("::1", 8080))
    assert e.key == "[::1]:8080"
    assert (e.state, e.available) == ("healthy", True)
    e.ejection.ejected = True
    assert (e.state, e.available) == ("ejected", False)
    e.health.healthy = False
    assert (e.state, e.available) == ("unhealthy", False)


def test_updates_keep_state_of_staying_endpoints_and_new_ones_start_healthy() -> None:
    metrics = Metrics()
    c = Cluster(service(StaticDiscovery(FOUR[:2])), metrics)
    a, b = c.endpoints
    a.in_flight, b.health.healthy = 4, False
    c.set_addresses([FOUR[1], FOUR[2]])
    kept, new = c.endpoints
    assert kept is b and not kept.health.healthy
    assert new.address == FOUR[2] and new.state == "healthy" and new.in_flight == 0
    assert a not in c.endpoints
    assert endpoint_gauge(metrics, "healthy") == 1
    assert endpoint_gauge(metrics, "unhealthy") == 1
    assert endpoint_gauge(metrics, "ejected") == 0


def test_static_snapshot_and_metrics() -> None:
    metrics = Metrics()
    c = Cluster(service(StaticDiscovery(FOUR[:2]), load_balancer="random"), metrics)
    snap = c.snapshot()
    assert snap["endpoints"] == [
        {"address": "127.0.0.1:9001", "state": "healthy", "in_flight": 0, "ejections": 0},
        {"address": "127.0.0.1:9002", "state": "healthy", "in_flight": 0, "ejections": 0},
    ]
    assert snap["discovery"]["source"] == "static"
    assert snap["discovery"]["last_error"] is None
    assert snap["load_balancer"] == "random"
    assert endpoint_gauge(metrics, "healthy") == 2


async def test_static_start_and_close_return_at_once() -> None:
    c = cluster("round_robin")
    await c.start()
    assert c.pick() is not None
    await c.close()


def test_round_robin_retries_do_not_move_the_rotation() -> None:
    c = cluster("round_robin", FOUR[:2])
    broken, good = c.endpoints
    first_attempts: Counter[str] = Counter()
    for _ in range(10):
        first = c.pick()
        assert first is not None
        first_attempts[first.key] += 1
        if first is broken:
            assert c.pick([broken]) is good  # the retry goes to the other endpoint
    # The failing endpoint still gets only its share of first attempts.
    assert first_attempts == {broken.key: 5, good.key: 5}


def test_round_robin_retry_takes_the_next_untried_endpoint() -> None:
    c = cluster("round_robin")
    a, b, d, _ = c.endpoints
    assert c.pick() is a
    assert c.pick([a]) is b
    assert c.pick([a, b]) is d
    assert c.pick() is b  # first attempts carry on in order


class CrashOnce:
    """A discovery source (the DiscoverySource protocol) whose first run crashes."""

    kind = "crashy"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, sink: DiscoverySink) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("boom")
        sink.discovered(FOUR[:1])
        await asyncio.Event().wait()  # watch forever, like a real source

    def describe(self) -> dict[str, Any]:
        return {"runs": self.runs}


async def test_a_crashed_source_is_counted_and_restarted() -> None:
    metrics = Metrics()
    source = CrashOnce()
    c = Cluster(service(FileDiscovery(Path("/nonexistent"))), metrics, source=source)
    try:
        await c.start()
        assert c.last_error == "crashy discovery crashed: RuntimeError('boom')"
        assert updates(metrics, "failure") == 1
        await eventually(lambda: [e.key for e in c.endpoints] == ["127.0.0.1:9001"])
        assert c.snapshot()["discovery"] == {
            "source": "crashy",
            "last_update": c.last_update,
            "last_error": None,
            "last_error_at": c.last_error_at,
            "consecutive_failures": 0,
            "runs": 2,
        }
    finally:
        await c.close()
