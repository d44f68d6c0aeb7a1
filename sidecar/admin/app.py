"""The admin API on the `admin` address: metrics, health, state, reload and the dashboard.

Every request first passes the guard (sidecar/admin/guard.py: Host, Sec-Fetch-Site, Origin
and Content-Type rules); every error, the guard's and the router's alike, is a JSON body
`{"error": WORD, "detail": TEXT}`. The dashboard's sampler is started and stopped with the
app (`cleanup_ctx`), so it lives exactly as long as the admin listener.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import exposition

from sidecar.admin.guard import check_access, check_body
from sidecar.dashboard import Sampler, page
from sidecar.metrics import Metrics
from sidecar.registration import Registration
from sidecar.runtime import Runtime
from sidecar.tasks import TaskOwner

# A request head must be whole within this long of the connection opening (or of the
# previous response on it), or the connection is closed: a client trickling a head cannot
# hold an admin connection. aiohttp's keep-alive timer does exactly this (it runs from
# accept and from each response, and only fires while no request is queued or running).
# It also closes idle keep-alive connections after as long; Prometheus and kubelet open
# a new one when they find theirs closed.
HEAD_TIMEOUT: Final = 60.0


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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAMPLER_KEY: Final = web.AppKey("sampler", Sampler)


def _error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def _guard(host: AdminHost) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # admin_hosts is read per request: a reload may change it.
        refusal = check_access(request.headers, host.runtime.config.admin_hosts)
        if refusal is None:
            unrouted = request.match_info.http_exception
            if isinstance(unrouted, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(unrouted.allowed_methods))
                return _error(
                    405,
                    "method_not_allowed",
                    f"{request.path} answers {allowed}, not {request.method}",
                    headers={"Allow": allowed},
                )
            if unrouted is not None:
                return _error(
                    404, "not_found", f"no admin endpoint {request.method} {request.path}"
                )
            refusal = check_body(request.method, request.headers, request.body_exists)
        if refusal is not None:
            return _error(refusal.status, refusal.error, refusal.detail)
        return await handler(request)

    return guard


def build_admin_app(host: AdminHost) -> web.Application:
    app = web.Application(middlewares=[_guard(host)])
    sampler = Sampler(host.metrics, lambda: host.runtime)
    app[SAMPLER_KEY] = sampler

    async def run_sampler(app: web.Application) -> AsyncIterator[None]:
        tasks = TaskOwner("admin")
        tasks.spawn(sampler.run(), "dashboard-sampler")
        yield
        await tasks.close()

    app.cleanup_ctx.append(run_sampler)

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

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(
            body=page.BODY, content_type="text/html", charset="utf-8", headers=page.HEADERS
        )

    async def dashboard_json(request: web.Request) -> web.Response:
        view = sampler.view(host.runtime.snapshot(), draining=host.draining)
        return web.json_response(
            view,
            dumps=json.dumps,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    handlers: list[tuple[str, str, Handler]] = [
        ("GET", "/metrics", metrics),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/admin/state", state),
        ("GET", "/admin/config", config),
        ("POST", "/admin/reload", reload),
        ("GET", "/admin/dashboard.json", dashboard_json),
        ("GET", "/dashboard", dashboard),
    ]
    for method, path, handler in handlers:
        app.router.add_route(method, path, handler)
    return app


def admin_runner(host: AdminHost) -> web.AppRunner:
    """The admin app's runner, with the head timeout (see HEAD_TIMEOUT)."""
    return web.AppRunner(build_admin_app(host), access_log=None, keepalive_timeout=HEAD_TIMEOUT)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
