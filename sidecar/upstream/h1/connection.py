"""One HTTP/1.1 connection to an endpoint: writes a request, parses exactly one response.

A connection carries one exchange at a time and moves through four states:

    IDLE  pooled (or new): no exchange. Any byte that arrives is stray, and the
          connection is closed: its framing can no longer be trusted.
    HEAD  a request was handed over; waiting for the final response head. Interim (1xx)
          heads are forwarded (`on_interim`) or consumed (100) on the way.
    BODY  the final head is in; body bytes go to the `H1Response`.
    DONE  the response ended. Any further byte (a second response, stray body bytes)
          poisons the connection: it is closed, never pooled.

The parser is llhttp (httptools) in strict mode, and what llhttp lets through is checked
here against what a proxy may relay:

- the head is bounded before llhttp sees it (`MAX_HEAD_BYTES` per head, fed in slices, so
  llhttp's piecewise joining of a value can never grow past it) and by field count
  (`MAX_FIELDS`); trailers have the same bounds;
- status outside 100..599 is refused; 101 is refused (the sidecar never asks to upgrade);
  100 is consumed; other 1xx go to `on_interim`, at most `MAX_INTERIM` per exchange;
- a reason phrase with control characters is refused; one with obs-text is dropped (the
  app gets the standard phrase);
- any transfer coding but a single `chunked` is refused (RFC 9112 6.1: we decode no other
  coding, and relaying coded bytes without the coding would corrupt the body silently);
  so is `Transfer-Encoding` in an HTTP/1.0 response (RFC 9112 6.1: faulty framing);
- trailers are kept apart (`H1Response.trailers`), never merged into a head;
- `Keep-Alive: timeout=N` lowers the connection's idle limit (see `idle_limit`).

Everything refused is an `UpstreamBroken`: the attempt's outcome is `reset` (502
`upstream_reset` when nothing was relayed yet), and the connection is closed.

A streamed request body is written by a task of its own while the response is read, so an
early final answer (413 before the upload ended) is seen at once: writing stops when that
answer is complete or the upstream closed, and the connection is then not reused.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Final, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.tasks import TaskOwner
from sidecar.upstream import response_headers
from sidecar.upstream.base import (
    InterimSink,
    UpstreamBroken,
    UpstreamError,
    UpstreamProtocolError,
)
from sidecar.upstream.h1.response import H1Response


class Home(Protocol):
    """What a connection needs of its pool (`UpstreamPool`)."""

    tasks: TaskOwner  # owns the tasks writing request bodies

    def release(self, conn: H1Connection) -> None: ...


MAX_HEAD_BYTES: Final = 64 * 1024  # status line, one field, or all fields of one head
MAX_FIELDS: Final = 100  # header fields of one head (trailer fields of one response)
MAX_INTERIM: Final = 8  # 1xx heads before the final one
# Within this long of being pooled, a connection is handed out without asking the kernel
# whether the upstream closed it: a server closes idle connections after seconds, and any
# FIN that arrived before the loop's last poll was already seen as connection_lost.
PEEK_AFTER: Final = 0.05
KEEP_ALIVE_MARGIN: Final = 0.25  # seconds; and at least 10 % of the announced timeout

_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2
_DONE: Final = 3

# Reasons relayed as they are; anything else is checked first.
_COMMON_REASONS: Final = {
    b"OK": "OK",
    b"Created": "Created",
    b"Accepted": "Accepted",
    b"No Content": "No Content",
    b"Moved Permanently": "Moved Permanently",
    b"Found": "Found",
    b"Not Modified": "Not Modified",
    b"Bad Request": "Bad Request",
    b"Unauthorized": "Unauthorized",
    b"Forbidden": "Forbidden",
    b"Not Found": "Not Found",
    b"Too Many Requests": "Too Many Requests",
    b"Internal Server Error": "Internal Server Error",
    b"Bad Gateway": "Bad Gateway",
    b"Service Unavailable": "Service Unavailable",
    b"Gateway Timeout": "Gateway Timeout",
}
_REASON_CONTROL: Final = bytes(c for c in range(32) if c != 9) + b"\x7f"


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp; the reason is in `_refusal`."""


def _decode(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    # As aiohttp's own parsers do: the exact bytes survive the round trip.
    return CIMultiDict(
        [
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in raw
        ]
    )


def keep_alive_limit(value: str) -> float | None:
    """How long a connection may stay idle after `Keep-Alive: timeout=N, ...`, with the
    margin (the upstream's FIN may be in flight at exactly N), or None without a timeout."""
    for param in value.split(","):
        name, _, number = param.partition("=")
        if name.strip().lower() != "timeout":
            continue
        try:
            timeout = float(number.strip().strip('"'))
        except ValueError:
            return None
        if not 0 <= timeout < 1e9:  # also NaN and inf
            return None
        return timeout - max(KEEP_ALIVE_MARGIN, timeout * 0.1)
    return None


class H1Connection(asyncio.Protocol):
    """One TCP connection to an endpoint, carrying one exchange at a time."""

    def __init__(self, pool: Home, key: str, sock: socket.socket) -> None:
        self.pool = pool
        self.key = key
        self.sock = sock  # our own socket object: the pool peeks at it before reuse
        self.transport: asyncio.Transport | None = None
        self.closed = False  # closing, closed, or the upstream's EOF was seen
        self.idle_since = 0.0
        self.expires_at = 0.0
        self.idle_limit = 0.0  # this exchange's: the service's idle_timeout, lowered by Keep-Alive
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._state = _IDLE
        self._head: asyncio.Future[H1Response] | None = None
        self._ready: H1Response | None = None  # the final head, handed over after this read
        self._response: H1Response | None = None
        self._on_interim: InterimSink | None = None
        self._is_head = False
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._fields = 0
        self._field_bytes = 0
        self._head_room = MAX_HEAD_BYTES
        self._heads = 0  # heads completed on this connection (tells one head from the next)
        self._interim = 0
        self._progress = False  # body bytes came out of the last feed
        self._stall = 0  # bytes fed in BODY state without body progress (chunk lines, trailers)
        self._refusal: UpstreamError | None = None
        self._closed_here = False  # we closed it: its EOF ends no body
        self.poisoned = False  # more than one response's bytes arrived
        self.request_done = False  # the whole request was handed to the transport
        self._writer: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._progress = False
            self._feed(data)
            if self._state == _BODY and not self._progress:
                # Chunk-size lines and trailers are not body: bound them like a head, so
                # llhttp never joins a giant trailer value or chunk extension.
                self._stall += len(data)
                if self._stall > MAX_HEAD_BYTES:
                    self._fail(
                        UpstreamProtocolError(
                            f"upstream chunk framing or trailers over {MAX_HEAD_BYTES} bytes"
                        )
                    )
            else:
                self._stall = 0
        elif state == _HEAD:
            if len(data) <= self._head_room:
                self._head_room -= len(data)
                self._feed(data)
            else:
                self._feed_head(memoryview(data))
        else:
            # IDLE: bytes nobody asked for. DONE: bytes after the response's end. Either way
            # this connection's framing can no longer be trusted.
            self.poisoned = True
            self.close()
        response = self._ready
        if response is not None:
            # The head is handed over only once the whole read is parsed: an error in the
            # same bytes (a bad first chunk) then fails the attempt cleanly (502), instead
            # of breaking a response already relayed.
            self._ready = None
            head = self._head
            if head is not None and not head.done():
                head.set_result(response)

    def _feed_head(self, data: memoryview) -> None:
        """Feed a head no further than its room: llhttp never holds more of one head
        than MAX_HEAD_BYTES, and a head that does not end within its room is refused."""
        while len(data):
            state = self._state
            if state == _BODY:
                self._feed(data)
                return
            if state != _HEAD:
                self.poisoned = True
                self.close()
                return
            room = self._head_room
            if len(data) <= room:
                self._head_room = room - len(data)
                self._feed(data)
                return
            heads = self._heads
            self._head_room = 0
            if not self._feed(data[:room]):
                return
            if self._state == _HEAD and self._heads == heads:
                self._fail(
                    UpstreamProtocolError(f"upstream response head over {MAX_HEAD_BYTES} bytes")
                )
                return
            data = data[room:]

    def _feed(self, data: bytes | memoryview) -> bool:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols without being asked"))
            return False
        except httptools.HttpParserError as exc:
            refusal = self._refusal
            if refusal is not None:
                self._fail(refusal)
            elif self._state == _DONE:
                self.poisoned = True  # garbage after a complete response
                self.close()
            else:
                self._fail(UpstreamProtocolError(f"malformed response from upstream: {exc}"))
            return False
        return True

    def eof_received(self) -> bool | None:
        self.closed = True
        return None  # let the transport close; connection_lost ends a body read to EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self._state in (_HEAD, _BODY) and not self._closed_here:
            self._read_what_is_left()
        state = self._state
        response = self._response
        if (
            state == _BODY
            and response is not None
            and response.until_eof
            and exc is None
            and not self._closed_here
        ):
            self._finish()  # a body delimited by the connection closing ends here
        elif state in (_HEAD, _BODY):
            reason = f"connection lost: {exc}" if exc else "upstream closed the connection"
            self._fail(UpstreamBroken(reason))
        self._wake_writer(UpstreamBroken("connection closed"))

    def _read_what_is_left(self) -> None:
        """The transport died on an error, often a write into a connection the upstream
        reset after answering early (413 to an upload it will not read). The answer may
        still wait in the kernel, ahead of the reset: read it from the socket, which the
        transport closes only after this callback."""
        for _ in range(64):  # at most 4 MiB: what a receive buffer can hold
            if self._state not in (_HEAD, _BODY):
                return
            try:
                data = self.sock.recv(65536)
            except OSError:  # nothing more (BlockingIOError), or the reset itself
                return
            if not data:
                return
            self.data_received(data)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            self.poisoned = True  # a second response: never read it as anyone's answer
            raise _Stop
        self._reason = b""
        self._raw = []
        self._fields = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status  # llhttp may deliver it in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")  # llhttp drops leading whitespace only
        if self._state == _HEAD:
            raw = self._raw
            raw.append((name, value))
            if len(raw) > MAX_FIELDS:
                raise self._refuse(f"upstream sent more than {MAX_FIELDS} header fields")
            return
        self._fields += 1
        if self._fields > MAX_FIELDS:
            raise self._refuse(f"upstream sent more than {MAX_FIELDS} header fields")
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_HEAD_BYTES:
            raise self._refuse(f"upstream trailers over {MAX_HEAD_BYTES} bytes")
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._heads += 1
        status = self._parser.get_status_code()
        if status < 200:
            self._interim_head(status)
            return
        if status > 599:
            raise self._refuse(f"upstream status {status} is outside 100..599")
        headers = _decode(self._raw)
        self._raw = []
        reason = self._reason
        text = _COMMON_REASONS.get(reason)
        if text is None and reason:
            text = self._check_reason(reason)
        response = H1Response(self, status, text, headers)
        if "Transfer-Encoding" in headers:
            self._check_transfer_coding(headers)
            response.content_length = None
        parser = self._parser
        response.keep_alive = not self._is_head and parser.should_keep_alive()
        keep_alive = headers.get("Keep-Alive")
        if keep_alive is not None:
            limit = keep_alive_limit(keep_alive)
            if limit is not None and limit < self.idle_limit:
                self.idle_limit = limit
        self._response = response
        self._fields = 0
        self._state = _BODY
        self._stall = 0
        if self._is_head or status in (204, 304):
            # No body follows (for HEAD llhttp would wait for the announced one; the
            # connection is not reused after HEAD, so its parser state never matters).
            response.until_eof = False
            if self._is_head:
                self._finish()
        self._ready = response

    def _interim_head(self, status: int) -> None:
        if status == 101:
            raise self._refuse("upstream switched protocols without being asked")
        if status < 100:
            raise self._refuse(f"upstream status {status} is outside 100..599")
        self._interim += 1
        if self._interim > MAX_INTERIM:
            raise self._refuse(f"upstream sent more than {MAX_INTERIM} interim responses")
        raw = self._raw
        self._raw = []
        self._head_room = MAX_HEAD_BYTES  # the next head's own allowance
        if status == 100 or self._on_interim is None:
            return  # 100 Continue is ours: we never ask for it, and the app got its own
        try:
            self._on_interim(status, response_headers(CIMultiDictProxy(_decode(raw))))
        except Exception as exc:  # the app's connection is gone: nothing to forward to
            raise self._refuse(f"interim response could not be forwarded: {exc}") from exc

    def on_body(self, body: bytes) -> None:
        if self._state == _BODY:
            self._progress = True
            response = self._response
            assert response is not None
            response.feed(body)

    def on_message_complete(self) -> None:
        if self._state == _BODY:
            self._progress = True
            self._finish()
        # HEAD state: an interim response ended; the final one follows.

    def _finish(self) -> None:
        response = self._response
        assert response is not None
        self._state = _DONE
        if response.keep_alive:
            response.keep_alive = self._parser.should_keep_alive()
        trailers = self._trailers
        if trailers is not None:
            self._trailers = None
            response.trailers = CIMultiDictProxy(_decode(trailers))
        response.feed_eof()
        if self._writer is not None and not self.request_done:
            # The answer is complete before the upload is: the upstream wants no more.
            self._stop_writer()

    def _refuse(self, message: str) -> _Stop:
        """What a parser callback raises to refuse the response: llhttp stops, and
        `_feed` fails the exchange with this message."""
        self._refusal = UpstreamProtocolError(message)
        return _Stop(message)

    def _check_reason(self, reason: bytes) -> str | None:
        if reason.translate(None, _REASON_CONTROL) != reason:
            raise self._refuse("upstream status line has a control character in its reason")
        if not reason.isascii():
            return None  # obs-text: valid, but not relayable as text; the app gets the default
        return reason.decode("ascii")

    def _check_transfer_coding(self, headers: CIMultiDict[str]) -> None:
        codings = [
            c.strip().lower() for v in headers.getall("Transfer-Encoding") for c in v.split(",")
        ]
        codings = [c for c in codings if c]
        if codings != ["chunked"]:
            raise self._refuse(
                f"upstream transfer coding {', '.join(codings) or '(empty)'!r} is not supported"
            )
        if self._parser.get_http_version() != "1.1":
            raise self._refuse("Transfer-Encoding in an HTTP/1.0 response")

    # -- the exchange --------------------------------------------------------------------

    def begin(self, on_interim: InterimSink | None, is_head: bool, idle_limit: float) -> None:
        """Start an exchange (the connection was just taken from the pool or made)."""
        self._state = _HEAD
        self._response = None
        self._on_interim = on_interim
        self._is_head = is_head
        self.idle_limit = idle_limit
        self._head_room = MAX_HEAD_BYTES
        self._interim = 0
        self._field_bytes = 0
        self.request_done = False
        self._head = self._loop.create_future()

    def release(self) -> None:
        """Its response is done with: the pool keeps the connection or closes it."""
        self.pool.release(self)

    def reuse_ok(self, now: float) -> bool:
        """May this idle connection carry another request? Cheap checks first."""
        if self.closed or now >= self.expires_at:
            return False
        if now - self.idle_since < PEEK_AFTER:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing pending: open, and no stray bytes
        except OSError:
            return False
        return False  # b"" (the upstream closed it) or stray bytes

    def reusable(self) -> bool:
        """After the response: may the connection go back to the pool?"""
        response = self._response
        transport = self.transport
        return (
            self._state == _DONE
            and response is not None
            and response.keep_alive
            and self.request_done
            and not self.poisoned
            and not self.closed
            and transport is not None
            and transport.get_write_buffer_size() == 0
            and self.idle_limit > 0
        )

    def idle(self, now: float) -> None:
        self._state = _IDLE
        self._response = None
        self._on_interim = None
        self._head = None
        self.idle_since = now
        self.expires_at = now + self.idle_limit

    async def exchange(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool
    ) -> H1Response:
        transport = self.transport
        assert transport is not None and self._head is not None
        if body is None:
            transport.write(head)
            self.request_done = True
        elif isinstance(body, bytes):
            if len(body) < 16384:
                transport.write(head + body)  # one segment for the common small request
            else:
                transport.writelines((head, body))
            self.request_done = True
        else:
            transport.write(head)
            self._writer = self.pool.tasks.spawn(self._write_body(body, chunked), "request-body")
        return await self._head

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream the request body; ends early when the answer made it pointless."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed or self._state == _DONE:
                    return
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
            if self.closed or self._state == _DONE:
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            self.request_done = True
        except UpstreamError:
            return  # the connection went; the exchange fails (or ended) on its own
        except Exception as exc:
            # The app's side of the body broke: the exchange cannot complete.
            head = self._head
            if head is not None and not head.done():
                head.set_exception(exc)
            self.close()
        finally:
            self._writer = None
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    def _stop_writer(self) -> None:
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            self._writer = None

    def _wake_writer(self, exc: UpstreamError) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(exc)
            drain.exception()  # retrieved: nobody may be waiting any more

    def _fail(self, exc: UpstreamError | TimeoutError) -> None:
        self._ready = None
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        response = self._response
        if response is not None and not response.complete:
            response.feed_error(exc)
        self._state = _DONE
        self.close()

    def close(self) -> None:
        self.closed = True
        self._closed_here = True
        self._stop_writer()
        self._wake_writer(UpstreamBroken("connection closed"))
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        """The exchange's deadline passed: fail whatever waits, and drop the connection."""
        if self._state == _HEAD:
            self._fail(TimeoutError("no response before the attempt's deadline"))
