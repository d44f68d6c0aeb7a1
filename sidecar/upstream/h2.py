"""The h2c upstream client (`services.NAME.protocol: h2c`): multiplexed streams, pooled.

`H2Pool` implements `sidecar.upstream.base.UpstreamClient` over HTTP/2 with prior
knowledge (no TLS, no Upgrade). Per endpoint it keeps up to `max_connections` (4)
connections and puts each request on a stream of one that has room under the peer's
SETTINGS_MAX_CONCURRENT_STREAMS; it opens another connection only when all are full
(one connect at a time per endpoint; requests arriving meanwhile wait for it), and when
all `max_connections` are full a request waits for a stream to close, until its
deadline (then `TimeoutError`, as any attempt that runs out of time).

A request goes out as HEADERS (`:method`, `:scheme http`, `:path`, `:authority`, then
its headers lower-cased, connection-specific ones dropped, `te: trailers` added to a
gRPC request) and its body. A body given as an iterator is sent by a task of its own,
concurrently with the wait for the response, so bidirectional streaming works; every
DATA frame waits for the peer's stream and connection windows. `request()` returns
once the response HEADERS are in. A Trailers-Only response (HEADERS that end the
stream) is a response with an empty body whose headers carry `grpc-status`.

The response body is acknowledged (WINDOW_UPDATE) only as the caller takes chunks
from `iter_chunks`, so a slow app slows the upstream through our window
(`http2.stream_window`, `http2.connection_window`), and what we hold per stream is
bounded by it.

Resends (docs/contract.md#resends):
a stream the upstream did not process, because it answered RST_STREAM(REFUSED_STREAM)
or its number is above a GOAWAY's last stream id, is sent once more on another
connection, by this client, without counting as an attempt; only when its body can be
sent again (bytes, none, an iterator not yet started, or one the request's `replay`
gives afresh: a gRPC body kept while it fits `max_body_bytes`), else `UpstreamBroken`. Any
other reset is `UpstreamBroken`. GOAWAY frames are read by this module, not by `h2`
(see `sidecar.h2frames`), so streams under the last stream id still finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import grpc as grpcwire
from sidecar.config.model import Http2Config
from sidecar.endpoint import Endpoint
from sidecar.h2frames import FrameError, FrameReader, FrameType, RawFrame, parse_goaway
from sidecar.tasks import TaskOwner
from sidecar.upstream.base import (
    Body,
    ConnectFailed,
    ConnectTimeout,
    UpstreamBroken,
    UpstreamProtocolError,
    UpstreamRequest,
)

if TYPE_CHECKING:
    from sidecar.upstream.base import UpstreamClient, UpstreamResponse

log = logging.getLogger("sidecar.upstream.h2")

MAX_CONNECTIONS_PER_ENDPOINT: Final = 4
IDLE_TIMEOUT: Final = 30.0  # a connection without streams this long is closed
MAX_STREAMS_ASSUMED: Final = 100  # until the peer's SETTINGS say otherwise
WRITE_HIGH_WATER: Final = 64 * 1024
_CONNECTION_SPECIFIC: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "http2-settings",
    }
)


class _Refused(Exception):
    """The upstream did not process the stream: it may be sent again elsewhere."""

    def __init__(self, message: str, *, body_started: bool = False) -> None:
        super().__init__(message)
        self.body_started = body_started


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _fields(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    return CIMultiDict((_text(n), _text(v)) for n, v in raw if not n.startswith(b":"))


class _Stream:
    """One exchange's state on a connection."""

    __slots__ = (
        "body_started",
        "chunks",
        "conn",
        "data_event",
        "error",
        "head",
        "id",
        "local_ended",
        "on_interim",
        "open",
        "remote_ended",
        "response",
        "sender",
        "trailers",
        "window_event",
    )

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.head: asyncio.Future[None] = conn.loop.create_future()
        self.response: H2Response | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.data_event = asyncio.Event()
        self.window_event = asyncio.Event()
        self.error: BaseException | None = None
        self.trailers: CIMultiDictProxy[str] | None = None
        self.remote_ended = False
        self.local_ended = False
        self.open = True  # h2 still counts it against the peer's stream limit
        self.sender: asyncio.Task[Any] | None = None
        self.body_started = False
        self.on_interim: Any = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here: the waiter may be gone already
        self.data_event.set()
        self.window_event.set()


class H2Response:
    """A response head with its body and trailers (`sidecar.upstream.base.UpstreamResponse`)."""

    __slots__ = (
        "_released",
        "_stream",
        "content_length",
        "headers",
        "reason",
        "status",
        "trailers",
    )

    def __init__(self, stream: _Stream, status: int, headers: CIMultiDict[str]) -> None:
        self._stream = stream
        self._released = False
        self.status = status
        self.reason: str | None = None  # HTTP/2 has no reason phrase
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.trailers: CIMultiDictProxy[str] | None = None  # set when they arrive

    @property
    def complete(self) -> bool:
        return self._stream.remote_ended and not self._stream.chunks

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken: bounded by our stream window."""
        return sum(len(data) for data, _ in self._stream.chunks)

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        stream = self._stream
        conn = stream.conn
        while True:
            if stream.chunks:
                data, flow = stream.chunks.popleft()
                conn.ack(stream.id, flow)
                if data:
                    yield data
                continue
            if stream.remote_ended:
                return
            if stream.error is not None:
                raise stream.error
            stream.data_event.clear()
            if idle_timeout is None:
                await stream.data_event.wait()
            else:
                async with asyncio.timeout(idle_timeout):
                    await stream.data_event.wait()

    async def read(self, idle_timeout: float | None = None) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks(idle_timeout)])

    def release(self) -> None:
        """Done with the exchange: an unfinished stream is reset (CANCEL); one whose
        response ended before our body did gets RST_STREAM NO_ERROR."""
        if self._released:
            return
        self._released = True
        self._stream.conn.finish(self._stream)


class _Connection(asyncio.Protocol):
    """One TCP connection to an endpoint, carrying many streams."""

    def __init__(self, pool: H2Pool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.draining = False  # GOAWAY received, or forgotten: no new streams
        self._write_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._idle_timer: asyncio.TimerHandle | None = None
        cfg = pool.config
        self.reader = FrameReader(
            expect_preface=False, max_header_block=2 * cfg.max_header_list_size
        )

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cfg = self.pool.config
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,
                validate_outbound_headers=True,
                normalize_outbound_headers=True,
            )
        )
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                codes.ENABLE_PUSH: 0,
                codes.MAX_CONCURRENT_STREAMS: 0,  # we never take pushed streams
                codes.INITIAL_WINDOW_SIZE: cfg.stream_window,
                codes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
            },
        )
        conn.initiate_connection()
        if cfg.connection_window > 65535:
            conn.increment_flow_control_window(cfg.connection_window - 65535)
        self.h2 = conn
        self.flush()

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        if self.closed or conn is None:
            return
        try:
            for frame in self.reader.feed(data):
                if frame.type == FrameType.GOAWAY:
                    self._goaway(frame)
                else:
                    for event in conn.receive_data(frame.data):
                        self._event(event)
        except (FrameError, h2.exceptions.ProtocolError) as exc:
            log.info("HTTP/2 protocol error from upstream %s: %s", self.key, exc)
            self.flush()
            self._fail_all(UpstreamProtocolError(f"invalid HTTP/2 from upstream: {exc}"))
            self.close()
            return
        self.flush()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        reason = f"connection lost: {exc}" if exc else "upstream closed the connection"
        self._fail_all(UpstreamBroken(reason))
        self.pool.remove(self)

    # -- events ---------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.error is None:
                stream.chunks.append((event.data, event.flow_controlled_length))
                stream.data_event.set()
            elif event.flow_controlled_length:
                self.ack(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._head(stream, event.headers or [])
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.on_interim is not None:
                status = _status(event.headers or [])
                if status != 100:
                    stream.on_interim(status, list(_fields(event.headers or []).items()))
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = CIMultiDictProxy(_fields(event.headers or []))
                if stream.response is not None:
                    stream.response.trailers = stream.trailers
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_ended = True
                stream.data_event.set()
                if not stream.head.done():
                    stream.fail(UpstreamBroken("the upstream ended the stream without a response"))
                self._maybe_closed(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._reset_by_peer(stream, event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                for stream in self.streams.values():
                    stream.window_event.set()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_event.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            codes = h2.settings.SettingCodes
            if codes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream in self.streams.values():
                    stream.window_event.set()
            if codes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                self.pool.notify(self.key)

    def _head(self, stream: _Stream, raw: list[tuple[bytes, bytes]]) -> None:
        status = _status(raw)
        response = H2Response(stream, status, _fields(raw))
        stream.response = response
        if not stream.head.done():
            stream.head.set_result(None)

    def _reset_by_peer(self, stream: _Stream, code: ErrorCodes | int | None) -> None:
        stream.open = False
        if stream.remote_ended:
            pass  # a complete response, then RST_STREAM (NO_ERROR): nothing lost
        elif not stream.head.done() and code == ErrorCodes.REFUSED_STREAM:
            stream.fail(_Refused("the upstream refused the stream (REFUSED_STREAM)"))
        else:
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            stream.fail(UpstreamBroken(f"the upstream reset the stream ({name})"))
        self._stop_sender(stream)
        self._closed_stream(stream)

    def _goaway(self, frame: RawFrame) -> None:
        last, code = parse_goaway(frame)
        self.draining = True
        self.pool.retire(self)
        for stream in list(self.streams.values()):
            if stream.id > last:
                stream.open = False
                stream.fail(_Refused(f"stream {stream.id} is above GOAWAY's last stream {last}"))
                self._stop_sender(stream)
                self._closed_stream(stream)
        if code != ErrorCodes.NO_ERROR:
            log.info("upstream %s sent GOAWAY (error %s)", self.key, code)
        self._maybe_idle()

    def _fail_all(self, exc: UpstreamBroken) -> None:
        for stream in list(self.streams.values()):
            stream.open = False
            if not stream.remote_ended:
                stream.fail(exc)
            self._stop_sender(stream)
        self.streams.clear()
        self.pool.notify(self.key)

    # -- streams out ----------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and self.h2 is not None

    def room(self) -> int:
        conn = self.h2
        if conn is None:
            return 0
        peer = conn.remote_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
        limit = MAX_STREAMS_ASSUMED if peer is None else peer
        return limit - conn.open_outbound_streams

    def window(self, stream: _Stream) -> int:
        """What may be sent on `stream` right now without waiting."""
        conn = self.h2
        if conn is None or self._write_paused:
            return 0
        try:
            return conn.local_flow_control_window(stream.id)
        except h2.exceptions.ProtocolError:
            return 0

    def open_stream(self, fields: list[tuple[bytes, bytes]], *, end: bool) -> _Stream:
        conn = self.h2
        if conn is None or not self.usable:
            raise _Refused("the connection is closing")
        try:
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            raise _Refused("the upstream's stream limit is reached") from None
        except h2.exceptions.NoAvailableStreamIDError:
            self.pool.retire(self)
            raise _Refused("the connection has used up its stream ids") from None
        stream = _Stream(self, stream_id)
        stream.local_ended = end
        self.streams[stream_id] = stream
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.flush()
        return stream

    async def send_data(self, stream: _Stream, data: bytes, *, end: bool) -> None:
        conn = self.h2
        assert conn is not None
        total = len(data)
        offset = 0
        while True:
            if stream.error is not None or not stream.open or self.closed:
                raise _StreamGone
            if self._write_paused:
                await self._can_write.wait()
                continue
            room = 0
            if offset < total:
                try:
                    window = conn.local_flow_control_window(stream.id)
                except h2.exceptions.ProtocolError:
                    raise _StreamGone from None
                if window <= 0:
                    stream.window_event.clear()
                    await stream.window_event.wait()
                    continue
                room = min(window, conn.max_outbound_frame_size, total - offset)
            last = offset + room >= total
            try:
                conn.send_data(stream.id, data[offset : offset + room], end_stream=end and last)
            except h2.exceptions.ProtocolError:
                raise _StreamGone from None
            offset += room
            self.flush()
            if last:
                break
        if end:
            stream.local_ended = True
            self._maybe_closed(stream)

    async def send_body(self, stream: _Stream, body: bytes | AsyncIterator[bytes]) -> None:
        """Send a request body (a task of its own: it runs beside the wait for the
        response, and on while the response streams)."""
        try:
            if isinstance(body, bytes):
                await self.send_data(stream, body, end=True)
                return
            stream.body_started = True
            async for chunk in body:
                if chunk:
                    await self.send_data(stream, chunk, end=False)
            await self.send_data(stream, b"", end=True)
        except _StreamGone:
            return
        except (OSError, ValueError, RuntimeError) as exc:
            # The app's body broke (it hung up): the upstream must not take the part
            # it got for a whole request.
            stream.fail(UpstreamBroken(f"the request body failed: {exc}"))
            self.reset(stream, ErrorCodes.CANCEL)

    def expire(self, stream: _Stream) -> None:
        """The attempt's deadline passed before the head: give up on the stream."""
        if stream.head.done():
            return
        stream.fail(TimeoutError("no response before the attempt's deadline"))
        self.reset(stream, ErrorCodes.CANCEL)

    def finish(self, stream: _Stream) -> None:
        """The caller is done with the stream (`H2Response.release`, or an error)."""
        self._stop_sender(stream)
        if stream.open:
            self.reset(stream, ErrorCodes.NO_ERROR if stream.remote_ended else ErrorCodes.CANCEL)
        unread = sum(flow for _, flow in stream.chunks)
        stream.chunks.clear()
        if unread and not self.closed:
            self.ack(stream.id, unread)
        self.streams.pop(stream.id, None)
        self._maybe_idle()

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        if not stream.open:
            return
        stream.open = False
        conn = self.h2
        if conn is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.reset_stream(stream.id, code)
            self.flush()
        self._closed_stream(stream)

    def _stop_sender(self, stream: _Stream) -> None:
        sender = stream.sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()

    def _maybe_closed(self, stream: _Stream) -> None:
        if stream.remote_ended and stream.local_ended and stream.open:
            stream.open = False
            self._closed_stream(stream)

    def _closed_stream(self, stream: _Stream) -> None:
        """h2 no longer counts the stream: a slot is free on this connection."""
        if stream.response is None or stream.error is not None:
            # Nobody will read it (failed before or without a head): forget it now.
            self.streams.pop(stream.id, None)
        self.pool.notify(self.key)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.closed or any(s.open or s.response is not None for s in self.streams.values()):
            return
        if self.draining:
            self.close()
        elif self._idle_timer is None:
            self._idle_timer = self.loop.call_later(IDLE_TIMEOUT, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.pool.retire(self)
            self.close()

    def ack(self, stream_id: int, size: int) -> None:
        conn = self.h2
        if conn is None or self.closed or not size:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.acknowledge_received_data(size, stream_id)
        self.flush()

    def flush(self) -> None:
        conn = self.h2
        transport = self.transport
        if conn is None or transport is None or self.closed:
            return
        data = conn.data_to_send()
        if data:
            transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()
        self.closed = True


class _StreamGone(Exception):
    """The stream closed while its body was being sent; the response side reports why."""


def _status(raw: list[tuple[bytes, bytes]]) -> int:
    for name, value in raw:
        if name == b":status":
            return int(value)
    raise UpstreamProtocolError("response without :status")


def _resendable(body: Body, started: bool) -> bool:
    return body is None or isinstance(body, bytes) or not started


class _Dial:
    """A connect in progress to one endpoint; requests arriving meanwhile wait for it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.error: ConnectFailed | None = None


class H2Pool:
    """h2c connections per endpoint, shared by every service that speaks h2c."""

    def __init__(
        self,
        config: Http2Config | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS_PER_ENDPOINT,
    ) -> None:
        self.config = config or Http2Config()
        self.max_connections = max_connections
        self._conns: dict[str, list[_Connection]] = {}
        self._dials: dict[str, _Dial] = {}
        self._slots: dict[str, asyncio.Event] = {}
        self._senders = TaskOwner("h2-upstream")
        self._closed = False

    def connections(self, endpoint: Endpoint) -> int:
        """Open connections to `endpoint` taking new streams (for tests and the admin)."""
        return len(self._conns.get(endpoint.key, []))

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> H2Response:
        fields = _request_fields(request)
        refused_by: _Connection | None = None
        while True:
            conn = await self._acquire(endpoint, connect_timeout, deadline, avoid=refused_by)
            try:
                return await self._exchange(conn, fields, request, deadline)
            except _Refused as exc:
                started = exc.body_started
                if refused_by is None and started and request.replay is not None:
                    fresh = request.replay()  # the body kept so far, then the rest
                    if fresh is not None:
                        request.body, started = fresh, False
                if refused_by is not None or not _resendable(request.body, started):
                    raise UpstreamBroken(f"{exc}; not sent again", sent=True) from None
                log.debug("upstream %s did not process a stream (%s): sent again", conn.key, exc)
                refused_by = conn  # the resend goes out on another connection

    async def _exchange(
        self,
        conn: _Connection,
        fields: list[tuple[bytes, bytes]],
        request: UpstreamRequest,
        deadline: float,
    ) -> H2Response:
        body = request.body
        stream = conn.open_stream(fields, end=body is None or body == b"")
        stream.on_interim = request.on_interim
        timer = conn.loop.call_at(deadline, conn.expire, stream)
        try:
            if isinstance(body, bytes) and body and len(body) <= conn.window(stream):
                await conn.send_data(stream, body, end=True)  # fits: no task needed
            elif body is not None and body != b"":
                stream.sender = self._senders.spawn(conn.send_body(stream, body), "body")
            await stream.head
        except _Refused as exc:
            conn.finish(stream)
            raise _Refused(str(exc), body_started=stream.body_started) from None
        except _StreamGone:
            conn.finish(stream)
            raise stream.error or UpstreamBroken("the stream closed while sending") from None
        except BaseException:
            conn.finish(stream)
            raise
        finally:
            timer.cancel()
        response = stream.response
        assert response is not None
        return response

    async def _acquire(
        self,
        endpoint: Endpoint,
        connect_timeout: float,
        deadline: float,
        *,
        avoid: _Connection | None = None,
    ) -> _Connection:
        """A connection with room for one more stream; `avoid` (the one that refused a
        stream) only when no other can be had or opened."""
        key = endpoint.key
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ConnectFailed("the h2c pool is closed")
            conns = self._conns.setdefault(key, [])
            best: _Connection | None = None
            for conn in conns:
                if conn is avoid:
                    continue
                if conn.usable and conn.room() > 0 and (best is None or conn.room() > best.room()):
                    best = conn
            if best is not None:
                return best
            if (
                avoid is not None
                and len(conns) >= self.max_connections
                and avoid.usable
                and avoid.room() > 0
            ):
                return avoid
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no free HTTP/2 stream before the attempt's deadline")
            dial = self._dials.get(key)
            if dial is not None:
                async with asyncio.timeout(remaining):
                    await dial.done.wait()
                if dial.error is not None:
                    raise type(dial.error)(str(dial.error))
                continue
            if len(conns) < self.max_connections:
                return await self._dial(endpoint, connect_timeout, deadline)
            slot = self._slots.setdefault(key, asyncio.Event())
            slot.clear()
            async with asyncio.timeout(remaining):
                await slot.wait()

    async def _dial(
        self, endpoint: Endpoint, connect_timeout: float, deadline: float
    ) -> _Connection:
        key = endpoint.key
        loop = asyncio.get_running_loop()
        dial = _Dial()
        self._dials[key] = dial
        try:
            remaining = deadline - loop.time()
            limit = min(connect_timeout, remaining)
            try:
                async with asyncio.timeout(limit):
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(self, key),
                        endpoint.address.host,
                        endpoint.address.port,
                    )
            except TimeoutError:
                if connect_timeout < remaining:
                    dial.error = ConnectTimeout(f"connect timeout after {limit * 1000:.0f}ms")
                    raise dial.error from None
                raise TimeoutError("the attempt's deadline passed while connecting") from None
            except OSError as exc:
                dial.error = ConnectFailed(exc.strerror or str(exc))
                raise dial.error from None
            conn = protocol
            if self._closed:
                conn.close()
                raise ConnectFailed("the h2c pool is closed")
            self._conns.setdefault(key, []).append(conn)
            return conn
        finally:
            del self._dials[key]
            dial.done.set()

    def notify(self, key: str) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.set()

    def retire(self, conn: _Connection) -> None:
        """No new streams on `conn` (GOAWAY, idle, forgotten); its streams finish."""
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        conn.draining = True
        self.notify(conn.key)

    def remove(self, conn: _Connection) -> None:
        self.retire(conn)

    def forget(self, endpoint: Endpoint) -> None:
        """Discovery removed `endpoint`: idle connections close now, busy ones when
        their streams end."""
        for conn in list(self._conns.get(endpoint.key, [])):
            self.retire(conn)
            if not conn.streams:
                conn.close()
        self._conns.pop(endpoint.key, None)
        self._slots.pop(endpoint.key, None)

    async def close(self) -> None:
        """Close every connection; in-flight exchanges fail with UpstreamBroken."""
        self._closed = True
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()
        await self._senders.close()


def _request_fields(request: UpstreamRequest) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = [
        (b":method", request.method.encode("ascii")),
        (b":scheme", b"http"),
        (b":path", request.target.encode("utf-8", "surrogateescape")),
        (b":authority", request.authority.encode("utf-8", "surrogateescape")),
    ]
    has_te = False
    grpc = False
    declared = False
    for name, value in request.headers:
        lname = name.lower()
        if lname in _CONNECTION_SPECIFIC:
            declared = declared or lname == "content-length"
            continue
        if lname == "te":
            if value.strip().lower() != "trailers":
                continue
            has_te = True
        elif lname == "content-type":
            grpc = grpcwire.is_grpc(value)
        fields.append(
            (lname.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        )
    if grpc and not has_te:
        fields.append((b"te", b"trailers"))
    # A length only where the app declared one: HTTP/2 frames bodies by itself, and a
    # gRPC server would hand an added content-length to the service as metadata.
    body = request.body
    if isinstance(body, bytes):
        if declared:
            fields.append((b"content-length", b"%d" % len(body)))
    elif body is not None and request.content_length is not None:
        fields.append((b"content-length", b"%d" % request.content_length))
    return fields


if TYPE_CHECKING:

    def _implements_the_seam(pool: H2Pool, response: H2Response) -> None:
        # mypy checks here that both classes satisfy the client seam's Protocols.
        client: UpstreamClient = pool
        head: UpstreamResponse = response
        del client, head
