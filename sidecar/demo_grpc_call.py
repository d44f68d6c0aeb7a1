"""`python -m sidecar.demo_grpc_call`: one gRPC call to the demo's greeter, through the sidecar.

    python -m sidecar.demo_grpc_call [--target 127.0.0.1:15001] [--timeout 2] [NAME]

Calls `demo.Echo/Say` (raw bytes in and out, no protobuf) on `--target`, the sidecar's
`listen` address, which routes it over h2c to the demo's greeter (`sidecar demo`).
It uses grpcio's client when grpcio is installed (the dev extras: `make setup`), and
otherwise the sidecar's own h2c client, so the demo needs nothing but the sidecar.
Prints the status, the reply and the sidecar's `x-sidecar-attempts`; exits 0 on OK, 1
on any other status, 2 when the call could not be made at all.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from sidecar import grpc as grpcwire
from sidecar.config.addresses import parse_address
from sidecar.demo import SAY_PATH, grpc_message, grpc_payload
from sidecar.endpoint import Endpoint
from sidecar.upstream.base import UpstreamError, UpstreamRequest
from sidecar.upstream.h2 import H2Pool


@dataclass(frozen=True, slots=True)
class Result:
    client: str  # which client made the call
    code: int
    message: str
    reply: bytes | None
    attempts: str | None  # the sidecar's x-sidecar-attempts


def _grpcio_call(target: str, name: bytes, timeout: float) -> Result | None:
    """The call with grpcio's client; None when grpcio is not installed."""
    try:
        import grpc  # optional: the dev extras
    except ImportError:
        return None
    with grpc.insecure_channel(target) as channel:
        # No (de)serializers: raw bytes both ways.
        say: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SAY_PATH)
        try:
            reply, call = say.with_call(name, timeout=timeout)
            metadata = list(call.initial_metadata() or ())
            return Result("grpcio", 0, "", reply, _attempts(metadata))
        except grpc.RpcError as exc:
            # grpcio raises errors that are both RpcError and Call; a bare RpcError has no
            # code() at run time, though the stubs give it one (so mypy would call the
            # isinstance branch unreachable): look at the error as an object.
            error: object = exc
            if isinstance(error, grpc.Call):
                code, details = error.code(), error.details()
                metadata = list(error.trailing_metadata() or ())
            else:
                code, details, metadata = grpc.StatusCode.UNKNOWN, str(exc), []
            return Result("grpcio", code.value[0], details or "", None, _attempts(metadata))


def _attempts(metadata: list[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "x-sidecar-attempts":
            return value if isinstance(value, str) else value.decode()
    return None


async def _h2_call(target: str, name: bytes, limit: float) -> Result:
    """The same call with the sidecar's own h2c client (gRPC framing by hand)."""
    address = parse_address(target)
    request = UpstreamRequest(
        "POST",
        SAY_PATH,
        target,
        [
            ("content-type", grpcwire.GRPC_CONTENT_TYPE),
            ("te", "trailers"),
            ("grpc-timeout", grpcwire.format_timeout(limit)),
        ],
        grpc_message(name),
    )
    pool = H2Pool()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    try:
        response = await pool.request(
            Endpoint(address), request, connect_timeout=limit, deadline=deadline
        )
        try:
            async with asyncio.timeout_at(deadline):
                body = await response.read()
        finally:
            response.release()
    finally:
        await pool.close()
    fields = response.trailers if response.trailers is not None else response.headers
    code = grpcwire.status_of(response.status, fields.get("grpc-status"))
    message = grpcwire.decode_message(fields.get("grpc-message", ""))
    reply = grpc_payload(body) if code == 0 else None
    return Result(
        "sidecar h2c client", code, message, reply, response.headers.get("x-sidecar-attempts")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo_grpc_call",
        description="Call the demo's gRPC greeter (demo.Echo/Say) through the sidecar.",
    )
    parser.add_argument("name", nargs="?", default="newcomer", help="what to send")
    parser.add_argument(
        "--target", default="127.0.0.1:15001", help="the sidecar's listen address (host:port)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="the call's deadline, seconds")
    args = parser.parse_args(argv)
    name = args.name.encode()
    try:
        result = _grpcio_call(args.target, name, args.timeout)
        if result is None:
            result = asyncio.run(_h2_call(args.target, name, args.timeout))
    except (UpstreamError, OSError, TimeoutError, ValueError) as exc:
        print(f"{SAY_PATH} via {args.target}: no answer: {exc or type(exc).__name__}")
        return 2
    status = grpcwire.Status(result.code).name if 0 <= result.code <= 16 else str(result.code)
    print(f"{SAY_PATH} via {args.target} ({result.client}): {status}")
    if result.reply is not None:
        print(f"  reply: {result.reply.decode('utf-8', 'replace')}")
    if result.message:
        print(f"  grpc-message: {result.message}")
    print(f"  x-sidecar-attempts: {result.attempts or '-'}")
    return 0 if result.code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
