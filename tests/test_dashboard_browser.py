"""The dashboard page in a real browser: Debian's Chromium, headless, driven by Playwright.

The page is loaded from a real in-process sidecar, real upstreams misbehave behind it, and
the tests read the DOM as a person would read the screen: one tile per service, the tile
turning red when its breaker opens, names shown as text, tiles following a reload, twenty
services on one laptop screen. Every test also asserts the page logged no console error
and raised no page error.

`make test` installs chromium (scripts/install-system-deps.sh); the tests skip, saying so,
only where /usr/bin/chromium is absent. Playwright drives that binary; its own browser
downloads (`playwright install`) are never used.

SIDECAR_UPDATE_SCREENSHOT=1 makes the demo test write docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from helpers import ROOT, free_port

from sidecar.demo import DEMO_UPSTREAMS, build_demo_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"

pytestmark = [pytest.mark.external, pytest.mark.timeout(120)]


@dataclass
class Browser:
    page: Any  # playwright.async_api.Page
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.errors == [], f"page errors: {self.errors}"
        assert self.console == [], f"console errors and warnings: {self.console}"

    async def tiles(self) -> list[str]:
        names: list[str] = await self.page.eval_on_selector_all(
            "section.tile", "els => els.map(e => e.dataset.service)"
        )
        return names

    async def wait_for_tiles(self, names: list[str], timeout_ms: int = 15000) -> None:
        await self.page.wait_for_function(
            "names => JSON.stringify([...document.querySelectorAll('section.tile')]"
            ".map(e => e.dataset.service)) === JSON.stringify(names)",
            arg=names,
            timeout=timeout_ms,
        )

    async def wait_for_state(self, service: str, state: str, timeout_ms: int = 15000) -> None:
        await self.page.wait_for_function(
            "([name, state]) => [...document.querySelectorAll('section.tile')]"
            ".some(e => e.dataset.service === name && e.dataset.state === state)",
            arg=[service, state],
            timeout=timeout_ms,
        )

    async def tile(self, service: str) -> Any:
        tile = self.page.locator("section.tile").filter(
            has=self.page.locator(".name", has_text=re.compile(f"^{re.escape(service)}$"))
        )
        assert await tile.count() == 1, service
        return tile


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium; make system-deps)")
    from playwright.async_api import async_playwright

    profile = tmp_path / "chromium-profile"  # a fresh user-data-dir for every test
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            b = Browser(page)

            def on_console(msg: Any) -> None:
                if msg.type in ("error", "warning"):
                    b.console.append(f"{msg.type}: {msg.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda exc: b.errors.append(str(exc)))
            yield b
        finally:
            await context.close()


async def _statuses(client, url: str, n: int, pause: float = 0.0) -> list[int]:
    statuses = []
    for _ in range(n):
        async with client.get(url) as resp:
            await resp.read()
            statuses.append(resp.status)
        if pause:
            await asyncio.sleep(pause)
    return statuses


async def always_503(request: web.Request) -> web.StreamResponse:
    return web.Response(status=503, text="down")


async def test_one_tile_per_service_and_an_open_breaker_turns_its_tile_red(
    upstream, sidecar, client, browser
):
    down = await upstream(always_503)
    ok = await upstream()
    sc = await sidecar(f"""
    services:
      payments:
        endpoints: ["{down.address}"]
        circuit_breaker: {{ failure_threshold: 2, reset_timeout: 30s }}
      catalog:
        endpoints: ["{ok.address}"]
      search:
        endpoints: ["{ok.address}"]
    routes:
      - {{ name: pay, match: {{ prefix: /pay }}, service: payments, retries: {{ max_retries: 0 }} }}
      - {{ name: catalog, match: {{ prefix: /catalog }}, service: catalog }}
      - {{ name: search, match: {{ prefix: /search }}, service: search }}
    """)
    page = browser.page
    await page.goto(f"{sc.admin_url}/dashboard")
    await browser.wait_for_tiles(["payments", "catalog", "search"])
    await browser.wait_for_state("payments", "closed")
    assert await (await browser.tile("payments")).locator(".state").inner_text() != ""

    assert await _statuses(client, f"{sc.url}/catalog/1", 3) == [200, 200, 200]
    # The always-503 upstream trips the breaker at the second failure; then it fails fast.
    assert await _statuses(client, f"{sc.url}/pay/1", 4) == [503, 503, 503, 503]
    assert down.hits == 2

    await browser.wait_for_state("payments", "open")
    payments = await browser.tile("payments")
    assert (await payments.locator(".state").inner_text()).lower().startswith("open")
    assert "HTTP 503" in await payments.locator(".why").inner_text()
    colours = await page.eval_on_selector_all(
        "section.tile",
        "els => Object.fromEntries(els.map(e => "
        "[e.dataset.service, getComputedStyle(e).borderTopColor]))",
    )
    assert colours == {
        "payments": "rgb(198, 40, 40)",  # red
        "catalog": "rgb(46, 125, 50)",  # green
        "search": "rgb(46, 125, 50)",
    }
    # The failed-fast counter and the error share reach the tile (bounded wait, then read).
    await page.wait_for_function(
        "() => [...document.querySelectorAll('section.tile')].some(e => "
        "e.dataset.service === 'payments' && "
        "e.querySelector('.stat:nth-child(7) small').textContent === ' Σ2')",
        timeout=15000,
    )
    assert await payments.locator(".stat").nth(1).locator("b").inner_text() == "100.0%"
    endpoints = payments.locator(".endpoints")
    assert await endpoints.get_attribute("data-healthy") == "1"
    browser.assert_clean()


async def test_half_open_is_amber(upstream, sidecar, client, browser):
    release = asyncio.Event()
    calls = []

    async def fail_then_hold(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        if len(calls) == 1:
            return web.Response(status=503, text="down")
        await asyncio.wait_for(release.wait(), 30)  # the trial call, held open
        return web.Response(text="back")

    up = await upstream(fail_then_hold)
    sc = await sidecar(f"""
    services:
      payments:
        endpoints: ["{up.address}"]
        circuit_breaker: {{ failure_threshold: 1, reset_timeout: 1s }}
    routes:
      - {{ match: {{ prefix: / }}, service: payments, retries: {{ max_retries: 0 }} }}
    """)
    await browser.page.goto(f"{sc.admin_url}/dashboard")
    await browser.wait_for_tiles(["payments"])
    assert await _statuses(client, f"{sc.url}/x", 1) == [503]
    await browser.wait_for_state("payments", "open")
    for _ in range(100):  # until the open period is over (bounded)
        async with client.get(f"{sc.admin_url}/admin/state") as resp:
            breaker = (await resp.json())["services"]["payments"]["breaker"]
        if breaker["state"] == "half_open" or not breaker["retry_after"]:
            break
        await asyncio.sleep(0.05)
    trial = asyncio.create_task(_statuses(client, f"{sc.url}/x", 1))
    try:
        await browser.wait_for_state("payments", "half_open")
        colour = await browser.page.eval_on_selector(
            "section.tile", "e => getComputedStyle(e).borderTopColor"
        )
        assert colour == "rgb(224, 155, 0)"  # amber
    finally:
        release.set()
    assert await trial == [200]
    await browser.wait_for_state("payments", "closed")
    browser.assert_clean()


async def test_free_text_is_shown_as_text_never_run(upstream, sidecar, client, browser):
    down = await upstream(always_503)
    evil = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    quoted = evil.replace('"', '\\"')
    sc = await sidecar(f"""
    services:
      payments:
        endpoints: ["{down.address}"]
        circuit_breaker: {{ failure_threshold: 1, reset_timeout: 30s }}
    routes:
      - name: "{quoted}"
        match: {{ prefix: / }}
        service: payments
        retries: {{ max_retries: 0 }}
    """)
    assert await _statuses(client, f"{sc.url}/x", 1) == [503]
    page = browser.page
    await page.goto(f"{sc.admin_url}/dashboard")
    await browser.wait_for_state("payments", "open")
    routes = page.locator("section.tile .routes")
    assert await routes.inner_text() == f"routes: {evil}"
    assert await page.locator("section.tile img, section.tile script").count() == 0
    assert await page.evaluate("() => window.__xss") is None
    browser.assert_clean()


async def test_tiles_follow_a_reload(upstream, sidecar, client, browser):
    ok = await upstream()

    def config(names: list[str]) -> str:
        services = "".join(f'  {n}:\n    endpoints: ["{ok.address}"]\n' for n in names)
        routes = "".join(
            f"  - {{ name: {n}, match: {{ prefix: /{n} }}, service: {n} }}\n" for n in names
        )
        return f"services:\n{services}routes:\n{routes}"

    sc = await sidecar(config(["alpha", "beta"]))
    await browser.page.goto(f"{sc.admin_url}/dashboard")
    await browser.wait_for_tiles(["alpha", "beta"])
    head = "\n".join(sc.config_path.read_text().splitlines()[:3])
    sc.config_path.write_text(head + "\n" + config(["beta", "gamma", "delta"]))
    async with client.post(f"{sc.admin_url}/admin/reload") as resp:
        assert resp.status == 200, await resp.text()
    await browser.wait_for_tiles(["beta", "gamma", "delta"])
    browser.assert_clean()


async def test_twenty_services_fit_one_laptop_screen(upstream, sidecar, browser, tmp_path):
    ok = await upstream()
    names = [f"service-{i:02d}" for i in range(20)]
    services = "".join(f'  {n}:\n    endpoints: ["{ok.address}"]\n' for n in names)
    routes = "".join(f"  - {{ match: {{ prefix: /{n} }}, service: {n} }}\n" for n in names)
    sc = await sidecar(f"services:\n{services}routes:\n{routes}")
    page = browser.page
    await page.goto(f"{sc.admin_url}/dashboard")
    await browser.wait_for_tiles(names)
    boxes = await page.eval_on_selector_all(
        "section.tile",
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return [r.left, r.top, r.right, r.bottom]; })",
    )
    # 1440 x 900, a common laptop screen: every tile whole on it, none overlapping.
    for left, top, right, bottom in boxes:
        assert left >= 0 and top >= 0 and right <= 1440 and bottom <= 900, (
            left,
            top,
            right,
            bottom,
        )
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # Nothing is cut to unreadable: the smallest text on a tile is at least 10 px.
    smallest = await page.evaluate(
        "() => Math.min(...[...document.querySelectorAll('section.tile *')]"
        ".filter(e => e.childNodes.length && [...e.childNodes].some(n => n.nodeType === 3))"
        ".map(e => parseFloat(getComputedStyle(e).fontSize)))"
    )
    assert smallest >= 10
    await page.screenshot(path=str(tmp_path / "twenty.png"))
    browser.assert_clean()


# --- the page alone, on data the breaker does not produce yet ---------------------------


def fixed_view(services: list[dict[str, Any]]) -> dict[str, Any]:
    base = {
        "routes": ["r"],
        "endpoints": {"healthy": 1, "unhealthy": 1, "ejected": 1},
        "in_flight": 3,
        "max_requests": 3,
        "window_seconds": 10.0,
        "rate": 12.5,
        "error_share": 0.5,
        "p50_ms": 1.5,
        "p99_ms": 1500.0,
        "retries": {"per_second": 1.0, "total": 7},
        "budget_exhausted": {"per_second": 0.5, "total": 2},
        "rejected": {"per_second": 0.0, "total": 0},
        "requests_total": 100,
        "sparkline": {"rate": [1.0, 2.0, 3.0], "errors": [0.0, 1.0, 0.0]},
    }
    return {
        "generated_at": 1_000_100.0,
        "interval_seconds": 1.0,
        "window_seconds": 10.0,
        "history_points": 60,
        "draining": False,
        "services": [base | s for s in services],
    }


async def test_trip_reason_failure_rate_and_free_text_from_a_newer_breaker(browser):
    """The page shows trip_reason and failure_rate when the breaker reports them, as text."""
    from sidecar.dashboard import page as dashboard_page

    evil = '<img src=x onerror="window.__xss=1">'
    view = fixed_view(
        [
            {
                "name": "payments",
                "breaker": {
                    "state": "open",
                    "since": 1_000_088.0,
                    "trip_reason": "failure_rate" + evil,
                    "failure_rate": 0.625,
                    "last_failure": "HTTP 503 " + evil,
                    "last_failure_at": 1_000_095.0,
                    "retry_after": 2.2,
                },
            },
            {"name": "orders", "breaker": {"state": "closed", "since": 1_000_000.0}},
        ]
    )
    answer = {"status": 200}

    async def json_view(request: web.Request) -> web.Response:
        if answer["status"] != 200:
            return web.json_response({"error": "down"}, status=answer["status"])
        return web.json_response(view)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=dashboard_page.BODY,
            content_type="text/html",
            headers=dashboard_page.HEADERS,
        )

    app = web.Application()
    app.router.add_get("/dashboard", page)
    app.router.add_get("/admin/dashboard.json", json_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        p = browser.page
        await p.goto(f"http://127.0.0.1:{port}/dashboard")
        await browser.wait_for_state("payments", "open")
        payments = await browser.tile("payments")
        assert await payments.locator(".state").inner_text() == "OPEN 12s"
        assert await payments.locator(".why").inner_text() == (
            f"tripped: failure_rate{evil} · trial in 3s · failure rate 62.5% · "
            f"last failure 5s ago: HTTP 503 {evil}"
        )
        orders = await browser.tile("orders")
        assert await orders.locator(".why").inner_text() == "no failures"
        assert await orders.locator(".state").inner_text() == "CLOSED 1m 40s"
        stats = await payments.locator(".stat b").all_inner_texts()
        assert stats == ["12.5", "50.0%", "1.5 ms", "1.50 s", "1.0 Σ7", "0.50 Σ2", "0 Σ0", "3/3"]
        assert await payments.locator(".endpoints").inner_text() == (
            "1 ok · 1 unhealthy · 1 ejected"
        )
        assert await p.locator("section.tile img").count() == 0
        assert await p.evaluate("() => window.__xss") is None
        assert await p.locator("#summary").inner_text() == "2 services · 1 open · 0 half open"
        browser.assert_clean()

        # The sidecar stops answering: the header says so, the last tiles stay.
        answer["status"] = 503
        await p.wait_for_function(
            "() => document.getElementById('status').className === 'stale'", timeout=15000
        )
        assert (await p.locator("#status").inner_text()).startswith("no answer from the sidecar")
        assert await browser.tiles() == ["payments", "orders"]
        assert browser.errors == []
        assert browser.console and all("status of 503" in m for m in browser.console)
    finally:
        await runner.cleanup()


# --- the demo, photographed ---------------------------------------------------------------


async def _demo_upstreams() -> tuple[dict[str, str], list[web.AppRunner]]:
    addresses, runners = {}, []
    for name in DEMO_UPSTREAMS:
        runner = web.AppRunner(build_demo_app(name), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        addresses[name] = f"127.0.0.1:{port}"
        runners.append(runner)
    return addresses, runners


def demo_config(addresses: dict[str, str]) -> str:
    """config/sidecar.yaml as shipped, pointed at the given upstreams (listen and admin are
    set by the `sidecar` fixture)."""
    text = (ROOT / "config" / "sidecar.yaml").read_text()
    text = re.sub(r"^(listen|admin|drain_timeout):.*\n", "", text, flags=re.MULTILINE)
    for name, (host, port) in DEMO_UPSTREAMS.items():
        text = text.replace(f"{host}:{port}", addresses[name])
    # The photo is of the three HTTP services; the gRPC greeter has tests of its own.
    config = yaml.safe_load(text)
    del config["services"]["greeter"]
    config["routes"] = [r for r in config["routes"] if r["service"] != "greeter"]
    return yaml.safe_dump(config, sort_keys=False)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
async def test_demo_dashboard_shows_payments_open_and_orders_retrying(
    sidecar, client, browser, tmp_path
):
    addresses, runners = await _demo_upstreams()
    try:
        sc = await sidecar(demo_config(addresses))
        page = browser.page
        await page.set_viewport_size({"width": 1100, "height": 225})
        await page.goto(f"{sc.admin_url}/dashboard")
        await browser.wait_for_tiles(["catalog", "orders", "payments"])
        # About 12 s of an app's traffic: catalog and orders steadily, payments now and then.
        for i in range(60):
            await _statuses(client, f"{sc.url}/catalog/items", 2)
            await _statuses(client, f"{sc.url}/orders/{i}", 3)
            if i % 3 == 0:
                await _statuses(client, f"{sc.url}/payments/charge", 1)
            await asyncio.sleep(0.2)
        await browser.wait_for_state("payments", "open")
        orders = await browser.tile("orders")
        retries = await orders.locator(".stat").nth(4).locator("small").inner_text()
        assert int(retries.strip().removeprefix("Σ")) > 0, retries
        await page.wait_for_timeout(1200)  # one more refresh, so the last second is drawn
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot))
        assert png_size(shot) == (1100, 225)
        assert shot.stat().st_size < 300_000
        if os.environ.get("SIDECAR_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
        browser.assert_clean()
    finally:
        for runner in runners:
            await runner.cleanup()
