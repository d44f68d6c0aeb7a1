"""Keep-alive connections per endpoint, and the one entry point: `UpstreamPool.request`.

A connection goes back to its endpoint's idle list only when its exchange ended cleanly
(`H1Connection.reusable`: exactly one complete response, keep-alive, the whole request
written, nothing else received). Idle lists are LIFO (a warm connection first) and capped.

Idle limits (the keep-alive race): a connection idle longer than its limit is closed, never
handed out. The limit is the service's `idle_timeout` (`UpstreamRequest.idle_timeout`,
default `DEFAULT_IDLE_TIMEOUT`), lowered by the upstream's own `Keep-Alive: timeout=N`
to at least max(10 %, 250 ms) before N, because the upstream's FIN may be in flight at
exactly N. A timer that runs only while idle connections exist closes expired ones, so
their sockets do not linger.

Before an idle connection is handed out it must have seen no EOF or error and, when it
was idle for more than `PEEK_AFTER`, the kernel must hold no pending EOF or stray byte for
it (one non-blocking MSG_PEEK). That is the one place a request is ever moved to another
connection: one found closed before any byte of the request was handed to it. Once bytes
are handed over, a failure is the attempt loop's to judge (`UpstreamBroken`, sent=True):
this client never resends a request by itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Final

from sidecar.endpoint import Endpoint
from sidecar.tasks import TaskOwner
from sidecar.upstream.base import ConnectFailed, ConnectTimeout, UpstreamRequest
from sidecar.upstream.h1.connection import H1Connection
from sidecar.upstream.h1.resolver import HostCache, ResolveFailed
from sidecar.upstream.h1.response import H1Response

DEFAULT_IDLE_TIMEOUT: Final = 4.0  # the contract's default for a service's idle_timeout
MAX_IDLE_PER_ENDPOINT: Final = 256
SWEEP_INTERVAL: Final = 0.5  # how often expired idle connections are closed


def build_head(
    method: str, target: str, authority: str, headers: Iterable[tuple[str, str]], framing: str
) -> bytes:
    # Names and values come from aiohttp's server parser (no CR/LF possible) or from us;
    # surrogateescape gives back the exact bytes the app sent.
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    head = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n{fields}{framing}"
    return head.encode("utf-8", "surrogateescape")


class UpstreamPool:
    """The HTTP/1.1 `UpstreamClient`: keep-alive pools per endpoint (`host:port`), shared
    by every service."""

    def __init__(self, resolver: HostCache | None = None) -> None:
        self._idle: dict[str, list[H1Connection]] = {}
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        self.resolver = resolver if resolver is not None else HostCache()
        self.tasks = TaskOwner("upstream-h1")  # streamed request bodies being written
        self.connections_made = 0
        # asyncio.get_running_loop() costs a getpid() syscall in Python 3.11; the pool
        # looks the loop up once per loop it runs on.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the pool ------------------------------------------------------------------------

    def release(self, conn: H1Connection) -> None:
        """The exchange on `conn` is over: pool it if it may carry another, else close it."""
        if self._closed or not conn.reusable():
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        loop = self._running_loop()
        conn.idle(loop.time())
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_INTERVAL, self._expire_idle)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _take_idle(self, key: str, now: float) -> H1Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reuse_ok(now):
                return conn
            conn.close()  # found closed or expired before any byte was handed to it
        return None

    def _expire_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        left = 0
        for key in list(self._idle):
            idle = self._idle[key]
            keep = []
            for conn in idle:
                if conn.closed or now >= conn.expires_at:
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
                left += len(keep)
            else:
                del self._idle[key]
        if left and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._expire_idle)

    def idle_count(self, key: str | None = None) -> int:
        """Idle connections (to one endpoint, or all): for tests and the admin view."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def idle_connections(self, key: str) -> tuple[H1Connection, ...]:
        """The idle connections to one endpoint, most recently used last."""
        return tuple(self._idle.get(key, ()))

    async def _connect(self, endpoint: Endpoint, limit: float) -> H1Connection:
        loop = asyncio.get_running_loop()
        host = endpoint.address.host
        port = endpoint.address.port
        key = endpoint.key
        try:
            async with asyncio.timeout(limit):
                addresses = await self.resolver.resolve(host, port)
                failure: OSError | None = None
                for family, address in addresses:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        await loop.sock_connect(sock, address)
                        conn = H1Connection(self, key, sock)
                        await loop.create_connection(lambda: conn, sock=sock)  # noqa: B023
                    except OSError as exc:
                        sock.close()
                        failure = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    self.connections_made += 1
                    return conn
        except TimeoutError:
            raise ConnectTimeout(f"connect timeout after {limit * 1000:.0f}ms") from None
        except ResolveFailed:
            raise
        assert failure is not None
        raise ConnectFailed(failure.strerror or str(failure)) from None

    # -- the client seam -----------------------------------------------------------------

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> H1Response:
        """Send one request; return once the final response head has arrived.

        `deadline` (event-loop time) bounds connecting, sending and waiting for the head:
        past it the exchange fails with `TimeoutError` and its connection is discarded.
        One timer handle per exchange is much cheaper than `asyncio.timeout()` here.
        """
        body = request.body
        chunked = False
        if isinstance(body, bytes):
            framing = f"Content-Length: {len(body)}\r\n\r\n"
        elif body is None:
            framing = "\r\n"
        elif request.content_length is not None:
            framing = f"Content-Length: {request.content_length}\r\n\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n\r\n"
            chunked = True
        method = request.method
        head = build_head(method, request.target, request.authority, request.headers, framing)
        loop = self._running_loop()
        conn = self._take_idle(endpoint.key, loop.time())
        if conn is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no time left to connect")
            if connect_timeout < remaining:
                conn = await self._connect(endpoint, connect_timeout)
            else:
                try:
                    conn = await self._connect(endpoint, remaining)
                except ConnectTimeout:
                    # The attempt's own deadline, not connect_timeout, is what ran out.
                    raise TimeoutError("the attempt's deadline passed while connecting") from None
        idle_timeout = request.idle_timeout
        conn.begin(
            request.on_interim,
            method == "HEAD",
            DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
        )
        timer = loop.call_at(deadline, conn.expire)
        try:
            return await conn.exchange(head, body, chunked)
        except BaseException:
            conn.close()  # failed, cancelled or timed out mid-exchange: its state is unknown
            raise
        finally:
            timer.cancel()

    def forget(self, endpoint: Endpoint) -> None:
        for conn in self._idle.pop(endpoint.key, ()):
            conn.close()

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await self.tasks.close()
