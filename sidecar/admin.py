"""The admin API on the `admin` address (CONTRACT §4): metrics, health, state, reload."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import exposition

from sidecar.metrics import Metrics
from sidecar.registration import Registration
from sidecar.runtime import Runtime


class AdminHost(Protocol):
    """What the admin API reads from the running server."""

    metrics: Metrics
    ready: bool
    draining: bool
    started_at: float
    registration: Registration | None

    @property
    def runtime(self) -> Runtime: ...

    def reload(self) -> Awaitable[dict[str, Any]]: ...


def build_admin_app(host: AdminHost) -> web.Application:
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
        body = encoder(host.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if host.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not host.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ready"})

    async def state(request: web.Request) -> web.Response:
        snapshot = host.runtime.snapshot()
        snapshot["ready"] = host.ready and not host.draining
        snapshot["draining"] = host.draining
        snapshot["uptime_seconds"] = round(time.time() - host.started_at, 3)
        if host.registration is not None:
            snapshot["registration"] = host.registration.snapshot()
        return web.json_response(snapshot, dumps=_dumps)

    async def config(request: web.Request) -> web.Response:
        from sidecar.config.dump import config_to_dict

        return web.json_response(config_to_dict(host.runtime.config), dumps=_dumps)

    async def reload(request: web.Request) -> web.Response:
        result = await host.reload()
        return web.json_response(result, status=200 if result["ok"] else 400, dumps=_dumps)

    handlers: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/metrics", metrics),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/admin/state", state),
        ("GET", "/admin/config", config),
        ("POST", "/admin/reload", reload),
    ]
    for method, path, handler in handlers:
        app.router.add_route(method, path, handler)
    return app


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
