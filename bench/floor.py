"""The floor of one Python hop: aiohttp's low-level server and the leanest upstream call.

`python -m bench.floor --port P --upstream HOST:PORT` answers every request by sending
`GET /` to the upstream over a kept-alive connection and relaying the body, with nothing
else: no routing, headers, retries, breaker, metrics, log or timeouts, and a response
parser that understands only `Content-Length`. The bench runs it beside the sidecar in the
small-body and c1 phases (as `aiohttp-floor`), so that one run shows what the server the
sidecar is built on costs with the cheapest possible hop behind it; what the sidecar costs
above that is its own request path. It is a yardstick, not a proxy: it trusts the upstream
(the bench's nginx) completely.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop
from aiohttp import web

FLOOR_CONFIG = "aiohttp-floor"  # its name in the bench's phases and tables


class _Hop(asyncio.Protocol):
    """One kept-alive upstream connection; one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] | None = None
        self.closed = False
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self._buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                self.closed = True  # the last answer on this connection
        if len(self._buf) >= end + 4 + length:
            body = self._buf[end + 4 : end + 4 + length]
            self._buf = self._buf[end + 4 + length :]
            if self.answer is not None and not self.answer.done():
                self.answer.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # nginx closes a connection after keepalive_requests answers
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionResetError("upstream closed"))


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    idle: list[_Hop] = []
    request_bytes = f"GET / HTTP/1.1\r\nHost: {host}:{upstream_port}\r\n\r\n".encode()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        while idle and idle[-1].closed:
            idle.pop()
        if idle:
            hop = idle.pop()
        else:
            _, hop = await loop.create_connection(_Hop, host, upstream_port)
        hop.answer = loop.create_future()
        assert hop.transport is not None
        hop.transport.write(request_bytes)
        body = await hop.answer
        if not hop.closed:
            idle.append(hop)
        return web.Response(body=body)

    server = web.Server(handler, access_log=None)
    await loop.create_server(server, "127.0.0.1", port)
    await asyncio.Event().wait()  # until the bench stops the process


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = str(args.upstream).rpartition(":")
    uvloop.run(serve(args.port, host, int(port)))


if __name__ == "__main__":
    main()
