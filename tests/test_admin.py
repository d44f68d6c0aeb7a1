"""Admin endpoints and metrics (docs/contract.md#admin-endpoints, #metrics)."""

from __future__ import annotations

from helpers import one_service
from prometheus_client.parser import text_string_to_metric_families


async def test_health_ready_state_and_config(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.admin_url}/healthz") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.admin_url}/readyz") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.admin_url}/admin/state") as resp:
        state = await resp.json()
    api = state["services"]["api"]
    assert api["breaker"]["state"] == "closed"
    assert isinstance(api["breaker"]["since"], float)
    assert api["breaker"]["last_failure"] is None
    assert api["in_flight"] == 0
    # The keys the contract names, with their values; more keys are welcome.
    assert [{k: e[k] for k in ("address", "state", "in_flight")} for e in api["endpoints"]] == [
        {"address": up.address, "state": "healthy", "in_flight": 0}
    ]
    async with client.get(f"{sc.admin_url}/admin/config") as resp:
        config = await resp.json()
    assert config["routes"][0]["name"] == "api"
    assert config["listen"] == f"127.0.0.1:{sc.listen}"


async def test_metrics_have_breaker_series_from_start(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for state, value in (("closed", 1.0), ("open", 0.0), ("half_open", 0.0)):
        key = ("sidecar_circuit_breaker_state", (("service", "api"), ("state", state)))
        assert samples[key] == value
    assert samples[("sidecar_endpoints", (("service", "api"), ("state", "healthy")))] == 1.0
    async with client.get(
        f"{sc.admin_url}/metrics", headers={"Accept": "application/openmetrics-text"}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).rstrip().endswith("# EOF")


async def test_request_metrics_are_exact(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    for _ in range(3):
        async with client.get(f"{sc.url}/api") as resp:
            assert resp.status == 200
    async with client.get(f"{sc.url}/missing") as resp:
        assert resp.status == 404
    assert sc.sample("sidecar_requests_total", route="api", service="api", code="200") == 3
    assert sc.sample("sidecar_request_duration_seconds_count", route="api", service="api") == 3
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total", service="api", endpoint=up.address, result="2xx"
        )
        == 3
    )
    assert sc.sample("sidecar_requests_in_flight", service="api") == 0
    # Label values come from config only: the unknown path left no series behind.
    text = sc.metrics.registry
    names = {s.labels.get("route") for m in text.collect() for s in m.samples}
    assert "/missing" not in names
