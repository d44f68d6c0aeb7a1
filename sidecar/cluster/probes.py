"""One-shot endpoint probes: is this address up right now?

Shared by the active health checks (`sidecar.cluster.health`), the registration's app check
(`sidecar.registration`) and the circuit breaker's recovery probes. Each probe opens one
fresh TCP connection of its own (never a pooled one, never the proxy's), so a pass also
proves that the endpoint still accepts connections, and closes it when done.

    http_probe(address, path, timeout)   GET `path`; a 2xx response head passes
    tcp_probe(address, timeout)          the TCP handshake completes; closed at once
    grpc_health_check(address, service, timeout)
                                         grpc.health.v1.Health/Check over h2c: passes
                                         when the answer is OK with status SERVING
    health_check(config, address)        the check a service's `health_check` asks for

Both return a plain bool and never raise for anything the network does (refused, reset,
unreachable, a timeout, an answer that is not HTTP); `timeout` bounds the whole probe,
connect included. Cancellation propagates as usual. `http_check` is `http_probe` with the
reason, for callers that log it.

The gRPC check (grpc/grpc `doc/health-checking.md`) uses a throwaway h2c client
(`sidecar.upstream.h2.H2Pool`) and encodes the two one-field protobuf messages by hand:
`HealthCheckRequest{string service = 1}` and `HealthCheckResponse{ServingStatus status =
1}`, SERVING being 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

from sidecar.config.model import Address, HealthCheckConfig
from sidecar.endpoint import Endpoint
from sidecar.grpc import GRPC_CONTENT_TYPE, format_timeout, parse_status
from sidecar.upstream.base import UpstreamError, UpstreamRequest
from sidecar.upstream.h2 import H2Pool

# A probe reads only the response head; one larger than this is not a health answer.
MAX_HEAD_BYTES: Final = 64 << 10
# Interim (1xx) heads tolerated before the final one.
MAX_INTERIM: Final = 8
USER_AGENT: Final = "sidecar-probe"
GRPC_HEALTH_PATH: Final = "/grpc.health.v1.Health/Check"
SERVING: Final = 1


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    ok: bool
    detail: str  # "HTTP 200", "connection refused", "timed out after 1s", ...


# `timeout` is each probe's own setting (health_check.timeout, the breaker's probe bound),
# part of what a probe is, not a caller's deadline: hence ASYNC109 is waived below.


async def http_probe(address: Address, path: str, timeout: float) -> bool:  # noqa: ASYNC109
    """GET `path` on `address` over one new connection; True for a 2xx within `timeout`.

    HTTP/1.1 with `Connection: close` (keep-alive off): nothing is reused. Redirects are
    not followed (a 3xx fails); 1xx interim answers are skipped; the body is not read.
    """
    return (await http_check(address, path, timeout)).ok


async def tcp_probe(address: Address, timeout: float) -> bool:  # noqa: ASYNC109
    """True if a TCP connection to `address` opens within `timeout`; it is closed at once."""
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, TimeoutError):
        return False
    await _close(writer)
    return True


async def http_check(address: Address, path: str, timeout: float) -> ProbeOutcome:  # noqa: ASYNC109
    """`http_probe`, with what happened in words."""
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {address}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, limit=MAX_HEAD_BYTES
            )
            writer.write(request)
            await writer.drain()
            status = await _read_final_status(reader)
    except TimeoutError:
        return ProbeOutcome(False, f"timed out after {timeout:g}s")
    except asyncio.IncompleteReadError:
        return ProbeOutcome(False, "connection closed before a response")
    except asyncio.LimitOverrunError:
        return ProbeOutcome(False, f"response head larger than {MAX_HEAD_BYTES} bytes")
    except ValueError as exc:
        return ProbeOutcome(False, str(exc))
    except OSError as exc:
        return ProbeOutcome(False, exc.strerror or str(exc) or type(exc).__name__)
    finally:
        if writer is not None:
            await _close(writer)
    return ProbeOutcome(200 <= status < 300, f"HTTP {status}")


async def _read_final_status(reader: asyncio.StreamReader) -> int:
    """The status code of the first non-1xx response head; ValueError if not HTTP."""
    for _ in range(MAX_INTERIM + 1):
        head = await reader.readuntil(b"\r\n\r\n")
        status = _status_code(head.split(b"\r\n", 1)[0])
        if status >= 200 or status == 101:
            return status
    raise ValueError(f"more than {MAX_INTERIM} interim responses")


def _status_code(line: bytes) -> int:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP response: {line[:60]!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 599:
        raise ValueError(f"bad status code in {line[:60]!r}")
    return int(code)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # The peer may already be gone; the connection is closed either way. Bounded, so a
    # peer that never acknowledges cannot hold the caller.
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def health_check(config: HealthCheckConfig, address: Address) -> ProbeOutcome:
    """The check a service's `health_check` asks for: gRPC's or a GET of its path."""
    if config.grpc:
        return await grpc_health_check(address, config.grpc_service, config.timeout)
    return await http_check(address, config.path, config.timeout)


async def grpc_health_check(
    address: Address,
    service: str,
    timeout: float,  # noqa: ASYNC109 - the check's own setting, as above
) -> ProbeOutcome:
    """`grpc.health.v1.Health/Check` for `service` ("" is the whole server) over one new
    h2c connection; passes when the call is OK and the status is SERVING."""
    name = service.encode()
    message = (b"\x0a" + _varint(len(name)) + name) if name else b""
    request = UpstreamRequest(
        "POST",
        GRPC_HEALTH_PATH,
        str(address),
        [("content-type", GRPC_CONTENT_TYPE), ("grpc-timeout", format_timeout(timeout))],
        b"\x00" + len(message).to_bytes(4, "big") + message,
    )
    pool = H2Pool()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        response = await pool.request(
            Endpoint(address), request, connect_timeout=timeout, deadline=deadline
        )
        try:
            async with asyncio.timeout_at(deadline):
                body = await response.read()
        finally:
            response.release()
        fields = response.trailers if response.trailers is not None else response.headers
        code = parse_status(fields.get("grpc-status"))
        if code != 0:
            return ProbeOutcome(False, f"grpc-status {code}")
        status = _serving_status(body)
        return ProbeOutcome(status == SERVING, f"serving status {status}")
    except TimeoutError:
        return ProbeOutcome(False, f"timed out after {timeout:g}s")
    except (UpstreamError, OSError, ValueError) as exc:
        return ProbeOutcome(False, str(exc) or type(exc).__name__)
    finally:
        await pool.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _serving_status(body: bytes) -> int:
    """The `status` field of a framed HealthCheckResponse (0, UNKNOWN, when absent)."""
    if len(body) < 5 or body[0] != 0:
        raise ValueError("not an uncompressed gRPC message")
    size = int.from_bytes(body[1:5], "big")
    message = body[5 : 5 + size]
    if len(message) != size:
        raise ValueError("truncated gRPC message")
    i = 0
    status = 0
    while i < len(message):
        tag = message[i]
        i += 1
        if tag == 0x08:  # field 1, varint
            status, i = _read_varint(message, i)
        elif tag & 0x07 == 0:  # another varint field
            _, i = _read_varint(message, i)
        elif tag & 0x07 == 2:  # a length-delimited field
            length, i = _read_varint(message, i)
            i += length
        else:
            raise ValueError(f"unexpected protobuf wire type in field tag {tag}")
    return status


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("broken protobuf varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
