"""Retries end to end: what is retried, where, how often, and what is never retried."""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web
from helpers import free_port


def statuses(*codes: int):
    """A handler answering the given statuses in turn, then 200 forever."""
    queue = list(codes)

    async def handler(request: web.Request) -> web.StreamResponse:
        status = queue.pop(0) if queue else 200
        return web.Response(status=status, text=f"status {status}")

    return handler


async def always(status: int, headers: dict[str, str] | None = None):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=f"upstream says {status}", headers=headers)

    return handler


def config(
    endpoints: list[str],
    retries: str = "",
    route: str = "",
    breaker: str = "",
    max_retries: int = 2,
) -> str:
    eps = ", ".join(f'"{e}"' for e in endpoints)
    return f"""
    services:
      svc:
        endpoints: [{eps}]
        circuit_breaker: {{ failure_threshold: 100 {breaker} }}
    routes:
      - name: r
        match: {{ prefix: / }}
        service: svc
        timeout: 5s
        {route}
        retries: {{ max_retries: {max_retries}, backoff: {{ base: 1ms, max: 5ms }} {retries} }}
    """


async def test_get_retried_on_503_then_succeeds(upstream, sidecar, client):
    up = await upstream(statuses(503))
    sc = await sidecar(config([up.address]))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-attempts"] == "2"
    assert up.hits == 2
    assert [s.headers["x-sidecar-attempt"] for s in up.seen] == ["1", "2"]
    assert sc.sample("sidecar_retries_total", route="r", service="svc") == 1
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total", service="svc", endpoint=up.address, result="5xx"
        )
        == 1
    )


async def test_spent_retries_pass_the_upstream_response_through(upstream, sidecar, client):
    up = await upstream(await always(503, {"X-From": "upstream"}))
    sc = await sidecar(config([up.address]))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
        assert await resp.text() == "upstream says 503"
        assert resp.headers["X-From"] == "upstream"
        assert "x-sidecar-error" not in resp.headers
        assert resp.headers["x-sidecar-attempts"] == "3"
    assert up.hits == 3


async def test_each_retry_goes_to_a_different_endpoint(upstream, sidecar, client):
    bad = await upstream(await always(503))
    good = await upstream()
    sc = await sidecar(config([bad.address, good.address], max_retries=1))
    for _ in range(10):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 200
    # Every request that started on the bad endpoint was retried on the good one.
    assert good.hits == 10
    assert bad.hits == 5


async def test_post_is_not_retried_on_a_status(upstream, sidecar, client):
    up = await upstream(await always(503))
    sc = await sidecar(config([up.address]))
    async with client.post(f"{sc.url}/x", data=b"charge") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-attempts"] == "1"
    async with client.patch(f"{sc.url}/x", data=b"patch") as resp:
        assert resp.headers["x-sidecar-attempts"] == "1"
    assert up.hits == 2


async def test_post_is_retried_after_a_connect_failure(upstream, sidecar, client):
    good = await upstream()
    dead = f"127.0.0.1:{free_port()}"
    sc = await sidecar(config([dead, good.address]))
    for _ in range(4):
        async with client.post(f"{sc.url}/x", data=b"body") as resp:
            assert resp.status == 200
    assert good.hits == 4
    assert [s.body for s in good.seen] == [b"body"] * 4


async def test_post_retried_when_non_idempotent_is_allowed(upstream, sidecar, client):
    up = await upstream(statuses(503))
    sc = await sidecar(config([up.address], retries=", non_idempotent: true"))
    async with client.post(f"{sc.url}/x", data=b"replay me") as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-attempts"] == "2"
    assert [s.body for s in up.seen] == [b"replay me", b"replay me"]


async def test_body_over_the_buffer_limit_is_sent_once_unretried(upstream, sidecar, client):
    up = await upstream(await always(503))
    sc = await sidecar(config([up.address], retries=", max_body_bytes: 1024"))
    big = os.urandom(4096)
    async with client.put(f"{sc.url}/x", data=big) as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-attempts"] == "1"
    small = os.urandom(512)
    async with client.put(f"{sc.url}/x", data=small) as resp:
        assert resp.headers["x-sidecar-attempts"] == "3"
    assert [s.body for s in up.seen] == [big, small, small, small]


async def test_per_try_timeout_retries_on_another_endpoint(upstream, sidecar, client):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    slow = await upstream(hang)
    fast = await upstream()
    sc = await sidecar(config([slow.address, fast.address], retries=", per_try_timeout: 200ms"))
    for _ in range(2):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 200
    assert slow.hits == 1
    assert sc.sample("sidecar_timeouts_total", route="r", service="svc", kind="per_try") == 1


async def test_route_timeout_bounds_every_attempt(upstream, sidecar, client):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    up = await upstream(hang)
    body = config([up.address], retries=", per_try_timeout: 250ms", max_retries=5)
    sc = await sidecar(body.replace("timeout: 5s", "timeout: 600ms"))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 504
        assert resp.headers["x-sidecar-error"] == "timeout"
        attempts = int(resp.headers["x-sidecar-attempts"])
    # Two full per-try windows fit in 600 ms; the third is cut to what is left.
    assert attempts == 3
    assert up.hits == 3
    assert sc.sample("sidecar_timeouts_total", route="r", service="svc", kind="per_try") == 2
    assert sc.sample("sidecar_timeouts_total", route="r", service="svc", kind="route") == 1


async def test_retry_after_is_honoured(upstream, sidecar, client):
    arrivals: list[float] = []
    first = [True]

    async def handler(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        if first[0]:
            first[0] = False
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    up = await upstream(handler)
    sc = await sidecar(config([up.address]))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 200
    assert up.hits == 2
    # The retry waited for what the upstream asked (a lower bound, not a speed limit).
    assert arrivals[1] - arrivals[0] >= 1.0


async def test_retry_after_beyond_the_deadline_means_no_retry(upstream, sidecar, client):
    up = await upstream(await always(503, {"Retry-After": "30"}))
    sc = await sidecar(config([up.address]))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "30"
        assert resp.headers["x-sidecar-attempts"] == "1"
    assert up.hits == 1


async def test_budget_caps_retries_under_an_always_failing_upstream(upstream, sidecar, client):
    up = await upstream(await always(503))
    sc = await sidecar(
        config([up.address], retries=", budget: { ratio: 0.5, min_per_second: 0 }", max_retries=1)
    )
    for _ in range(10):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 503
    # retries + 1 <= 0.5 x requests: the 2nd, 4th, ... request may retry.
    assert up.hits == 15
    assert sc.sample("sidecar_retries_total", route="r", service="svc") == 5
    assert sc.sample("sidecar_retry_budget_exhausted_total", route="r", service="svc") == 5


async def test_max_retries_override_header_lowers_retries(upstream, sidecar, client):
    up = await upstream(await always(503))
    sc = await sidecar(config([up.address]))
    async with client.get(f"{sc.url}/x", headers={"x-sidecar-max-retries": "0"}) as resp:
        assert resp.headers["x-sidecar-attempts"] == "1"
    async with client.get(f"{sc.url}/x", headers={"x-sidecar-max-retries": "99"}) as resp:
        assert resp.headers["x-sidecar-attempts"] == "3"
    assert up.hits == 4


async def test_retry_on_5xx_shorthand_and_unlisted_status(upstream, sidecar, client):
    up = await upstream(statuses(500, 500))
    sc = await sidecar(config([up.address], retries=", retry_on: [5xx]"))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-attempts"] == "3"
    up2 = await upstream(statuses(500))
    sc2 = await sidecar(config([up2.address], retries=", retry_on: [503]"))
    async with client.get(f"{sc2.url}/x") as resp:
        assert resp.status == 500
        assert resp.headers["x-sidecar-attempts"] == "1"


async def test_reset_is_retried(raw_upstream, upstream, sidecar, client):
    async def reset(reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    broken = await raw_upstream(reset)
    good = await upstream()
    sc = await sidecar(config([broken.address, good.address]))
    for _ in range(4):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 200
    assert good.hits == 4
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total",
            service="svc",
            endpoint=broken.address,
            result="reset",
        )
        == 2
    )


async def test_unreachable_after_every_attempt(sidecar, client):
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    sc = await sidecar(config(dead))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_unreachable"
        assert resp.headers["x-sidecar-attempts"] == "3"


async def test_connect_failure_retries_do_not_spend_the_budget(upstream, sidecar, client):
    good = await upstream()
    dead = f"127.0.0.1:{free_port()}"
    sc = await sidecar(
        config([dead, good.address], retries=", budget: { ratio: 0, min_per_second: 0 }")
    )
    # Half the requests start on the dead endpoint; every one of them still succeeds.
    for _ in range(10):
        async with client.post(f"{sc.url}/x", data=b"order") as resp:
            assert resp.status == 200
    assert good.hits == 10
    assert sc.sample("sidecar_retries_total", route="r", service="svc") == 5
    assert sc.sample("sidecar_retry_budget_exhausted_total", route="r", service="svc") == 0
    # A retry that would add load (a 503) is still refused by the empty budget.
    bad = await upstream(await always(503))
    sc2 = await sidecar(config([bad.address], retries=", budget: { ratio: 0, min_per_second: 0 }"))
    async with client.get(f"{sc2.url}/x") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-attempts"] == "1"
    assert sc2.sample("sidecar_retry_budget_exhausted_total", route="r", service="svc") == 1
