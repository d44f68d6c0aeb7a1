"""`sidecar demo`: built-in upstreams that misbehave on purpose, then the sidecar itself.

The shipped config/sidecar.yaml points at these addresses, so a newcomer can watch
retries hide a flaky service and the breaker fail fast for a broken one:

    127.0.0.1:19081  catalog   always healthy
    127.0.0.1:19082  orders    one reply in three is a 503 (retries hide it)
    127.0.0.1:19083  payments  always 503 (the breaker opens; the fallback answers)
"""

from __future__ import annotations

import itertools
import json
import sys

from aiohttp import web

from sidecar.config import SidecarConfig
from sidecar.logs import LineWriter
from sidecar.server import run, run_main

DEMO_UPSTREAMS = {
    "catalog": ("127.0.0.1", 19081),
    "orders": ("127.0.0.1", 19082),
    "payments": ("127.0.0.1", 19083),
}


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data) + "\n", content_type="application/json"
    )


def build_demo_app(name: str) -> web.Application:
    counter = itertools.count(1)

    async def handle(request: web.Request) -> web.Response:
        n = next(counter)
        attempt = request.headers.get("x-sidecar-attempt")
        if name == "orders" and n % 3 == 0:
            return _json({"service": name, "error": "flaky: try again"}, status=503)
        if name == "payments":
            return _json({"service": name, "error": "payments is down"}, status=503)
        return _json({"service": name, "path": request.path, "request": n, "attempt": attempt})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"}, status=503 if name == "payments" else 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_demo_upstreams() -> list[web.AppRunner]:
    runners = []
    for name, (host, port) in DEMO_UPSTREAMS.items():
        runner = web.AppRunner(build_demo_app(name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        runners.append(runner)
    return runners


def _instructions(config: SidecarConfig) -> str:
    base = f"http://{config.listen}"
    admin = f"http://{config.admin}"
    return "\n".join(
        [
            "",
            "sidecar demo: upstreams catalog (healthy), orders (1 in 3 fails), payments (down)",
            f"  open {admin}/dashboard in a browser: live tiles, one per service;",
            "  send the traffic below and watch payments turn red and the orders retries climb",
            f"  curl -i {base}/catalog/items          # healthy: x-sidecar-attempts: 1",
            f"  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -D - {base}/orders/1 "
            "| grep -i x-sidecar-attempts; done   # retries hide the 503s",
            f"  for i in 1 2 3 4 5; do curl -s {base}/payments/charge; echo; done"
            "   # 503s, then the breaker opens and the fallback answers",
            f"  while sleep 0.2; do curl -so /dev/null {base}/orders/1; "
            f"curl -so /dev/null {base}/payments/charge; done   # steady traffic to watch",
            f"  curl -s {admin}/admin/state           # breaker state, endpoints",
            f"  curl -s {admin}/metrics | grep sidecar_circuit_breaker_state",
            "Access log: one JSON line per request below. Ctrl-C drains and stops.",
            "",
        ]
    )


async def _demo(config: SidecarConfig, writer: LineWriter) -> int:
    runners = await start_demo_upstreams()
    try:
        print(_instructions(config), file=sys.stderr, flush=True)
        return await run(config, writer)
    finally:
        for runner in runners:
            await runner.cleanup()


def run_demo(config: SidecarConfig) -> int:
    return run_main(lambda writer: _demo(config, writer))
