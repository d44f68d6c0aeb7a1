"""A real Prometheus scrapes the sidecar while a breaker opens and closes again."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from promrunner import prometheus_binary, run_prometheus


@pytest.mark.slow
@pytest.mark.external
@pytest.mark.timeout(120)
async def test_prometheus_sees_the_breaker_open_then_close(upstream, sidecar, client, tmp_path):
    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian package prometheus; make system-deps)")
    mode = {"status": 503}

    async def switch(request: web.Request) -> web.StreamResponse:
        return web.Response(status=mode["status"])

    up = await upstream(switch)
    sc = await sidecar(f"""
    services:
      payments:
        endpoints: ["{up.address}"]
        circuit_breaker: {{ failure_threshold: 2, reset_timeout: 1s }}
    routes:
      - {{ match: {{ prefix: / }}, service: payments, retries: {{ max_retries: 0 }} }}
    """)
    target = f"127.0.0.1:{sc.admin}"
    async with run_prometheus(tmp_path, [target]) as prom:
        await prom.wait_for_targets_up(1)
        await prom.wait_for_value(
            'sidecar_circuit_breaker_state{service="payments", state="closed"}', 1.0
        )
        for _ in range(2):
            async with client.get(f"{sc.url}/pay") as resp:
                assert resp.status == 503
        result = await prom.wait_for_value(
            'sidecar_circuit_breaker_state{service="payments", state="open"}', 1.0
        )
        assert result[0]["metric"]["instance"] == target
        await prom.wait_for_value(
            'sidecar_circuit_breaker_transitions_total{service="payments",'
            ' from_state="closed", to_state="open"}',
            1.0,
        )
        # The upstream recovers; after reset_timeout a trial call closes the breaker.
        mode["status"] = 200
        for _ in range(100):
            async with client.get(f"{sc.url}/pay") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert resp.status == 200
        await prom.wait_for_value(
            'sidecar_circuit_breaker_state{service="payments", state="closed"}', 1.0
        )
        await prom.wait_for_value(
            'sidecar_circuit_breaker_state{service="payments", state="open"}', 0.0
        )
