"""The request path: one app request in, one answer out, for either wire protocol.

    parse target -> normalise path -> route -> overrides -> admission (max_requests)
    -> fault injection -> request body -> attempts (sidecar.attempts.forward)
    -> relay the response, or answer with a sidecar error / fallback
    -> settle the relayed attempt -> metrics and one access-log line

The app side is an `Inbound` and a `Responder` (sidecar.http.base), so HTTP/1.1 and
HTTP/2 share all of it. Everything per-request is looked up in the current `Runtime`,
which a reload swaps atomically; a request keeps the generation it started with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Final

from sidecar import errors
from sidecar.attempts import forward, settle
from sidecar.config.model import FallbackConfig
from sidecar.grpc import (
    Status,
    encode_message,
    error_trailers,
    is_grpc,
    parse_status,
    parse_timeout,
    status_for_reason,
    status_of,
)
from sidecar.http.base import Inbound, Responder
from sidecar.logs import AccessLog
from sidecar.request import AccessRecord, Exchange, StreamedBody
from sidecar.routing import BadPath, has_escaped_slash, normalize_path, rewrite
from sidecar.runtime import RouteRuntime, Runtime
from sidecar.tracing import TraceContext, trace_context
from sidecar.upstream import request_headers, response_headers
from sidecar.upstream.base import UpstreamError, UpstreamResponse
from sidecar.vocab import Outcome, Reason, TimeoutKind

log = logging.getLogger("sidecar.proxy")

# Responses up to this size are read whole and sent in one write: cheaper than streaming
# for the common small reply, and still bounded memory.
SMALL_BODY: Final = 64 * 1024
MAX_REQUEST_ID: Final = 200
MAX_LOGGED_PATH: Final = 2048
NO_BODY_STATUSES: Final = frozenset({204, 304})


class Proxy:
    def __init__(self, runtime: Runtime, access_log: AccessLog) -> None:
        self.runtime = runtime
        self.access_log = access_log
        self.in_flight = 0  # all proxied requests, for draining
        self.draining = False
        self._idle: asyncio.Future[None] | None = None

    def is_draining(self) -> bool:
        return self.draining

    async def serve(self, inbound: Inbound, out: Responder) -> None:
        """Answer one request through `out`; never raises but for cancellation."""
        # Deadlines run on the loop's clock (asyncio.timeout uses it); durations on
        # perf_counter, because uvloop's loop.time() is cached per iteration at 1 ms.
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.in_flight += 1
        record = AccessRecord(inbound.method)
        record.grpc = is_grpc(inbound.headers.get("content-type"))
        route: RouteRuntime | None = None
        try:
            route = await self._serve(inbound, out, record, start, loop.time)
        except asyncio.CancelledError:
            # The app hung up (or shutdown cut the request): nginx's 499 says exactly that.
            record.status = 499
            record.error = record.error or Reason.CLIENT_CLOSED
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and self.in_flight == 0 and not self._idle.done():
                self._idle.set_result(None)
            duration = time.perf_counter() - started
            record.duration_ms = round(duration * 1000, 3)
            if route is not None:
                route.count_request(record.status)
                if record.traced:
                    # The exemplar ties a bucket to a trace the app's tracing knows (shown
                    # with OpenMetrics). A trace the sidecar started itself is exported
                    # nowhere, so linking to it would lead nowhere; it gets none.
                    route.m_duration.observe(duration, {"trace_id": record.trace_id or ""})
                else:
                    route.m_duration.observe(duration)
                if record.grpc_code is not None:
                    route.count_grpc(record.grpc_code)
            self.access_log.emit(record)

    async def wait_idle(self) -> None:
        """Return once no proxied request is in flight (used while draining)."""
        if self.in_flight == 0:
            return
        if self._idle is None or self._idle.done():
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)

    async def _serve(
        self,
        inbound: Inbound,
        out: Responder,
        record: AccessRecord,
        start: float,
        clock: Callable[[], float],
    ) -> RouteRuntime | None:
        """Route and admit the request; returns its route, if any, for the metrics."""
        headers = inbound.headers
        rid = headers.get("x-request-id")
        if not rid or len(rid) > MAX_REQUEST_ID:
            rid = _new_request_id()
        record.request_id = rid
        trace = trace_context(headers.get("traceparent"))
        record.trace_id = trace.trace_id
        record.traced = not trace.replaced
        runtime = self.runtime

        raw = inbound.target
        qpos = raw.find("?")
        raw_path, query = (raw[:qpos], raw[qpos:]) if qpos >= 0 else (raw, "")
        record.path = raw_path[:MAX_LOGGED_PATH]
        method = inbound.method
        if method == "CONNECT" or not raw_path.startswith("/"):
            # Absolute-form and authority-form targets: never an open proxy or a tunnel.
            await self._error(out, record, Reason.NO_ROUTE, detail="no route for this target")
            return None
        try:
            path = normalize_path(raw_path)
        except BadPath as bad:
            await self._error(out, record, Reason.BAD_REQUEST, detail=str(bad))
            return None
        if runtime.reject_escaped_slashes and has_escaped_slash(path):
            # A backend that decodes %2F would read another route's path (Envoy's
            # CVE-2021-29492): refused unless listen_path_escaped_slashes says keep.
            detail = "encoded slash or backslash (%2F, %5C) in the path"
            await self._error(out, record, Reason.BAD_REQUEST, detail=detail)
            return None
        record.path = path[:MAX_LOGGED_PATH]

        host = _host_without_port(headers.get("Host"))
        route = runtime.route_for(path, method, host, headers)
        if route is None:
            await self._error(out, record, Reason.NO_ROUTE, detail=f"no route for {method} {path}")
            return None
        service = route.service
        record.route = route.name
        record.service = service.name

        timeout = route.config.timeout
        max_retries = route.policy.max_retries
        try:
            timeout = _override(headers.get("x-sidecar-timeout-ms"), timeout, 1000.0, positive=True)
            max_retries = int(_override(headers.get("x-sidecar-max-retries"), max_retries, 1.0))
        except ValueError as exc:
            await self._error(out, record, Reason.BAD_REQUEST, route, detail=str(exc))
            return route
        if record.grpc:
            if service.config.protocol != "h2c":
                detail = (
                    f"service {service.name} speaks {service.config.protocol}; "
                    "gRPC needs protocol: h2c"
                )
                await self._error(out, record, Reason.BAD_REQUEST, route, detail=detail)
                return route
            # The app's deadline lowers the route's, never raises it.
            client_timeout = parse_timeout(headers.get("grpc-timeout"))
            if client_timeout is not None:
                timeout = min(timeout, client_timeout)

        if service.in_flight >= service.max_requests:
            service.m_overloaded.inc()
            await self._error(
                out,
                record,
                Reason.OVERLOADED,
                route,
                detail=f"{service.max_requests} requests already in flight to {service.name}",
            )
            return route
        ex = Exchange(
            method=method,
            target=rewrite(path, route.config) + query,
            headers=[],
            body=None,
            deadline=start + timeout,
            max_retries=max_retries,
            grpc=record.grpc,
        )
        route_deadline = start + route.config.timeout
        if route_deadline > ex.deadline:  # an override shortened it: see Exchange
            ex.route_deadline = route_deadline
        service.in_flight += 1
        try:
            await self._proxy(inbound, out, route, record, ex, host, trace, clock)
        finally:
            service.in_flight -= 1
        return route

    async def _proxy(
        self,
        inbound: Inbound,
        out: Responder,
        route: RouteRuntime,
        record: AccessRecord,
        ex: Exchange,
        host: str | None,
        trace: TraceContext,
        clock: Callable[[], float],
    ) -> None:
        fault = route.fault
        if fault is not None:
            delay = fault.delay()
            if delay is not None:
                await asyncio.sleep(delay)
            status = fault.abort(record.grpc)
            if status is not None:
                await self._error(
                    out,
                    record,
                    Reason.FAULT_INJECTED,
                    route,
                    status=status,
                    detail="aborted by fault injection",
                )
                return

        if record.grpc and inbound.has_body:
            # gRPC streams both ways: the body goes up as it comes (a bidi call's never
            # ends before its answer starts), kept while it fits the limit for a retry,
            # or for a resend of a stream the upstream refused (retries off too).
            ex.body = StreamedBody(inbound, keep=route.config.retries.max_body_bytes)
        elif inbound.has_body:  # most requests have none: no timer to arm and cancel
            try:
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(max(0.0, ex.deadline - loop.time())):
                    ex.body = await _request_body(inbound, route, ex.max_retries)
            except TimeoutError:
                route.count_timeout(TimeoutKind.ROUTE)
                await self._error(
                    out,
                    record,
                    Reason.TIMEOUT,
                    route,
                    detail="request body not received before the route timeout",
                )
                return
            if isinstance(ex.body, StreamedBody):
                ex.content_length = inbound.content_length

        ex.headers, app_host = request_headers(
            inbound.headers,
            request_id=record.request_id or "",
            client_ip=inbound.remote,
            trace=trace,
        )
        ex.authority = _forwardable_host(host, app_host)
        ex.on_interim = out.send_interim
        try:
            await forward(ex, route, clock=clock)
        finally:
            record.attempts = ex.attempts
        attempt = ex.last
        if attempt is None or attempt.kind is not Outcome.RESPONSE:
            await self._failure(out, record, route, ex)
            return
        assert attempt.response is not None
        # An exception out of the relay (the app went away) is not the upstream's doing.
        broken = False
        try:
            broken = await self._relay(inbound, out, attempt.response, ex, record, route)
        finally:
            settle(ex, route, broken=broken)
            attempt.release()

    async def _relay(
        self,
        inbound: Inbound,
        out: Responder,
        upstream: UpstreamResponse,
        ex: Exchange,
        record: AccessRecord,
        route: RouteRuntime,
    ) -> bool:
        """Send the upstream's answer to the app; True if its body broke."""
        headers = response_headers(upstream.headers)
        headers.append(("x-sidecar-attempts", str(ex.attempts)))
        headers.append(("x-request-id", record.request_id or ""))
        status = upstream.status
        if ex.grpc:
            return await self._relay_grpc(out, upstream, headers, ex, record, route)
        length = upstream.content_length
        bodyless = inbound.method == "HEAD" or status in NO_BODY_STATUSES
        if bodyless or (length is not None and length <= SMALL_BODY):
            try:
                body = await upstream.read(route.body_idle_timeout)
            except (TimeoutError, OSError) as exc:
                # Nothing went to the app yet, so it can still get a clean 502.
                await self._error(
                    out,
                    record,
                    Reason.UPSTREAM_RESET,
                    route,
                    attempts=ex.attempts,
                    detail=f"response body broke: {exc}",
                )
                return True
            record.status = status
            trailers = upstream.trailers
            if not trailers:
                await out.send_whole(status, upstream.reason, headers, body, bodyless=bodyless)
                return False
            # Trailers need the streamed form (HTTP/2 sends them; HTTP/1.1 drops them).
            await out.start(status, upstream.reason, headers)
            if body:
                await out.write(body)
            await out.finish(trailers.items())
            return False
        record.status = status
        await out.start(status, upstream.reason, headers)
        return await self._stream_body(out, upstream, record, route)

    async def _relay_grpc(
        self,
        out: Responder,
        upstream: UpstreamResponse,
        headers: list[tuple[str, str]],
        ex: Exchange,
        record: AccessRecord,
        route: RouteRuntime,
    ) -> bool:
        """A gRPC answer: always streamed (messages flow as they come), trailers and all;
        a Trailers-Only answer stays one head that ends the stream. The call's deadline
        covers the whole stream: past it the call ends with DEADLINE_EXCEEDED."""
        status = upstream.status
        record.status = status
        head_status = parse_status(upstream.headers.get("grpc-status"))
        if head_status is not None:
            try:
                body = await upstream.read(route.body_idle_timeout)
            except (TimeoutError, OSError) as exc:
                await self._error(out, record, Reason.UPSTREAM_RESET, route, detail=str(exc))
                return True
            record.grpc_code = head_status
            if not body:
                await out.send_whole(status, None, headers, b"", bodyless=False)
                return False
            await out.start(status, None, headers)
            await out.write(body)
            await out.finish(upstream.trailers.items() if upstream.trailers else None)
            return False
        await out.start(status, None, headers)
        try:
            async with asyncio.timeout_at(ex.deadline):
                broken = await self._stream_body(out, upstream, record, route)
        except TimeoutError:
            route.count_timeout(TimeoutKind.ROUTE)
            record.error = Reason.TIMEOUT
            record.grpc_code = Status.DEADLINE_EXCEEDED
            message = encode_message("timeout: the call's deadline passed during the stream")
            await out.finish([("grpc-status", "4"), ("grpc-message", message)])
            return False
        if broken:
            # The app's stream was reset: gRPC clients report that as INTERNAL.
            record.grpc_code = Status.INTERNAL
        else:
            trailers = upstream.trailers
            record.grpc_code = status_of(
                status, trailers.get("grpc-status") if trailers is not None else None
            )
        return broken

    async def _stream_body(
        self, out: Responder, upstream: UpstreamResponse, record: AccessRecord, route: RouteRuntime
    ) -> bool:
        """Relay the body and trailers after the head; True if the upstream broke."""
        try:
            async for chunk in upstream.iter_chunks(route.body_idle_timeout):
                await out.write(chunk)
        except (TimeoutError, UpstreamError) as exc:
            # The head is out: the only honest signal left is to cut the connection,
            # so the app cannot take a truncated body for a whole one.
            record.error = Reason.UPSTREAM_RESET
            log.warning(
                "upstream of %s broke mid-response (request %s): %r",
                route.service_name,
                record.request_id,
                exc,
            )
            out.abort()
            return True
        await out.finish(upstream.trailers.items() if upstream.trailers else None)
        return False

    async def _failure(
        self, out: Responder, record: AccessRecord, route: RouteRuntime, ex: Exchange
    ) -> None:
        attempt = ex.last
        if attempt is None:
            reason = ex.refused or Reason.NO_HEALTHY_UPSTREAM
            fallback = route.config.fallback
            if fallback is not None and not record.grpc:
                record.error = reason
                record.status = fallback.status
                await _send_fallback(out, fallback, record.request_id or "", ex.attempts, reason)
                return
            if reason is Reason.CIRCUIT_OPEN:
                retry_after = max(1, math.ceil(ex.retry_after or 0))
                await self._error(
                    out,
                    record,
                    reason,
                    route,
                    retry_after=retry_after,
                    detail=f"circuit breaker for {route.service_name} is open",
                )
                return
            if ex.deadline <= asyncio.get_running_loop().time():
                await self._error(
                    out,
                    record,
                    Reason.TIMEOUT,
                    route,
                    detail="route timeout reached before an attempt",
                )
                return
            await self._error(
                out, record, reason, route, detail=f"no healthy endpoint for {route.service_name}"
            )
            return
        if attempt.kind is Outcome.CONNECT_ERROR:
            reason = Reason.UPSTREAM_UNREACHABLE
        elif attempt.kind is Outcome.RESET:
            reason = Reason.UPSTREAM_RESET
        else:
            reason = Reason.TIMEOUT
        await self._error(
            out,
            record,
            reason,
            route,
            attempts=ex.attempts,
            detail=attempt.detail,
            error_type=attempt.error_type,
        )

    async def _error(
        self,
        out: Responder,
        record: AccessRecord,
        reason: Reason,
        route: RouteRuntime | None = None,
        *,
        detail: str | None = None,
        status: int | None = None,
        attempts: int | None = None,
        retry_after: int | None = None,
        error_type: str | None = None,
    ) -> None:
        record.error = reason
        attempts = attempts if attempts is not None else record.attempts
        if record.grpc:
            code = status if reason is Reason.FAULT_INJECTED and status is not None else None
            await self._grpc_error(
                out, record, reason, detail, attempts, code, retry_after, error_type
            )
            return
        answer = errors.error_answer(
            reason,
            route=route.name if route else None,
            service=route.service_name if route else None,
            detail=detail,
            status=status,
            attempts=attempts,
            request_id=record.request_id,
            retry_after=retry_after,
            proxy_error=error_type,
        )
        record.status = answer.status
        await out.send_whole(answer.status, None, answer.headers, answer.body, bodyless=False)

    async def _grpc_error(
        self,
        out: Responder,
        record: AccessRecord,
        reason: Reason,
        detail: str | None,
        attempts: int,
        fault_status: int | None,
        retry_after: int | None,
        error_type: str | None,
    ) -> None:
        """The sidecar's own answer to a gRPC call: Trailers-Only (HTTP 200, one head
        that ends the stream) with grpc-status, grpc-message and x-sidecar-error."""
        extra = [
            ("x-sidecar-attempts", str(attempts)),
            ("x-request-id", record.request_id or ""),
            ("proxy-status", errors.proxy_status(reason, error_type)),
        ]
        if retry_after is not None:
            extra.append(("retry-after", str(retry_after)))
        kwargs = {} if fault_status is None else {"fault_status": fault_status}
        headers = error_trailers(reason, detail, extra=extra, **kwargs)
        record.status = 200
        record.grpc_code = (
            status_for_reason(reason)
            if fault_status is None
            else status_for_reason(reason, fault_status)
        )
        await out.send_whole(200, None, headers, b"", bodyless=False)


async def _request_body(
    inbound: Inbound, route: RouteRuntime, max_retries: int
) -> bytes | StreamedBody:
    """The body buffered for replay, or streamed when it is larger than the route allows
    (or retries are off, so there is nothing to replay it for)."""
    length = inbound.content_length
    limit = route.config.retries.max_body_bytes
    if max_retries == 0 or (length is not None and length > limit):
        return StreamedBody(inbound)
    # Buffer up to the limit; past it (a chunked body), send what was read and stream the rest.
    buf = bytearray()
    while len(buf) <= limit:
        chunk = await inbound.read_chunk()
        if not chunk:
            return bytes(buf)
        buf += chunk
    return StreamedBody(inbound, prefix=bytes(buf))


# A random per-process prefix and a counter: unique, and far cheaper than uuid4 per request.
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


async def _send_fallback(
    out: Responder, fallback: FallbackConfig, rid: str, attempts: int, reason: Reason
) -> None:
    headers = list(fallback.headers)
    headers.append(("x-sidecar-attempts", str(attempts)))
    headers.append(("x-sidecar-fallback", reason))
    headers.append(("x-request-id", rid))
    await out.send_whole(fallback.status, None, headers, fallback.body, bodyless=False)


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
