"""The upstream boundary: one attempt to one endpoint, and the header rules around it.

The client's exceptions are mapped here, once, to the outcome kinds the rest of the
sidecar reasons about (the `result` labels of docs/contract.md#metrics):

    connect_error  the request never left: refused, unreachable, connect timeout
    reset          the connection broke, or the upstream sent something that is not HTTP
    timeout        the attempt's deadline passed before the response head arrived
    response       a response head arrived (any status)

`asyncio.CancelledError` is never mapped: it belongs to whoever cancelled us.
The clients live beside it (`base` is the seam); this module owns what goes into a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy

from sidecar.endpoint import Endpoint
from sidecar.grpc import parse_status
from sidecar.tracing import TraceContext
from sidecar.upstream.base import (
    ConnectFailed,
    ConnectTimeout,
    NameNotResolved,
    UpstreamClient,
    UpstreamProtocolError,
    UpstreamRequest,
    UpstreamResponse,
)
from sidecar.vocab import Outcome

if TYPE_CHECKING:
    from sidecar.resilience.breaker import Trial

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    }
)
# Our own per-request controls: consumed here, re-issued with our values.
SIDECAR_REQUEST_HEADERS: Final = frozenset({"x-sidecar-timeout-ms", "x-sidecar-max-retries"})


_EMPTY: Final = frozenset[str]()
# Bound once: an enum member looked up on its class costs about twice a global.
_CONNECT_ERROR: Final = Outcome.CONNECT_ERROR
_RESET: Final = Outcome.RESET
_RESPONSE: Final = Outcome.RESPONSE
_TIMEOUT: Final = Outcome.TIMEOUT
_TRACE_FIELDS: Final = frozenset({"traceparent", "tracestate"})
_RESPONSE_DROPPED: Final = HOP_BY_HOP | frozenset({"x-request-id", "x-sidecar-attempts"})
# Request headers the loop below replaces or drops; one set lookup decides for most names.
_REQUEST_SPECIAL: Final = (
    HOP_BY_HOP
    | SIDECAR_REQUEST_HEADERS
    | frozenset(
        {
            "host",
            "x-forwarded-for",
            "x-request-id",
            "x-forwarded-proto",
            "x-forwarded-host",
            "expect",  # answered by the sidecar itself; the upstream gets the body at once
            "content-length",  # the client frames the body it sends itself
            "grpc-timeout",  # re-issued per attempt with the attempt's own timeout
            "traceparent",  # kept, or replaced by a new trace (sidecar.tracing)
            "tracestate",
        }
    )
)


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    if "Connection" not in headers:
        return _EMPTY
    listed = headers.getall("Connection")
    return frozenset(t.strip().lower() for v in listed for t in v.split(",") if t.strip())


def request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    request_id: str,
    client_ip: str | None,
    trace: TraceContext,
) -> tuple[list[tuple[str, str]], str | None]:
    """End-to-end headers for the upstream request, and the app's Host.

    Hop-by-hop fields, framing (the client frames the body itself) and our own controls
    are dropped; Host and the per-attempt headers are added per attempt.
    """
    extra = _connection_listed(incoming)
    kept: list[tuple[str, str]] = []
    original_host = None
    xff = None
    for name, value in incoming.items():
        lname = name.lower()
        if lname in _REQUEST_SPECIAL:
            if lname == "host":
                original_host = value
            elif lname == "x-forwarded-for":
                xff = value if xff is None else f"{xff}, {value}"
            elif lname in _TRACE_FIELDS and not trace.replaced:
                kept.append((name, value))  # a valid trace goes on as received
            continue
        if lname.startswith("proxy-") or (extra and lname in extra):
            continue
        kept.append((name, value))
    if trace.replaced:
        kept.append(("traceparent", trace.traceparent))
    kept.append(("X-Request-Id", request_id))
    if client_ip:
        kept.append(("X-Forwarded-For", f"{xff}, {client_ip}" if xff else client_ip))
    elif xff:
        kept.append(("X-Forwarded-For", xff))
    kept.append(("X-Forwarded-Proto", "http"))
    if original_host:
        kept.append(("X-Forwarded-Host", original_host))
    return kept, original_host


def response_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The upstream's response headers minus hop-by-hop ones and the two the proxy sets
    itself (an upstream often echoes x-request-id; one behind its own sidecar sends
    x-sidecar-attempts), in order."""
    extra = _connection_listed(upstream)
    kept: list[tuple[str, str]] = []
    for name, value in upstream.items():
        lname = name.lower()
        if lname in _RESPONSE_DROPPED or lname.startswith("proxy-") or (extra and lname in extra):
            continue
        kept.append((name, value))
    return kept


class Attempt:
    """What one attempt produced: a response head, or the kind of failure.

    `trial` is the breaker's admission for it. `error_type` is the RFC 9209
    Proxy-Status error type of a failure (connection_refused, dns_error,
    connection_timeout, connection_terminated, http_protocol_error, ...), None for a
    response or when the reason's own type says it.
    """

    __slots__ = ("detail", "endpoint", "error_type", "kind", "response", "trial")

    def __init__(
        self,
        kind: Outcome,
        endpoint: Endpoint,
        response: UpstreamResponse | None = None,
        detail: str | None = None,
        error_type: str | None = None,
    ) -> None:
        self.kind = kind
        self.endpoint = endpoint
        self.response = response
        self.detail = detail
        self.error_type = error_type
        self.trial: Trial | None = None

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else 0

    @property
    def head_grpc_status(self) -> int | None:
        """The `grpc-status` of a response head (a Trailers-Only answer), if any."""
        if self.response is None:
            return None
        return parse_status(self.response.headers.get("grpc-status"))

    @property
    def result_label(self) -> str:
        """The `result` label of sidecar_upstream_attempts_total."""
        if self.response is not None:
            return f"{self.response.status // 100}xx"
        return self.kind

    def release(self) -> None:
        if self.response is not None:
            self.response.release()


async def send(
    client: UpstreamClient,
    endpoint: Endpoint,
    request: UpstreamRequest,
    limit: float,
    connect_timeout: float,
    *,
    clock: Callable[[], float] | None = None,
) -> Attempt:
    """Send one attempt and wait for the response head, at most `limit` seconds.

    `clock` is the time base of the client's `deadline`: the running loop's `time()`
    unless the attempt loop runs on an injected clock (unit tests, with a fake client).
    """
    now = clock() if clock is not None else asyncio.get_running_loop().time()
    deadline = now + limit
    try:
        response = await client.request(
            endpoint, request, connect_timeout=connect_timeout, deadline=deadline
        )
    except ConnectFailed as exc:
        if isinstance(exc, NameNotResolved):
            kind = "dns_error"
        elif isinstance(exc, ConnectTimeout):
            kind = "connection_timeout"
        else:
            kind = "connection_refused"
        return Attempt(_CONNECT_ERROR, endpoint, detail=_describe(exc), error_type=kind)
    except TimeoutError:
        return Attempt(_TIMEOUT, endpoint, detail=f"no response within {limit * 1000:.0f}ms")
    except OSError as exc:  # UpstreamBroken, and resets the kernel reports on write
        kind = (
            "http_protocol_error"
            if isinstance(exc, UpstreamProtocolError)
            else "connection_terminated"
        )
        return Attempt(_RESET, endpoint, detail=_describe(exc), error_type=kind)
    return Attempt(_RESPONSE, endpoint, response=response)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
