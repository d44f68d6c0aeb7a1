"""Answers the sidecar makes itself (docs/contract.md#errors).

Every such answer has a JSON body `{"error", "route", "service", "detail"}`, the header
`x-sidecar-error: <reason>` and an RFC 9209 `Proxy-Status` naming the error type. The
reason is the stable, documented part; `detail` is a human sentence that may change.
"""

from __future__ import annotations

import json
from typing import Final, NamedTuple

from sidecar.http.response import WholeResponse
from sidecar.vocab import Reason

NO_ROUTE: Final = Reason.NO_ROUTE
CIRCUIT_OPEN: Final = Reason.CIRCUIT_OPEN
OVERLOADED: Final = Reason.OVERLOADED
NO_HEALTHY_UPSTREAM: Final = Reason.NO_HEALTHY_UPSTREAM
UPSTREAM_UNREACHABLE: Final = Reason.UPSTREAM_UNREACHABLE
UPSTREAM_RESET: Final = Reason.UPSTREAM_RESET
TIMEOUT: Final = Reason.TIMEOUT
FAULT_INJECTED: Final = Reason.FAULT_INJECTED
BAD_REQUEST: Final = Reason.BAD_REQUEST

STATUS: Final = {
    NO_ROUTE: 404,
    CIRCUIT_OPEN: 503,
    OVERLOADED: 503,
    NO_HEALTHY_UPSTREAM: 503,
    UPSTREAM_UNREACHABLE: 502,
    UPSTREAM_RESET: 502,
    TIMEOUT: 504,
    BAD_REQUEST: 400,
}

# RFC 9209 error types for each reason; `proxy_error=` refines the two that have several
# (upstream_unreachable: connection_refused / connection_timeout / dns_error;
# upstream_reset: http_protocol_error / connection_terminated).
PROXY_STATUS: Final = {
    NO_ROUTE: "destination_not_found",
    CIRCUIT_OPEN: "destination_unavailable",
    NO_HEALTHY_UPSTREAM: "destination_unavailable",
    OVERLOADED: "connection_limit_reached",
    UPSTREAM_UNREACHABLE: "connection_refused",
    UPSTREAM_RESET: "http_protocol_error",
    TIMEOUT: "http_response_timeout",
    BAD_REQUEST: "http_request_error",
    FAULT_INJECTED: "proxy_internal_response",
}


def proxy_status(reason: Reason, error_type: str | None = None) -> str:
    """The RFC 9209 `Proxy-Status` value of a sidecar-made error."""
    kind = error_type or PROXY_STATUS.get(reason, "proxy_internal_error")
    return f'sidecar; error={kind}; details="{reason}"'


class Answer(NamedTuple):
    """A complete answer: status, headers in order, body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def error_body(reason: Reason, route: str | None, service: str | None, detail: str | None) -> bytes:
    return json.dumps(
        {"error": reason, "route": route, "service": service, "detail": detail},
        separators=(",", ":"),
    ).encode()


def error_answer(
    reason: Reason,
    *,
    route: str | None = None,
    service: str | None = None,
    detail: str | None = None,
    status: int | None = None,
    attempts: int = 0,
    request_id: str | None = None,
    retry_after: int | None = None,
    proxy_error: str | None = None,
) -> Answer:
    headers = [
        ("Content-Type", "application/json"),
        ("x-sidecar-error", reason),
        ("x-sidecar-attempts", str(attempts)),
        ("Proxy-Status", proxy_status(reason, proxy_error)),
    ]
    if request_id is not None:
        headers.append(("x-request-id", request_id))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return Answer(
        status if status is not None else STATUS[reason],
        headers,
        error_body(reason, route, service, detail),
    )


def error_response(
    reason: Reason, *, status: int | None = None, detail: str | None = None
) -> WholeResponse:
    """An error as an aiohttp response, for answers made outside the proxy's handler."""
    answer = error_answer(reason, status=status, detail=detail)
    return WholeResponse(answer.status, answer.headers, answer.body)
