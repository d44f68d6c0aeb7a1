"""The server's lifecycle, top to bottom: start, serve, reload, drain, stop.

start:   build the runtime (clusters start discovery) -> open the admin listener ->
         open the proxy listener -> register (if configured) -> ready
serve:   SIGHUP or POST /admin/reload re-reads the config; a bad file changes nothing
stop:    SIGTERM/SIGINT -> /readyz 503 -> deregister -> stop accepting -> finish
         in-flight requests for up to `drain_timeout` -> close what is left ->
         stop discovery and sessions -> close the admin listener -> exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from aiohttp import web

from sidecar import errors
from sidecar.admin import admin_runner
from sidecar.config import ConfigError, SidecarConfig, load_config
from sidecar.http.compat import ProxyServer, set_shutdown_timeout
from sidecar.http.h1server import H1Handler
from sidecar.http.h2server import H2Server
from sidecar.http.sniff import SniffingFactory
from sidecar.logs import AccessLog, LineWriter, setup_logging
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.registration import Registration
from sidecar.runtime import Runtime
from sidecar.tasks import TaskOwner
from sidecar.upstream.base import UpstreamClient
from sidecar.upstream.h1 import UpstreamPool
from sidecar.upstream.h2 import H2Pool

log = logging.getLogger("sidecar.server")


# A request head must arrive whole within this long of its first byte, as with nginx's
# client_header_timeout. Otherwise a client trickling a head (slowloris) holds its
# connection, and a file descriptor, for aiohttp's keep-alive timeout: about an hour,
# which stays, because closing idle connections early races the app's connection pool.
HEAD_TIMEOUT = 60.0


def _malformed_request(status: int, detail: str) -> web.StreamResponse:
    return errors.error_response(errors.BAD_REQUEST, status=status, detail=detail)


class Sidecar:
    """One running sidecar: listeners, runtime, reload and drain."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        log_writer: LineWriter | None = None,
        upstream_client: Callable[[], UpstreamClient] = UpstreamPool,
    ) -> None:
        self.config = config
        # Makes the HTTP/1.1 upstream client at start; the conformance tests pass
        # sidecar.upstream.reference.ReferenceClient to hold both clients to one suite.
        self._upstream_client = upstream_client
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.started_at = time.time()
        self._log_writer = log_writer
        self._runtime: Runtime | None = None
        self._proxy: Proxy | None = None
        self._pool: UpstreamClient | None = None
        self._proxy_runner: web.ServerRunner | None = None
        self._listener: asyncio.Server | None = None
        self._listen_factory: SniffingFactory | None = None
        self._h2: H2Server | None = None
        self._h2_pool: H2Pool | None = None
        self._admin_runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.registration: Registration | None = None

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    @property
    def admin_app(self) -> web.Application:
        """The admin API's application (its state holds the dashboard sampler)."""
        assert self._admin_runner is not None
        return self._admin_runner.app

    @property
    def proxy(self) -> Proxy:
        assert self._proxy is not None
        return self._proxy

    def _clients(self) -> dict[str, UpstreamClient]:
        """The wire client for each `protocol` a service may name (shared by reloads)."""
        assert self._pool is not None and self._h2_pool is not None
        return {"http1": self._pool, "h2c": self._h2_pool}

    async def start(self) -> None:
        config = self.config
        self._pool = self._upstream_client()
        self._h2_pool = H2Pool(config.http2)
        self._runtime = Runtime(config, self.metrics, self._clients())
        await self._runtime.start_new()
        self._proxy = Proxy(self._runtime, AccessLog(self._log_writer))

        self._admin_runner = admin_runner(self)
        await self._admin_runner.setup()
        await web.TCPSite(
            self._admin_runner, config.admin.host, config.admin.port, reuse_address=True
        ).start()

        # handler_cancellation: when the app hangs up, its request is cancelled at once, so
        # the upstream call stops and the breaker does not count the abandoned attempt.
        server = ProxyServer(
            H1Handler(self._proxy.serve, self._proxy.is_draining),
            head_timeout=HEAD_TIMEOUT,
            error_response=_malformed_request,
            handler_cancellation=True,
            access_log=None,
        )
        self._proxy_runner = web.ServerRunner(server, shutdown_timeout=config.drain_timeout)
        await self._proxy_runner.setup()
        # One port, two protocols: each connection's first bytes say whether it speaks
        # HTTP/2 (the prior-knowledge preface) or HTTP/1.1 (aiohttp's server takes it).
        self._h2 = H2Server(self._proxy.serve, config.http2)
        self._listen_factory = SniffingFactory(server, self._h2, timeout=HEAD_TIMEOUT)
        self._listener = await asyncio.get_running_loop().create_server(
            self._listen_factory,
            config.listen.host,
            config.listen.port,
            backlog=1024,
            reuse_address=True,
        )

        if config.register is not None:
            self.registration = Registration(config.register)
            await self.registration.start()
        self.ready = True
        log.info(
            "serving on %s, admin on %s",
            config.listen,
            config.admin,
            extra={"fields": {"routes": len(config.routes), "services": len(config.services)}},
        )

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Drain and close everything; bounded by `drain_timeout` plus a little."""
        self.draining = True
        proxy = self._proxy
        if proxy is not None:
            proxy.draining = True
        if self.registration is not None:
            try:
                await self.registration.deregister()
            except Exception:
                log.exception("deregistration failed")
        runner = self._proxy_runner
        if runner is not None:
            if self._listener is not None:
                self._listener.close()  # closes the listening socket; connections stay
            if self._h2 is not None:
                self._h2.goaway()  # HTTP/2 clients take new calls elsewhere
            if self._listen_factory is not None:
                self._listen_factory.close_undecided()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.drain_timeout
            if proxy is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.drain_timeout):
                        await proxy.wait_idle()
            if proxy is not None and proxy.in_flight:
                log.warning("drain timeout: %d requests still in flight are cut", proxy.in_flight)
            if self._h2 is not None:
                await self._h2.close()  # cuts what is left and awaits every stream task
            # What is left of the drain window; never 0, which aiohttp reads as "no limit".
            set_shutdown_timeout(runner, deadline - loop.time())
            await runner.cleanup()
        if self.registration is not None:
            await self.registration.close()
        if self._runtime is not None:
            await self._runtime.close_all()
        if self._pool is not None:
            await self._pool.close()
        if self._h2_pool is not None:
            await self._h2_pool.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._proxy is not None:
            self._proxy.access_log.flush()  # the last lines, before the writer closes
        log.info("stopped")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; on any error keep serving the old config."""
        async with self._reload_lock:
            source = self.config.source
            if source is None:
                return self._reload_failed(["no config file to reload from"])
            try:
                new, warnings = await asyncio.to_thread(load_config, source)
            except ConfigError as exc:
                return self._reload_failed([str(p) for p in exc.problems])
            except OSError as exc:
                return self._reload_failed([f"{source}: {exc}"])
            notes = [str(w) for w in warnings]
            old = self.config
            if new.listen != old.listen or new.admin != old.admin:
                notes.append(
                    "listen/admin address changes need a restart; still serving on "
                    f"{old.listen} and {old.admin}"
                )
                new = dataclasses.replace(new, listen=old.listen, admin=old.admin)
            previous = self.runtime
            try:
                runtime = Runtime(new, self.metrics, self._clients(), previous=previous)
                await runtime.start_new()
            except Exception as exc:
                # Nothing of the new generation runs (start_new closed it); the old one
                # never stopped serving. Its gauges are its own again, and the series of
                # services only the failed config had are gone.
                log.exception("config reload failed while starting the new services")
                for svc in previous.services.values():
                    svc.publish()
                for name in set(new.services) - set(previous.services):
                    self.metrics.forget_service(name)
                return self._reload_failed([f"starting the new config failed: {exc!r}"])
            self.config = new
            self._runtime = runtime
            self.proxy.runtime = runtime
            for svc in runtime.dropped_services:
                await svc.close()
                if svc.name not in runtime.services:
                    self.metrics.forget_service(svc.name)
            self.metrics.config_reloads.labels("success").inc()
            kept = sorted(
                set(previous.services)
                & set(runtime.services) - {s.name for s in runtime.new_services}
            )
            log.info("config reloaded", extra={"fields": {"kept_services": kept, "notes": notes}})
            return {"ok": True, "kept_services": kept, "warnings": notes}

    def _reload_failed(self, problems: list[str]) -> dict[str, Any]:
        self.metrics.config_reloads.labels("failure").inc()
        log.error(
            "config reload failed; keeping the old config", extra={"fields": {"problems": problems}}
        )
        return {"ok": False, "errors": problems}


async def run(config: SidecarConfig, log_writer: LineWriter | None = None) -> int:
    sidecar = Sidecar(config, log_writer=log_writer)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.request_stop)
    tasks = TaskOwner("server")

    def on_sighup() -> None:
        tasks.spawn(sidecar.reload(), "sighup-reload")

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        try:
            await sidecar.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            await sidecar.stop()
            return 1
        settle_heap()
        await sidecar.wait_stopped()
        log.info("stopping: draining for up to %ss", config.drain_timeout)
        await sidecar.stop()
        return 0
    finally:
        await tasks.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


# Collect young objects after this many net container allocations instead of CPython's
# 700: a request's garbage is freed by reference counting, and at 50 requests in flight the
# default made the cyclic collector cost about 7 % of the instructions per request
# (callgrind, bench config; with the settings below it is within 0.5 % of no collector).
GC_THRESHOLDS: Final = (10_000, 20, 100)


def settle_heap() -> None:
    """After start-up: move what start-up built (modules, config, the runtime) out of the
    collector's sight, and collect young objects less often. Only the served process does
    this; an in-process sidecar (the tests) leaves its host's collector alone."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_main(main: Callable[[LineWriter], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on a fresh (uv)loop with JSON logging set up, and flush the logs after."""
    writer = setup_logging()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main(writer))
    finally:
        writer.close()


def serve(config: SidecarConfig) -> int:
    return run_main(lambda writer: run(config, writer))
