"""`sidecar demo`: built-in upstreams that misbehave on purpose, then the sidecar itself.

The shipped config/sidecar.yaml points at these addresses, so a newcomer can watch
retries hide a flaky service and the breaker fail fast for a broken one:

    127.0.0.1:19081  catalog   always healthy
    127.0.0.1:19082  orders    one reply in three is a 503 (retries hide it)
    127.0.0.1:19083  payments  always 503 (the breaker opens; the fallback answers)
    127.0.0.1:19084  greeter   gRPC over h2c: `demo.Echo/Say`; one call in four is
                               UNAVAILABLE (the route retries it)

The greeter is built on the sidecar's own HTTP/2 server layer (no grpcio at run time):
its one method takes and returns raw bytes (no protobuf), and it serves
`grpc.health.v1.Health/Check` for the service's gRPC health check.
`python -m sidecar.demo_grpc_call` calls it through the sidecar.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys

from aiohttp import web

from sidecar import grpc as grpcwire
from sidecar.config import SidecarConfig
from sidecar.http.base import Inbound, Responder
from sidecar.http.h2server import H2Server
from sidecar.logs import LineWriter
from sidecar.server import run, run_main

DEMO_UPSTREAMS = {
    "catalog": ("127.0.0.1", 19081),
    "orders": ("127.0.0.1", 19082),
    "payments": ("127.0.0.1", 19083),
}
GREETER = ("127.0.0.1", 19084)
SAY_PATH = "/demo.Echo/Say"
HEALTH_PATH = "/grpc.health.v1.Health/Check"
MAX_MESSAGE = 4096  # the greeter's request limit: it is a demo, not a service
_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data) + "\n", content_type="application/json"
    )


def build_demo_app(name: str) -> web.Application:
    counter = itertools.count(1)

    async def handle(request: web.Request) -> web.Response:
        n = next(counter)
        attempt = request.headers.get("x-sidecar-attempt")
        if name == "orders" and n % 3 == 0:
            return _json({"service": name, "error": "flaky: try again"}, status=503)
        if name == "payments":
            return _json({"service": name, "error": "payments is down"}, status=503)
        return _json({"service": name, "path": request.path, "request": n, "attempt": attempt})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"}, status=503 if name == "payments" else 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def grpc_message(payload: bytes) -> bytes:
    """One uncompressed gRPC Length-Prefixed-Message."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def grpc_payload(body: bytes) -> bytes | None:
    """The single message of a unary request body; None when it is not exactly one."""
    if len(body) < 5 or body[0] != 0:
        return None
    size = int.from_bytes(body[1:5], "big")
    return body[5:] if len(body) == 5 + size else None


class Greeter:
    """The demo's gRPC service, as an `H2Server` handler: unary `demo.Echo/Say` answers
    `hello, <request>` (raw bytes), except every fourth call, which is a Trailers-Only
    UNAVAILABLE; `grpc.health.v1.Health/Check` answers SERVING."""

    def __init__(self) -> None:
        self.calls = itertools.count(1)

    async def handle(self, inbound: Inbound, out: Responder) -> None:
        body = b""
        while chunk := await inbound.read_chunk():
            body += chunk
            if len(body) > MAX_MESSAGE + 5:
                await self._status(out, grpcwire.Status.RESOURCE_EXHAUSTED, "message too large")
                return
        if not grpcwire.is_grpc(inbound.headers.get("content-type")):
            await out.send_whole(
                415, None, [("content-type", "text/plain")], b"gRPC only\n", bodyless=False
            )
            return
        path = inbound.target
        payload = grpc_payload(body)
        if path not in (SAY_PATH, HEALTH_PATH):
            await self._status(out, grpcwire.Status.UNIMPLEMENTED, f"no method {path}")
        elif payload is None:
            await self._status(out, grpcwire.Status.INTERNAL, "expected exactly one message")
        elif path == HEALTH_PATH:
            await self._reply(out, _SERVING)
        elif next(self.calls) % 4 == 0:
            await self._status(out, grpcwire.Status.UNAVAILABLE, "flaky: try again")
        else:
            attempt = inbound.headers.get("x-sidecar-attempt", "-")
            reply = b"hello, " + payload + f" (greeter, attempt {attempt})".encode()
            await self._reply(out, reply)

    @staticmethod
    async def _reply(out: Responder, payload: bytes) -> None:
        await out.start(200, None, [("content-type", grpcwire.GRPC_CONTENT_TYPE)])
        await out.write(grpc_message(payload))
        await out.finish([("grpc-status", "0")])

    @staticmethod
    async def _status(out: Responder, code: int, message: str) -> None:
        fields = grpcwire.trailers_only(code, message)
        await out.send_whole(200, None, fields, b"", bodyless=False)


class DemoUpstreams:
    """The running demo upstreams: aiohttp apps and the h2c greeter."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.greeter: H2Server | None = None
        self.greeter_listener: asyncio.Server | None = None

    async def start(self) -> None:
        for name, (host, port) in DEMO_UPSTREAMS.items():
            runner = web.AppRunner(build_demo_app(name), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            self.runners.append(runner)
        self.greeter = H2Server(Greeter().handle)
        host, port = GREETER
        loop = asyncio.get_running_loop()
        self.greeter_listener = await loop.create_server(
            self.greeter, host, port, reuse_address=True
        )

    async def close(self) -> None:
        if self.greeter_listener is not None:
            self.greeter_listener.close()
        if self.greeter is not None:
            await self.greeter.close()
        for runner in self.runners:
            await runner.cleanup()


async def start_demo_upstreams() -> DemoUpstreams:
    upstreams = DemoUpstreams()
    try:
        await upstreams.start()
    except BaseException:
        await upstreams.close()
        raise
    return upstreams


def grpc_call_command(config: SidecarConfig) -> str:
    """The banner's gRPC command: this interpreter (relative when it lives under the
    current folder, as `make setup`'s .venv does), then the call module."""
    python = sys.executable
    relative = os.path.relpath(python)
    if not relative.startswith(".."):
        python = relative if os.sep in relative else f".{os.sep}{relative}"
    target = f"{config.listen}"
    return f"{python} -m sidecar.demo_grpc_call --target {target} newcomer"


def _instructions(config: SidecarConfig) -> str:
    base = f"http://{config.listen}"
    admin = f"http://{config.admin}"
    return "\n".join(
        [
            "",
            "sidecar demo: upstreams catalog (healthy), orders (1 in 3 fails), payments (down),",
            "  greeter (gRPC over h2c, 1 call in 4 UNAVAILABLE: the route retries it)",
            f"  open {admin}/dashboard in a browser: live tiles, one per service;",
            "  send the traffic below and watch payments turn red and the orders retries climb",
            f"  curl -i {base}/catalog/items          # healthy: x-sidecar-attempts: 1",
            f"  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -D - {base}/orders/1 "
            "| grep -i x-sidecar-attempts; done   # retries hide the 503s",
            f"  for i in 1 2 3 4 5; do curl -s {base}/payments/charge; echo; done"
            "   # 503s, then the breaker opens and the fallback answers",
            f"  while sleep 0.2; do curl -so /dev/null {base}/orders/1; "
            f"curl -so /dev/null {base}/payments/charge; done   # steady traffic to watch",
            f"  {grpc_call_command(config)}   # gRPC demo.Echo/Say",
            f"  curl -s {admin}/admin/state           # breaker state, endpoints",
            f"  curl -s {admin}/metrics | grep sidecar_circuit_breaker_state",
            "Access log: one JSON line per request below. Ctrl-C drains and stops.",
            "",
        ]
    )


async def _demo(config: SidecarConfig, writer: LineWriter) -> int:
    upstreams = await start_demo_upstreams()
    try:
        print(_instructions(config), file=sys.stderr, flush=True)
        return await run(config, writer)
    finally:
        await upstreams.close()


def run_demo(config: SidecarConfig) -> int:
    return run_main(lambda writer: _demo(config, writer))
