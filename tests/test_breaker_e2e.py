"""The circuit breaker end to end: opening, failing fast, half-open trials, closing, fallbacks."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


def breaker_config(address: str, breaker: str, route: str = "", retries: str = "max_retries: 0"):
    return f"""
    services:
      pay:
        endpoints: ["{address}"]
        circuit_breaker: {{ {breaker} }}
    routes:
      - name: pay
        match: {{ prefix: / }}
        service: pay
        timeout: 10s
        retries: {{ {retries}, backoff: {{ base: 1ms, max: 2ms }} }}
        {route}
    """


class Switch:
    """An upstream whose answer the test flips; it can also hold requests until released."""

    def __init__(self, status: int = 503) -> None:
        self.status = status
        self.hold = False
        self.release = asyncio.Event()
        self.held = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.hold:
            self.held += 1
            await asyncio.wait_for(self.release.wait(), 20)
        return web.Response(status=self.status, text=f"upstream {self.status}")


async def state_of(client, sc, service="pay"):
    async with client.get(f"{sc.admin_url}/admin/state") as resp:
        return (await resp.json())["services"][service]["breaker"]


async def test_breaker_opens_fails_fast_and_recovers(upstream, sidecar, client):
    switch = Switch(503)
    up = await upstream(switch.handler)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 3, reset_timeout: 500ms"))
    # Three failures: each is the upstream's own answer, the third trips the breaker.
    for _ in range(3):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 503
            assert await resp.text() == "upstream 503"
    state = await state_of(client, sc)
    assert state["state"] == "open"
    assert "503" in state["last_failure"]
    # Open: rejected without touching the upstream, with Retry-After.
    for _ in range(5):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 503
            assert resp.headers["x-sidecar-error"] == "circuit_open"
            assert resp.headers["x-sidecar-attempts"] == "0"
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["service"] == "pay"
    assert up.hits == 3
    assert sc.sample("sidecar_circuit_breaker_rejected_total", service="pay") == 5
    assert sc.sample("sidecar_circuit_breaker_state", service="pay", state="open") == 1
    assert sc.sample("sidecar_circuit_breaker_state", service="pay", state="closed") == 0
    # After reset_timeout a trial goes through; it succeeds and closes the breaker.
    switch.status = 200
    await asyncio.sleep(0.6)
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 200
    assert (await state_of(client, sc))["state"] == "closed"
    assert up.hits == 4
    t = "sidecar_circuit_breaker_transitions_total"
    assert sc.sample(t, service="pay", from_state="closed", to_state="open") == 1
    assert sc.sample(t, service="pay", from_state="open", to_state="half_open") == 1
    assert sc.sample(t, service="pay", from_state="half_open", to_state="closed") == 1


async def test_half_open_admits_exactly_the_configured_trials(upstream, sidecar, client):
    switch = Switch(503)
    up = await upstream(switch.handler)
    sc = await sidecar(
        breaker_config(
            up.address,
            "failure_threshold: 1, reset_timeout: 300ms, half_open_max_requests: 2, "
            "success_threshold: 2",
        )
    )
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
    assert (await state_of(client, sc))["state"] == "open"
    await asyncio.sleep(0.4)
    switch.status = 200
    switch.hold = True

    async def call() -> tuple[int, str | None]:
        async with client.get(f"{sc.url}/x") as resp:
            await resp.read()
            return resp.status, resp.headers.get("x-sidecar-error")

    calls = [asyncio.ensure_future(call()) for _ in range(10)]
    for _ in range(200):
        if switch.held == 2 and sum(c.done() for c in calls) == 8:
            break
        await asyncio.sleep(0.02)
    assert (await state_of(client, sc))["state"] == "half_open"
    switch.release.set()
    results = await asyncio.gather(*calls)
    assert sorted(results, key=str) == sorted(
        [(200, None)] * 2 + [(503, "circuit_open")] * 8, key=str
    )
    assert up.hits == 3  # the tripping request and the two trials
    assert (await state_of(client, sc))["state"] == "closed"


async def test_failed_trial_reopens(upstream, sidecar, client):
    up = await upstream(Switch(503).handler)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 1, reset_timeout: 300ms"))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
    first_since = (await state_of(client, sc))["since"]
    await asyncio.sleep(0.4)
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
        assert "x-sidecar-error" not in resp.headers  # the trial's own answer
    state = await state_of(client, sc)
    assert state["state"] == "open"
    assert state["since"] > first_since
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.headers["x-sidecar-error"] == "circuit_open"
    assert up.hits == 2


async def test_retries_of_one_request_are_one_failed_request(upstream, sidecar, client):
    # Changed with the request-level consecutive rule: a request's retries used to count
    # as consecutive failures on their own (two attempts opened a threshold-2 breaker);
    # now a request fails once, when its last attempt fails. (The failure-rate rule, which
    # counts attempts, is what stops a request mid-retries: test_resilience_e2e.py.)
    up = await upstream(Switch(503).handler)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 2", retries="max_retries: 5"))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-attempts"] == "6"
    assert (await state_of(client, sc))["state"] == "closed"
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.headers["x-sidecar-attempts"] == "6"
    assert (await state_of(client, sc))["state"] == "open"
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.headers["x-sidecar-error"] == "circuit_open"
    assert up.hits == 12


async def test_4xx_never_opens_the_breaker(upstream, sidecar, client):
    up = await upstream(Switch(429).handler)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 2"))
    for _ in range(6):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 429
    assert (await state_of(client, sc))["state"] == "closed"
    assert up.hits == 6


async def test_failure_status_is_configurable(upstream, sidecar, client):
    up = await upstream(Switch(500).handler)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 2, failure_status: [503]"))
    for _ in range(4):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 500
    assert (await state_of(client, sc))["state"] == "closed"


async def test_connect_errors_and_timeouts_count(upstream, sidecar, client):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    up = await upstream(hang)
    sc = await sidecar(
        breaker_config(up.address, "failure_threshold: 2", route="").replace(
            "timeout: 10s", "timeout: 200ms"
        )
    )
    for _ in range(2):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 504
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.headers["x-sidecar-error"] == "circuit_open"


async def test_app_going_away_is_not_a_failure(upstream, sidecar, client):
    entered = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        entered.set()
        await asyncio.sleep(30)
        return web.Response()

    up = await upstream(hang)
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 1"))
    async with aiohttp.ClientSession() as impatient:
        call = asyncio.ensure_future(impatient.get(f"{sc.url}/x"))
        await asyncio.wait_for(entered.wait(), 10)
        call.cancel()
    for _ in range(100):
        if sc.sidecar.runtime.services["pay"].in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert sc.sidecar.runtime.services["pay"].in_flight == 0
    state = await state_of(client, sc)
    assert state["state"] == "closed"
    assert state["last_failure"] is None


async def test_fallback_served_while_open(upstream, sidecar, client):
    up = await upstream(Switch(503).handler)
    route = """fallback:
          status: 200
          headers: { content-type: application/json, x-degraded: "1" }
          body: '{"items": []}'"""
    sc = await sidecar(breaker_config(up.address, "failure_threshold: 1", route=route))
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 503
    async with client.get(f"{sc.url}/x") as resp:
        assert resp.status == 200
        assert await resp.json() == {"items": []}
        assert resp.headers["x-degraded"] == "1"
        assert resp.headers["x-sidecar-fallback"] == "circuit_open"
        assert resp.headers["x-sidecar-attempts"] == "0"
    assert up.hits == 1
    lines = await sc.access_lines()
    assert lines[-1]["error"] == "circuit_open" and lines[-1]["status"] == 200


async def test_fault_injection_abort_and_delay(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(f"""
    services:
      s: {{ endpoints: ["{up.address}"] }}
    routes:
      - match: {{ prefix: /abort }}
        service: s
        fault: {{ abort: {{ percent: 100, status: 503 }} }}
      - match: {{ prefix: /delay }}
        service: s
        fault: {{ delay: {{ percent: 100, duration: 150ms }} }}
    """)
    async with client.get(f"{sc.url}/abort") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-error"] == "fault_injected"
        assert resp.headers["x-sidecar-attempts"] == "0"
    async with client.get(f"{sc.url}/delay") as resp:
        assert resp.status == 200
    assert up.hits == 1
    lines = await sc.access_lines()
    assert lines[-1]["duration_ms"] >= 150  # the delay happened (a lower bound, no speed limit)
    # Injected aborts never touch the breaker.
    assert sc.sample("sidecar_circuit_breaker_state", service="s", state="closed") == 1
