"""gRPC's words on the wire, and the sidecar's answers in them: pure functions, no I/O.

What lives here, each checked against gRPC's own specification (grpc/grpc,
`doc/PROTOCOL-HTTP2.md` and `doc/http-grpc-status-mapping.md`):

- the status codes 0..16, and their names as go-grpc-prometheus spells them (the
  `grpc_code` label of `sidecar_grpc_responses_total`);
- the status of an answer: its `grpc-status`, or, when it has none (a proxy or a
  misconfigured server answered), gRPC's HTTP-status-to-code table;
- `grpc-timeout`: parsing (`1*8DIGIT` then one of `H M S m u n`) and formatting the
  attempt's own timeout (whole milliseconds rounded down, at least 1, at most 8 digits);
- `grpc-message` percent-encoding: bytes outside `%x20-%x24 / %x26-%x7E` of the message's
  UTF-8 form become `%XX`; decoding never fails (a broken escape stays as it is);
- the sidecar's own error reasons as gRPC statuses, and the Trailers-Only head that
  carries one (HTTP 200, `content-type: application/grpc`, `grpc-status`,
  `grpc-message`, `x-sidecar-error`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Final

from sidecar.vocab import Reason


class Status(IntEnum):
    """gRPC status codes (grpc/grpc `doc/statuscodes.md`)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# As go-grpc-prometheus labels them (grpc-go's codes.Code.String()).
CODE_NAMES: Final[Mapping[int, str]] = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}

GRPC_CONTENT_TYPE: Final = "application/grpc"

# doc/http-grpc-status-mapping.md: only for answers without grpc-status.
_HTTP_TO_GRPC: Final[Mapping[int, Status]] = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    431: Status.INTERNAL,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}

# The sidecar's own answers to a gRPC request. fault_injected is configured per route
# (`fault.abort.grpc_status`, default 14) and so is not in this table.
REASON_STATUS: Final[Mapping[Reason, Status]] = {
    Reason.NO_ROUTE: Status.UNIMPLEMENTED,
    Reason.CIRCUIT_OPEN: Status.UNAVAILABLE,
    Reason.OVERLOADED: Status.UNAVAILABLE,
    Reason.NO_HEALTHY_UPSTREAM: Status.UNAVAILABLE,
    Reason.UPSTREAM_UNREACHABLE: Status.UNAVAILABLE,
    Reason.UPSTREAM_RESET: Status.UNAVAILABLE,
    Reason.TIMEOUT: Status.DEADLINE_EXCEEDED,
    Reason.BAD_REQUEST: Status.INTERNAL,
}
DEFAULT_FAULT_STATUS: Final = Status.UNAVAILABLE

_TIMEOUT_UNITS: Final[Mapping[str, float]] = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}
MAX_TIMEOUT_VALUE: Final = 99_999_999  # TimeoutValue is at most 8 digits

# Percent-Byte-Unencoded: space and VCHAR, except "%".
_UNENCODED: Final = frozenset(range(0x20, 0x7F)) - {0x25}


def is_grpc(content_type: str | None) -> bool:
    """True for `application/grpc`, `application/grpc+proto`, `application/grpc;...`."""
    if content_type is None:
        return False
    value = content_type.strip().lower()
    if not value.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = value[len(GRPC_CONTENT_TYPE) :]
    return not rest or rest[0] in "+;"


def code_name(code: int) -> str:
    """The go-grpc-prometheus name of a status; codes outside 0..16 count as Unknown,
    as gRPC clients read them, so the label set stays bounded."""
    return CODE_NAMES.get(code, CODE_NAMES[Status.UNKNOWN])


def parse_status(value: str | None) -> int | None:
    """A `grpc-status` value as an int; None when absent. A value that is not a
    decimal number is UNKNOWN (2): gRPC clients synthesize that for garbage."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return int(Status.UNKNOWN)
    return int(text)


def from_http_status(status: int) -> Status:
    """gRPC's code for an answer that carries no grpc-status (a 200 too: UNKNOWN)."""
    return _HTTP_TO_GRPC.get(status, Status.UNKNOWN)


def status_of(http_status: int, grpc_status: str | None) -> int:
    """The gRPC status of an answer: its grpc-status when present, else by HTTP status."""
    parsed = parse_status(grpc_status)
    if parsed is not None:
        return parsed
    return int(from_http_status(http_status))


def parse_timeout(value: str | None) -> float | None:
    """A `grpc-timeout` value in seconds; None when absent or invalid (then the call
    has no deadline of its own, as a gRPC server reads it)."""
    if value is None:
        return None
    if len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    factor = _TIMEOUT_UNITS.get(unit)
    if factor is None or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) * factor


def format_timeout(seconds: float) -> str:
    """The attempt's timeout as `grpc-timeout`: whole milliseconds rounded down, at
    least 1 (a deadline of 0 would mean "already expired"), at most 8 digits."""
    if math.isnan(seconds):
        raise ValueError("timeout is not a number")
    if math.isinf(seconds) and seconds > 0:
        return f"{MAX_TIMEOUT_VALUE}m"
    millis = math.floor(seconds * 1000.0 + 1e-9)  # 0.3 s is 299.99999 ms in binary
    millis = max(1, min(millis, MAX_TIMEOUT_VALUE))
    return f"{millis}m"


def encode_message(message: str) -> str:
    """Percent-encode a `grpc-message` value (its UTF-8 bytes; `%XX` upper-case)."""
    data = message.encode("utf-8", "surrogateescape")
    if all(b in _UNENCODED for b in data):
        return message
    return "".join(chr(b) if b in _UNENCODED else f"%{b:02X}" for b in data)


def decode_message(value: str) -> str:
    """Decode a `grpc-message` value; a broken escape is kept as it is, never an error."""
    if "%" not in value:
        return value
    raw = value.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and _is_hex(raw[i + 1]) and _is_hex(raw[i + 2]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(b)
        i += 1
    return out.decode("utf-8", "replace")


def _is_hex(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x46 or 0x61 <= b <= 0x66


def status_for_reason(reason: Reason, fault_status: int = DEFAULT_FAULT_STATUS) -> int:
    """The grpc-status of the sidecar's own answer for `reason`."""
    if reason == Reason.FAULT_INJECTED:
        return fault_status
    return int(REASON_STATUS.get(reason, Status.UNAVAILABLE))


def trailers_only(
    status: int,
    message: str,
    *,
    reason: Reason | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The header list of a Trailers-Only answer (sent with HTTP status 200 as one
    HEADERS frame that ends the stream). `extra` (x-sidecar-attempts, x-request-id)
    follows the gRPC fields."""
    headers = [
        ("content-type", GRPC_CONTENT_TYPE),
        ("grpc-status", str(status)),
        ("grpc-message", encode_message(message)),
    ]
    if reason is not None:
        headers.append(("x-sidecar-error", str(reason)))
    headers.extend(extra)
    return headers


def error_trailers(
    reason: Reason,
    detail: str | None = None,
    *,
    fault_status: int = DEFAULT_FAULT_STATUS,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The Trailers-Only head of the sidecar's own error: the status for `reason`, and a
    grpc-message naming the reason (then the detail, when there is one)."""
    message = str(reason) if not detail else f"{reason}: {detail}"
    return trailers_only(
        status_for_reason(reason, fault_status), message, reason=reason, extra=extra
    )
