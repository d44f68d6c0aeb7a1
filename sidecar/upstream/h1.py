"""A lean HTTP/1.1 client for the upstream hop: keep-alive pools, streaming, strict parsing.

Why not aiohttp's ClientSession? On the proxy's hot path it was the largest single cost
(about 40 % of a request's CPU): cookie jars, redirects, traces, URL objects and timers
that a proxy hop never uses. This client does only what the hop needs:

- one idle-connection pool per endpoint (LIFO, capped, idle connections dropped after
  `IDLE_TIMEOUT`), connections made with `connect_timeout`;
- requests written as raw bytes (the head is built from headers aiohttp's server parser
  already validated), bodies sent from bytes or streamed (Content-Length or chunked) with
  write flow control;
- responses parsed by llhttp (httptools) in strict mode: a malformed status line or head
  is an error, never guessed at; 1xx interim responses are skipped; the body is streamed
  with read flow control, so memory does not follow the body.

It implements the `UpstreamClient` seam (sidecar.upstream.base), whose errors it raises:
`ConnectFailed` (the request never left) or `UpstreamBroken` (the exchange broke after
connecting); `sidecar.upstream.send` maps them to outcome kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.endpoint import Endpoint
from sidecar.upstream.base import (
    ConnectFailed,
    ConnectTimeout,
    UpstreamBroken,
    UpstreamError,
    UpstreamRequest,
)

IDLE_TIMEOUT: Final = 30.0  # below common server keep-alive timeouts (nginx 75 s, Go 90 s)
MAX_IDLE_PER_ENDPOINT: Final = 256
READ_HIGH_WATER: Final = 256 * 1024  # buffered response bytes before we pause the socket
READ_LOW_WATER: Final = 64 * 1024


class _Connection(asyncio.Protocol):
    """One TCP connection to an endpoint, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._interim = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.received_any = False
        self.idle = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Bytes nobody asked for: this connection's framing can no longer be trusted.
            self.close()
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream tried to switch protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed response from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete and response.until_eof and not exc:
            response.feed_eof()  # a body delimited by the connection closing ends here
            return
        reason = f"connection lost: {exc}" if exc else "upstream closed the connection"
        self._fail(UpstreamBroken(reason))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamBroken(reason))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim (100 Continue, 103 Early Hints): not the answer; wait for the final one.
            self._interim = True
            self._raw_headers = []
            return
        headers: CIMultiDict[str] = CIMultiDict(
            # As aiohttp's own parsers do: the exact bytes survive the round trip.
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self._raw_headers
        )
        self._raw_headers = []
        reason = self._reason.decode("utf-8", "surrogateescape")
        response = UpstreamResponse(self, status, reason, headers)
        response.keep_alive = self._parser.should_keep_alive()
        self._response = response
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response.feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is not None:
            response.keep_alive = response.keep_alive and self._parser.should_keep_alive()
            response.feed_eof()

    # -- the exchange --------------------------------------------------------------------

    def _fail(self, exc: UpstreamError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        response = self._response
        if response is not None and not response.complete:
            response.feed_error(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        """The exchange's deadline passed: fail whatever waits, and drop the connection."""
        exc = TimeoutError("no response before the attempt's deadline")
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc)
        self.close()

    async def _write_body(self, body: bytes | AsyncIterator[bytes] | None, chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        if body is None:
            return
        if isinstance(body, bytes):
            if body:
                transport.write(body)
            return
        async for chunk in body:
            if self.closed:
                raise UpstreamBroken("upstream closed the connection while the body was sent")
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused:
                self._drain = self._loop.create_future()
                await self._drain
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def exchange(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool, is_head: bool
    ) -> UpstreamResponse:
        transport = self.transport
        assert transport is not None
        self._response = None
        self._head = self._loop.create_future()
        if isinstance(body, bytes) and len(body) < 16384:
            transport.write(head + body)  # one segment for the common small request
        else:
            transport.write(head)
            await self._write_body(body, chunked)
        response = await self._head
        if is_head:
            # llhttp would wait for a HEAD response's announced body; it has none, and the
            # connection is not reused, so the parser's state never matters again.
            response.keep_alive = False
            response.feed_eof()
        return response


class UpstreamResponse:
    """A response head, with its body to stream (`iter_chunks`) or read whole (`read`)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_paused",
        "_released",
        "_waiter",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "trailers",
        "until_eof",
    )

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str]
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.until_eof = self.content_length is None and not chunked and status not in (204, 304)
        self.keep_alive = False
        self.complete = False
        self.trailers: CIMultiDictProxy[str] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._released = False

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER and not self._paused:
            transport = self._conn.transport
            if transport is not None:
                transport.pause_reading()
                self._paused = True
        self._wake()

    def feed_eof(self) -> None:
        self.complete = True
        self._wake()

    def feed_error(self, exc: UpstreamError) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `idle_timeout` bounds the silence between them."""
        loop = asyncio.get_running_loop()
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < READ_LOW_WATER:
                    self._paused = False
                    transport = self._conn.transport
                    if transport is not None:
                        transport.resume_reading()
                yield chunk
                continue
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            self._waiter = loop.create_future()
            try:
                if idle_timeout is None:
                    await self._waiter
                else:
                    async with asyncio.timeout(idle_timeout):
                        await self._waiter
            finally:
                self._waiter = None

    async def read(self, idle_timeout: float | None = None) -> bytes:
        if self.complete and len(self._chunks) <= 1:
            data = self._chunks.popleft() if self._chunks else b""
            self._buffered = 0
            return data
        return b"".join([c async for c in self.iter_chunks(idle_timeout)])

    def release(self) -> None:
        """Hand the connection back for reuse if the exchange ended cleanly, else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if self.complete and self.keep_alive and not self._chunks and not conn.closed:
            conn.pool.put_back(conn)
        else:
            conn.close()


def build_head(
    method: str, target: str, authority: str, headers: Iterable[tuple[str, str]], framing: str
) -> bytes:
    # Names and values come from aiohttp's server parser (no CR/LF possible) or from us;
    # surrogateescape gives back the exact bytes the app sent.
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append(framing)
    return "".join(lines).encode("utf-8", "surrogateescape")


class UpstreamPool:
    """Keep-alive connections per endpoint (`host:port`), shared by every service."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    def put_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.idle = True
        idle.append(conn)

    def _take_idle(self, key: str) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT:
                conn.idle = False
                conn.received_any = False
                return conn
            conn.close()
        return None

    async def _connect(self, key: str, host: str, port: int, limit: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), host, port)
        except TimeoutError:
            raise ConnectTimeout(f"connect timeout after {limit * 1000:.0f}ms") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from None
        return conn

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

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
        is_head = method == "HEAD"
        key = endpoint.key
        host = endpoint.address.host
        port = endpoint.address.port
        loop = asyncio.get_running_loop()
        conn = self._take_idle(key)
        if conn is not None:
            timer = loop.call_at(deadline, conn.expire)
            try:
                return await conn.exchange(head, body, chunked, is_head)
            except UpstreamBroken:
                conn.close()
                # The upstream may have closed this idle connection just as we reused it.
                # If it sent nothing back, the request was not processed (RFC 9112 §9.3.1):
                # send it once more on a fresh connection, when the body can be resent.
                if conn.received_any or not (body is None or isinstance(body, bytes)):
                    raise
            except BaseException:
                conn.close()  # cancelled or timed out mid-exchange: its state is unknown
                raise
            finally:
                timer.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError("no time left to connect")
        if connect_timeout < remaining:
            conn = await self._connect(key, host, port, connect_timeout)
        else:
            try:
                conn = await self._connect(key, host, port, remaining)
            except ConnectTimeout:
                # The attempt's own deadline, not connect_timeout, is what ran out.
                raise TimeoutError("the attempt's deadline passed while connecting") from None
        timer = loop.call_at(deadline, conn.expire)
        try:
            return await conn.exchange(head, body, chunked, is_head)
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()

    def forget(self, endpoint: Endpoint) -> None:
        for conn in self._idle.pop(endpoint.key, ()):
            conn.close()

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
