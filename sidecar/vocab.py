"""The sidecar's words, each written once: error reasons, outcome kinds, states.

These strings are part of the outside contract (docs/contract.md): they appear in
`x-sidecar-error`, in JSON bodies and the access log, in `/admin/state` and as metric label
values. A `StrEnum` member *is* its string (`Reason.TIMEOUT == "timeout"`), so the values
go onto the wire and into label sets as they are, and a typo is a lint error instead of a
new label value.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why the sidecar answered itself instead of relaying an upstream response."""

    NO_ROUTE = "no_route"
    CIRCUIT_OPEN = "circuit_open"
    OVERLOADED = "overloaded"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_RESET = "upstream_reset"
    TIMEOUT = "timeout"
    FAULT_INJECTED = "fault_injected"
    BAD_REQUEST = "bad_request"
    # Not an answer the sidecar sends: the access log's `error` when the app hung up.
    CLIENT_CLOSED = "client_closed"


class Outcome(StrEnum):
    """What one attempt produced; all but RESPONSE are also `result` label values."""

    CONNECT_ERROR = "connect_error"  # the request never left: refused, unreachable, timeout
    RESET = "reset"  # the exchange broke, or the upstream sent something that is not HTTP
    TIMEOUT = "timeout"  # the attempt's deadline passed before the response head
    RESPONSE = "response"  # a response head arrived (any status)


class TimeoutKind(StrEnum):
    """The `kind` label of sidecar_timeouts_total."""

    PER_TRY = "per_try"
    ROUTE = "route"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class TripReason(StrEnum):
    """Which rule opened a breaker, in the order they are checked on one call."""

    CONSECUTIVE = "consecutive"
    FAILURE_RATE = "failure_rate"
    SLOW_CALL = "slow_call"


class EndpointState(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"


class ProbeResult(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class WireProtocol(StrEnum):
    """How the sidecar talks to a service's endpoints (`services.NAME.protocol`)."""

    HTTP1 = "http1"
    H2C = "h2c"
