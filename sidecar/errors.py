"""Responses the sidecar makes itself (CONTRACT §3): a JSON body and `x-sidecar-error`.

The reason is the stable, documented part; `detail` is a human sentence that may change.
"""

from __future__ import annotations

import json
from typing import Final

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


def error_body(reason: Reason, route: str | None, service: str | None, detail: str | None) -> bytes:
    return json.dumps(
        {"error": reason, "route": route, "service": service, "detail": detail},
        separators=(",", ":"),
    ).encode()


def error_response(
    reason: Reason,
    *,
    route: str | None = None,
    service: str | None = None,
    detail: str | None = None,
    status: int | None = None,
    attempts: int = 0,
    request_id: str | None = None,
    retry_after: int | None = None,
) -> WholeResponse:
    headers = [
        ("Content-Type", "application/json"),
        ("x-sidecar-error", reason),
        ("x-sidecar-attempts", str(attempts)),
    ]
    if request_id is not None:
        headers.append(("x-request-id", request_id))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return WholeResponse(
        status if status is not None else STATUS[reason],
        headers,
        error_body(reason, route, service, detail),
    )
