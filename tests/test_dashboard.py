"""The dashboard's numbers: the pure window, the sampler over a real registry, and the JSON
and page a real sidecar serves (the browser side is in test_dashboard_browser.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import ROOT

from sidecar.admin.app import SAMPLER_KEY
from sidecar.dashboard.sampler import Sampler, read_totals
from sidecar.dashboard.window import HISTORY, ServiceWindow, Totals, quantile
from sidecar.demo import _instructions
from sidecar.metrics import DURATION_BUCKETS, Metrics

BOUNDS = tuple(float(b) for b in DURATION_BUCKETS)


def strict_json(text: str):
    def no_constants(name: str):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constants)


async def eventually(check, *, attempts: int = 100, pause: float = 0.1):
    """Call `check()` (async) until it returns a truthy value; fail after `attempts`."""
    for _ in range(attempts):
        result = await check()
        if result:
            return result
        await asyncio.sleep(pause)
    raise AssertionError(f"condition not met after {attempts} tries: last {result!r}")


# --- window.py: pure ------------------------------------------------------------------------


def test_quantile_interpolates_like_histogram_quantile():
    bounds = (0.1, 0.2, 0.4)
    # 10 observations: 4 <= 0.1, 4 in (0.1, 0.2], 2 in (0.2, 0.4], none above.
    counts = (4.0, 8.0, 10.0, 10.0)
    assert quantile(0.5, bounds, counts) == pytest.approx(0.125)  # rank 5: 1/4 into bucket 2
    assert quantile(0.4, bounds, counts) == pytest.approx(0.1)  # rank 4: top of bucket 1
    assert quantile(0.99, bounds, counts) == pytest.approx(0.2 + 0.2 * (9.9 - 8) / 2)
    assert quantile(0.1, bounds, counts) == pytest.approx(0.025)  # first bucket starts at 0
    # A rank in the +Inf bucket answers the largest finite bound, as Prometheus does.
    assert quantile(0.99, bounds, (0.0, 0.0, 1.0, 5.0)) == 0.4
    assert quantile(0.5, bounds, (0.0, 0.0, 0.0, 0.0)) is None
    assert quantile(0.5, bounds, (1.0,)) is None  # counts that do not fit the bounds
    # A reading that is not monotonic (not atomic across buckets) is read as if it were.
    assert quantile(0.5, bounds, (4.0, 3.0, 10.0, 10.0)) == pytest.approx(0.2 + 0.2 * 1 / 6)


def totals(requests=0.0, errors=0.0, retries=0.0, exhausted=0.0, rejected=0.0, buckets=None):
    return Totals(requests, errors, retries, exhausted, rejected, buckets or (0.0,) * 15)


def test_window_rates_shares_and_sparkline():
    w = ServiceWindow()
    assert w.summary(BOUNDS)["rate"] is None  # nothing to difference yet
    w.add(100.0, totals())
    assert w.summary(BOUNDS)["rate"] is None
    # Cumulative bucket counts: twenty requests under 1 ms, then twenty above 30 s.
    w.add(101.0, totals(20, 5, 4, 1, 2, (20.0,) * 15))
    w.add(102.0, totals(40, 10, 6, 1, 2, (20.0,) * 14 + (40.0,)))
    s = w.summary(BOUNDS)
    assert s["window_seconds"] == 2.0
    assert s["rate"] == 20.0
    assert s["error_share"] == 0.25
    assert s["retries"] == {"per_second": 3.0, "total": 6}
    assert s["budget_exhausted"] == {"per_second": 0.5, "total": 1}
    assert s["rejected"] == {"per_second": 1.0, "total": 2}
    assert s["requests_total"] == 40
    assert s["p50_ms"] == 1.0  # rank 20 of 40: the top of the first bucket
    # The last twenty are above the top bound: p99 reads the largest finite bound.
    assert s["p99_ms"] == 30_000.0
    assert s["sparkline"] == {"rate": [20.0, 20.0], "errors": [5.0, 5.0]}


def test_window_covers_the_last_ten_seconds_and_keeps_one_minute():
    w = ServiceWindow()
    for t in range(200):
        w.add(float(t), totals(requests=t * 2.0))
    assert len(w) == HISTORY
    s = w.summary(BOUNDS)
    assert s["window_seconds"] == 10.0
    assert s["rate"] == 2.0
    sparkline = s["sparkline"]
    assert isinstance(sparkline, dict)
    assert sparkline["rate"] == [2.0] * (HISTORY - 1)
    assert s["error_share"] == 0.0


def test_window_treats_a_counter_that_went_down_as_restarted():
    w = ServiceWindow()
    w.add(0.0, totals(requests=100))
    w.add(1.0, totals(requests=3))
    assert w.summary(BOUNDS)["rate"] == 3.0


def test_no_requests_means_no_share_and_no_latency():
    w = ServiceWindow()
    w.add(0.0, totals())
    w.add(1.0, totals())
    s = w.summary(BOUNDS)
    assert s["rate"] == 0.0
    assert s["error_share"] is None
    assert s["p50_ms"] is None and s["p99_ms"] is None


# --- sampler.py over a real registry, with a hand-driven clock ------------------------------


@dataclass
class FakeRuntime:
    """The part of a `Runtime` the sampler reads: which services there are."""

    services: dict[str, None]


def test_sampler_reads_the_registry_per_service_and_follows_the_services():
    metrics = Metrics()
    runtime = FakeRuntime({"orders": None, "payments": None})
    clock = [0.0]
    sampler = Sampler(metrics, lambda: runtime, clock=lambda: clock[0])
    sampler.tick()
    for route, code, n in [("read", "200", 6), ("write", "200", 2), ("write", "503", 2)]:
        metrics.requests.labels(route, "orders", code).inc(n)
    metrics.requests.labels("pay", "payments", "502").inc(4)
    metrics.retries.labels("read", "orders").inc(3)
    metrics.retry_budget_exhausted.labels("write", "orders").inc(1)
    metrics.breaker_rejected.labels("payments").inc(5)
    metrics.overloaded.labels("payments").inc(1)
    for _ in range(9):
        metrics.request_duration.labels("read", "orders").observe(0.003)
    metrics.request_duration.labels("write", "orders").observe(2.0)
    clock[0] = 2.0
    sampler.tick()

    snapshot = {
        "services": {
            name: {
                "breaker": {"state": "closed", "since": 1.0, "last_failure": None},
                "in_flight": 0,
                "max_requests": 10,
                "endpoint_counts": {"healthy": 2, "unhealthy": 1, "ejected": 0},
            }
            for name in ("orders", "payments")
        },
        "routes": [
            {"name": "read", "service": "orders"},
            {"name": "write", "service": "orders"},
            {"name": "pay", "service": "payments"},
        ],
    }
    view = sampler.view(snapshot)
    orders, payments = view["services"]
    assert orders["name"] == "orders" and orders["routes"] == ["read", "write"]
    assert orders["rate"] == 5.0
    assert orders["error_share"] == 0.2
    assert orders["retries"] == {"per_second": 1.5, "total": 3}
    assert orders["budget_exhausted"] == {"per_second": 0.5, "total": 1}
    assert orders["p50_ms"] == round(2.5 + 2.5 * 5 / 9, 3)  # rank 5 of 10, in (2.5, 5] ms
    assert orders["endpoints"] == {"healthy": 2, "unhealthy": 1, "ejected": 0}
    assert payments["error_share"] == 1.0
    assert payments["rejected"] == {"per_second": 3.0, "total": 6}
    assert payments["p50_ms"] is None  # requests counted, but no duration observed
    strict_json(json.dumps(view))

    runtime.services = {"payments": None, "search": None}  # a reload
    clock[0] = 3.0
    sampler.tick()
    assert set(sampler.windows) == {"payments", "search"}
    assert len(sampler.windows["search"]) == 1


def test_read_totals_sums_routes_and_buckets():
    metrics = Metrics()
    metrics.request_duration.labels("a", "s").observe(0.0005)
    metrics.request_duration.labels("b", "s").observe(100.0)  # above every bound: +Inf only
    got = read_totals(metrics, ["s", "absent"])
    assert got["s"].buckets[0] == 1.0
    assert got["s"].buckets[-2] == 1.0  # <= 30 s: only the fast one
    assert got["s"].buckets[-1] == 2.0
    assert got["absent"] == Totals(buckets=(0.0,) * (len(DURATION_BUCKETS) + 1))


# --- a real sidecar --------------------------------------------------------------------------


async def dashboard_json(client, sc) -> dict[str, Any]:
    async with client.get(f"{sc.admin_url}/admin/dashboard.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.headers["Cache-Control"] == "no-store"
        view: dict[str, Any] = strict_json(await resp.text())
        return view


def service(view: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any]
    (found,) = [s for s in view["services"] if s["name"] == name]
    return found


async def test_dashboard_json_counts_a_real_sidecars_traffic(upstream, sidecar, client):
    async def mixed(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if request.path.startswith("/bad") else 200)

    up = await upstream(mixed)
    sc = await sidecar(f"""
    services:
      shop:
        endpoints: ["{up.address}"]
        max_requests: 7
        circuit_breaker: {{ failure_threshold: 50 }}
    routes:
      - name: shop
        match: {{ prefix: / }}
        service: shop
        retries: {{ max_retries: 2, backoff: {{ base: 1ms, max: 2ms }} }}
    """)
    for path in ["/ok", "/ok", "/ok", "/bad"]:
        async with client.get(f"{sc.url}{path}") as resp:
            await resp.read()
    assert up.hits == 6  # /bad was tried three times

    async def counted():
        view = await dashboard_json(client, sc)
        shop = service(view, "shop")
        return shop if shop["requests_total"] == 4 else None

    shop = await eventually(counted)
    # The whole test ran inside the first window, so the window holds every request.
    assert shop["error_share"] == 0.25
    assert shop["retries"]["total"] == 2
    assert shop["rate"] > 0
    assert 0 < shop["p50_ms"] <= shop["p99_ms"]
    assert shop["max_requests"] == 7 and shop["in_flight"] == 0
    assert shop["endpoints"] == {"healthy": 1, "unhealthy": 0, "ejected": 0}
    assert shop["breaker"]["state"] == "closed"
    assert shop["breaker"]["last_failure"].startswith("HTTP 503")
    assert sum(shop["sparkline"]["rate"]) > 0


async def test_dashboard_json_shows_breaker_refusals_and_in_flight(upstream, sidecar, client):
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/hold":
            await asyncio.wait_for(release.wait(), 20)
            return web.Response(text="held")
        return web.Response(status=503)

    up = await upstream(handler)
    sc = await sidecar(f"""
    services:
      pay:
        endpoints: ["{up.address}"]
        circuit_breaker: {{ failure_threshold: 2, reset_timeout: 30s }}
      hold:
        endpoints: ["{up.address}"]
    routes:
      - {{ name: hold, match: {{ prefix: /hold }}, service: hold }}
      - {{ name: pay, match: {{ prefix: / }}, service: pay, retries: {{ max_retries: 0 }} }}
    """)
    for _ in range(5):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 503
    held = asyncio.create_task(client.get(f"{sc.url}/hold"))
    try:

        async def seen():
            view = await dashboard_json(client, sc)
            pay, hold = service(view, "pay"), service(view, "hold")
            done = pay["rejected"]["total"] == 3 and hold["in_flight"] == 1
            return (pay, hold) if done else None

        pay, hold = await eventually(seen)
        assert pay["breaker"]["state"] == "open"
        assert pay["error_share"] == 1.0
        assert hold["in_flight"] == 1
    finally:
        release.set()
        resp = await held
        resp.release()


async def test_budget_refusals_reach_the_dashboard(upstream, sidecar, client):
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    up = await upstream(fail)
    sc = await sidecar(f"""
    services:
      api:
        endpoints: ["{up.address}"]
        circuit_breaker: {{ failure_threshold: 1000 }}
    routes:
      - name: api
        match: {{ prefix: / }}
        service: api
        retries:
          max_retries: 2
          backoff: {{ base: 1ms, max: 2ms }}
          budget: {{ ratio: 0.0, min_per_second: 0 }}
    """)
    for _ in range(3):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 503
    expected = sc.sample("sidecar_retry_budget_exhausted_total", route="api", service="api")
    assert expected >= 3  # at least one refused retry per request

    async def counted():
        api = service(await dashboard_json(client, sc), "api")
        return api if api["budget_exhausted"]["total"] == expected else None

    api = await eventually(counted)
    assert api["retries"]["total"] == 0
    assert api["budget_exhausted"]["per_second"] > 0


async def test_services_come_and_go_with_a_reload_and_the_sampler_stops_with_the_server(
    upstream, sidecar, client
):
    up = await upstream()

    def body(names: list[str]) -> str:
        services = "".join(f'  {n}:\n    endpoints: ["{up.address}"]\n' for n in names)
        routes = "".join(f"  - {{ match: {{ prefix: /{n} }}, service: {n} }}\n" for n in names)
        return f"services:\n{services}routes:\n{routes}"

    sc = await sidecar(body(["alpha", "beta"]))
    sampler = sc.sidecar.admin_app[SAMPLER_KEY]
    view = await dashboard_json(client, sc)
    assert [s["name"] for s in view["services"]] == ["alpha", "beta"]
    head = "\n".join(sc.config_path.read_text().splitlines()[:3])
    sc.config_path.write_text(head + "\n" + body(["beta", "gamma"]))
    async with client.post(f"{sc.admin_url}/admin/reload") as resp:
        assert resp.status == 200
    view = await dashboard_json(client, sc)
    assert [s["name"] for s in view["services"]] == ["beta", "gamma"]

    async def windows_follow():
        return set(sampler.windows) == {"beta", "gamma"}

    await eventually(windows_follow)

    def sampler_tasks():
        return [t for t in asyncio.all_tasks() if t.get_name() == "admin:dashboard-sampler"]

    assert len(sampler_tasks()) == 1
    await sc.sidecar.stop()
    assert sampler_tasks() == []


async def test_escaping_is_the_pages_job_and_the_json_carries_text_verbatim(
    upstream, sidecar, client
):
    up = await upstream()
    evil = '</script><img src=x onerror="alert(1)">'
    quoted = evil.replace('"', '\\"')
    sc = await sidecar(f"""
    services:
      api: {{ endpoints: ["{up.address}"] }}
    routes:
      - {{ name: "{quoted}", match: {{ prefix: / }}, service: api }}
    """)
    async with client.get(f"{sc.admin_url}/admin/dashboard.json") as resp:
        text = await resp.text()
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert service(strict_json(text), "api")["routes"] == [evil]


async def test_the_page_is_self_contained_and_its_csp_allows_only_its_own_script(
    upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(f"""
    services:
      api: {{ endpoints: ["{up.address}"] }}
    routes:
      - {{ match: {{ prefix: / }}, service: api }}
    """)
    async with client.get(f"{sc.admin_url}/dashboard") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
    # No external asset of any kind: no URL with a scheme or host, no CSS import or url().
    refs = re.findall(r"""\b(?:src|href)\s*=\s*(["']?)([^"'\s>]*)\1""", html)
    assert refs == [('"', "data:,")], refs  # only the empty favicon, so none is fetched
    assert "@import" not in html and "url(" not in html
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # The page renders names with textContent only: no HTML-parsing sinks in its script.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in scripts[0], sink


def test_demo_prints_the_dashboard_url():
    from sidecar.config import load_config

    config, _ = load_config(ROOT / "config" / "sidecar.yaml")
    text = _instructions(config)
    assert f"http://{config.admin}/dashboard" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_ships_the_page(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("sidecar-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "sidecar/dashboard/dashboard.html" in zf.namelist()
        assert (
            zf.read("sidecar/dashboard/dashboard.html")
            == (ROOT / "sidecar" / "dashboard" / "dashboard.html").read_bytes()
        )
