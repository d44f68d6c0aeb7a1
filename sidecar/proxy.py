"""The request path: one app request in, one response out.

    parse target -> normalise path -> route -> overrides -> admission (max_requests)
    -> fault injection -> request body -> attempts (resilience.retry.forward)
    -> stream the response back, or answer with a sidecar error / fallback
    -> metrics and one access-log line

Everything per-request is looked up in the current `Runtime`, which a reload swaps
atomically; a request keeps the generation it started with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from typing import Any, Final

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from sidecar import errors
from sidecar.attempts import forward
from sidecar.config.model import FallbackConfig
from sidecar.http.response import WholeResponse
from sidecar.logs import AccessLog
from sidecar.request import Exchange, StreamedBody
from sidecar.routing import BadPath, normalize_path, rewrite
from sidecar.runtime import RouteRuntime, Runtime
from sidecar.upstream import request_headers, response_headers
from sidecar.upstream.h1 import UpstreamPool, UpstreamResponse
from sidecar.vocab import Outcome, Reason

log = logging.getLogger("sidecar.proxy")

# Responses up to this size are read whole and sent in one write: cheaper than streaming
# for the common small reply, and still bounded memory.
SMALL_BODY: Final = 64 * 1024
MAX_REQUEST_ID: Final = 200
NO_BODY_STATUSES: Final = frozenset({204, 304})


class Proxy:
    def __init__(self, runtime: Runtime, pool: UpstreamPool, access_log: AccessLog) -> None:
        self.runtime = runtime
        self.pool = pool
        self.access_log = access_log
        self.in_flight = 0  # all proxied requests, for draining
        self.draining = False
        self.completed = 0
        self._idle: asyncio.Future[None] | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Deadlines run on the loop's clock (asyncio.timeout uses it); durations on
        # perf_counter, because uvloop's loop.time() is cached per iteration at 1 ms.
        started = time.perf_counter()
        start = asyncio.get_running_loop().time()
        self.in_flight += 1
        entry: dict[str, Any] = {
            "request_id": None,
            "route": None,
            "service": None,
            "method": request.method,
            "path": None,
            "status": 0,
            "attempts": 0,
            "duration_ms": 0.0,
            "error": None,
        }
        route: RouteRuntime | None = None
        try:
            response, route = await self._handle(request, entry, start)
            entry["status"] = response.status
            if self.draining:
                # Tell keep-alive clients to reconnect elsewhere: this process is leaving.
                response.force_close()
            return response
        except asyncio.CancelledError:
            # The app hung up (or shutdown cut the request): nginx's 499 says exactly that.
            entry["status"] = 499
            entry["error"] = entry["error"] or "client_closed"
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and self.in_flight == 0 and not self._idle.done():
                self._idle.set_result(None)
            duration = time.perf_counter() - started
            entry["duration_ms"] = round(duration * 1000, 3)
            if route is not None:
                route.count_request(entry["status"])
                route.m_duration.observe(duration)
            self.completed += 1
            self.access_log.emit(entry)

    async def wait_idle(self) -> None:
        """Return once no proxied request is in flight (used while draining)."""
        if self.in_flight == 0:
            return
        if self._idle is None or self._idle.done():
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)

    async def _handle(
        self, request: web.BaseRequest, entry: dict[str, Any], start: float
    ) -> tuple[web.StreamResponse, RouteRuntime | None]:
        headers = request.headers
        rid = headers.get("x-request-id")
        if not rid or len(rid) > MAX_REQUEST_ID:
            rid = _new_request_id()
        entry["request_id"] = rid
        runtime = self.runtime

        raw = request.raw_path
        qpos = raw.find("?")
        raw_path, query = (raw[:qpos], raw[qpos:]) if qpos >= 0 else (raw, "")
        entry["path"] = raw_path[:2048]
        method = request.method
        if method == "CONNECT" or not raw_path.startswith("/"):
            # Absolute-form and authority-form targets: never an open proxy or a tunnel.
            return self._error(entry, errors.NO_ROUTE, rid, detail="no route for this target"), None
        try:
            path = normalize_path(raw_path)
        except BadPath as exc:
            return self._error(entry, errors.BAD_REQUEST, rid, detail=str(exc)), None
        entry["path"] = path[:2048]

        host = _host_without_port(headers.get("Host"))
        route = runtime.route_for(path, method, host, headers)
        if route is None:
            return self._error(
                entry, errors.NO_ROUTE, rid, detail=f"no route for {method} {path}"
            ), None
        service = route.service
        entry["route"] = route.name
        entry["service"] = service.name

        timeout = route.config.timeout
        max_retries = route.policy.max_retries
        try:
            timeout = _override(headers.get("x-sidecar-timeout-ms"), timeout, 1000.0, positive=True)
            max_retries = int(_override(headers.get("x-sidecar-max-retries"), max_retries, 1.0))
        except ValueError as exc:
            return self._error(entry, errors.BAD_REQUEST, rid, route, detail=str(exc)), route
        deadline = start + timeout

        if service.in_flight >= service.max_requests:
            service.m_overloaded.inc()
            return self._error(
                entry,
                errors.OVERLOADED,
                rid,
                route,
                detail=f"{service.max_requests} requests already in flight to {service.name}",
            ), route
        service.in_flight += 1
        try:
            return await self._proxy(
                request,
                route,
                entry,
                rid,
                method,
                path,
                query,
                deadline,
                max_retries,
                host,
                start + route.config.timeout,
            ), route
        finally:
            service.in_flight -= 1

    async def _proxy(
        self,
        request: web.BaseRequest,
        route: RouteRuntime,
        entry: dict[str, Any],
        rid: str,
        method: str,
        path: str,
        query: str,
        deadline: float,
        max_retries: int,
        host: str | None,
        route_deadline: float,
    ) -> web.StreamResponse:
        fault = route.fault
        if fault is not None:
            delay = fault.delay()
            if delay is not None:
                await asyncio.sleep(delay)
            status = fault.abort()
            if status is not None:
                return self._error(
                    entry,
                    errors.FAULT_INJECTED,
                    rid,
                    route,
                    status=status,
                    detail="aborted by fault injection",
                )

        body: bytes | StreamedBody | None = None
        try:
            if request.body_exists:  # most requests have none: no timer to arm and cancel
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    body = await self._request_body(request, route, max_retries)
        except TimeoutError:
            route.count_timeout("route")
            return self._error(
                entry,
                errors.TIMEOUT,
                rid,
                route,
                detail="request body not received before the route timeout",
            )

        upstream_headers = request_headers(
            request.headers,
            request_id=rid,
            client_ip=request.remote,
        )
        ex = Exchange(
            method=method,
            path_qs=rewrite(path, route.config) + query,
            headers=upstream_headers,
            body=body,
            deadline=deadline,
            max_retries=max_retries,
            host_header=_forwardable_host(host, request.headers.get("Host")),
            route_deadline=route_deadline if route_deadline > deadline else None,
        )
        try:
            await forward(ex, route, self.pool)
        finally:
            entry["attempts"] = ex.attempts
        attempt = ex.last

        if attempt is None or attempt.kind is not Outcome.RESPONSE:
            return self._failure(entry, rid, route, ex)
        assert attempt.response is not None
        return await self._relay(request, attempt.response, ex.attempts, rid, entry, route)

    async def _request_body(
        self, request: web.BaseRequest, route: RouteRuntime, max_retries: int
    ) -> bytes | StreamedBody:
        if request.version == HttpVersion11 and "Expect" in request.headers:
            await _continue(request)
        content = request.content
        length = request.content_length
        limit = route.config.retries.max_body_bytes
        if max_retries == 0 or (length is not None and length > limit):
            return StreamedBody(content)
        if length is not None:
            return await content.readexactly(length)
        # Chunked: buffer up to the limit; past it, send what was read and stream the rest.
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await content.readany()
            if not chunk:
                return bytes(buf)
            buf += chunk
        return StreamedBody(content, prefix=bytes(buf))

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        attempts: int,
        rid: str,
        entry: dict[str, Any],
        route: RouteRuntime,
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers)
        headers.append(("x-sidecar-attempts", str(attempts)))
        headers.append(("x-request-id", rid))
        status = upstream.status
        length = upstream.content_length
        bodyless = request.method == "HEAD" or status in NO_BODY_STATUSES
        try:
            if bodyless or (length is not None and length <= SMALL_BODY):
                try:
                    body = await upstream.read(route.body_idle_timeout)
                except (TimeoutError, OSError) as exc:
                    # Nothing went to the app yet, so it can still get a clean 502.
                    return self._error(
                        entry,
                        errors.UPSTREAM_RESET,
                        rid,
                        route,
                        attempts=attempts,
                        detail=f"response body broke: {exc}",
                    )
                return WholeResponse(
                    status, headers, body, reason=upstream.reason, bodyless=bodyless
                )
            response = web.StreamResponse(
                status=status, reason=upstream.reason, headers=CIMultiDict(headers)
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.iter_chunks(route.body_idle_timeout):
                    await response.write(chunk)
            except (TimeoutError, OSError) as exc:
                # The head is out: the only honest signal left is to cut the connection,
                # so the app cannot take a truncated body for a whole one.
                entry["error"] = errors.UPSTREAM_RESET
                log.warning(
                    "upstream of %s broke mid-response (request %s): %r",
                    route.service_name,
                    rid,
                    exc,
                )
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response
        finally:
            upstream.release()

    def _failure(
        self, entry: dict[str, Any], rid: str, route: RouteRuntime, ex: Exchange
    ) -> web.StreamResponse:
        attempt = ex.last
        if attempt is None:
            reason = ex.refused or errors.NO_HEALTHY_UPSTREAM
            fallback = route.config.fallback
            if fallback is not None:
                entry["error"] = reason
                return _fallback_response(fallback, rid, ex.attempts, reason)
            if reason == errors.CIRCUIT_OPEN:
                retry_after = max(1, math.ceil(ex.retry_after or 0))
                return self._error(
                    entry,
                    reason,
                    rid,
                    route,
                    retry_after=retry_after,
                    detail=f"circuit breaker for {route.service_name} is open",
                )
            if ex.deadline <= asyncio.get_running_loop().time():
                return self._error(
                    entry,
                    errors.TIMEOUT,
                    rid,
                    route,
                    detail="route timeout reached before an attempt",
                )
            return self._error(
                entry, reason, rid, route, detail=f"no healthy endpoint for {route.service_name}"
            )
        if attempt.kind is Outcome.CONNECT_ERROR:
            reason = errors.UPSTREAM_UNREACHABLE
        elif attempt.kind is Outcome.RESET:
            reason = errors.UPSTREAM_RESET
        else:
            reason = errors.TIMEOUT
        return self._error(entry, reason, rid, route, attempts=ex.attempts, detail=attempt.detail)

    def _error(
        self,
        entry: dict[str, Any],
        reason: Reason,
        rid: str,
        route: RouteRuntime | None = None,
        *,
        detail: str | None = None,
        status: int | None = None,
        attempts: int | None = None,
        retry_after: int | None = None,
    ) -> WholeResponse:
        entry["error"] = reason
        return errors.error_response(
            reason,
            route=route.name if route else None,
            service=route.service_name if route else None,
            detail=detail,
            status=status,
            attempts=attempts if attempts is not None else entry["attempts"],
            request_id=rid,
            retry_after=retry_after,
        )


async def _continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` (aiohttp's low-level server leaves it to us).

    The app is waiting for this before it sends the body; the upstream is not asked,
    because by the time the upstream request goes out the body is already in hand.
    """
    if request.headers["Expect"].strip().lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the real response has not started


# A random per-process prefix and a counter: unique, and far cheaper than uuid4 per request.
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


def _fallback_response(
    fallback: FallbackConfig, rid: str, attempts: int, reason: str
) -> WholeResponse:
    headers = list(fallback.headers)
    headers.append(("x-sidecar-attempts", str(attempts)))
    headers.append(("x-sidecar-fallback", reason))
    headers.append(("x-request-id", rid))
    return WholeResponse(fallback.status, headers, fallback.body)


def _override(value: str | None, configured: float, scale: float, positive: bool = False) -> float:
    """A per-request override header: may only lower the configured value."""
    if value is None:
        return configured
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise ValueError(f"override header must be a whole number, got {value[:40]!r}")
    number = int(text)
    if positive and number == 0:
        raise ValueError("x-sidecar-timeout-ms must be > 0")
    return min(configured, number / scale)


def _host_without_port(host: str | None) -> str | None:
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    colon = host.rfind(":")
    return (host[:colon] if colon >= 0 else host).lower()


def _forwardable_host(host: str | None, raw: str | None) -> str | None:
    """The Host header to send upstream, or None to use the endpoint's address.

    Apps call the sidecar on loopback, so a Host of 127.0.0.1:15001 means nothing to the
    upstream; a real name (routing on `host`, or a name the app used) is kept.
    """
    if host is None or raw is None:
        return None
    literal = _HOST_IS_LITERAL.get(host)
    if literal is None:
        literal = host in ("localhost", "[::1]") or host.startswith("[") or _is_ipv4(host)
        if len(_HOST_IS_LITERAL) >= 1024:  # bounded: Host values come from clients
            _HOST_IS_LITERAL.clear()
        _HOST_IS_LITERAL[host] = literal
    return None if literal else raw


_HOST_IS_LITERAL: dict[str, bool] = {}


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)
