"""The app-facing HTTP/2 side (h2c with prior knowledge): one protocol per connection.

`H2Server` is the listener's HTTP/2 protocol factory and the owner of every stream task.
Each connection (`H2ServerProtocol`) drives `h2`'s sans-IO `H2Connection` and serves
each request stream by calling `handler(inbound, responder)` with an `Inbound` and a
`Responder` (`sidecar.http.base`), so the proxy's request path is the same for both
protocols. Modelled on hypercorn's `protocol/h2.py` and grpclib's `protocol.py`.

What it guarantees:

- Flow control end to end. Received DATA is acknowledged (WINDOW_UPDATE) only as the
  handler reads it (`read_chunk`), so what the app may send us is bounded by our
  windows (`http2.stream_window`, `http2.connection_window`), never by the body.
  `write` waits while the app's window for the stream or connection is closed, and
  while the socket's write buffer is above `WRITE_HIGH_WATER`: a reader that never
  opens its window makes the upstream wait, not the sidecar buffer.
- Limits advertised in SETTINGS: `max_concurrent_streams` (streams beyond it get
  RST_STREAM REFUSED_STREAM), `max_header_list_size` (a request over it gets 431; over
  twice it, or a header block not ended within twice it, the connection gets
  GOAWAY ENHANCE_YOUR_CALM), the windows; frames larger than 16384 bytes are a
  connection error judged from the frame header (`sidecar.h2frames`).
- Floods (`FloodLimits`): more than 1,000 RST_STREAM, PING or SETTINGS frames within
  10 s, or more than 64 KiB of PING/SETTINGS answers written while the app does not
  read, end the connection with GOAWAY ENHANCE_YOUR_CALM.
- Malformed requests (RFC 9113 §8.2 and §8.3) never reach the handler: they are
  answered 400 `bad_request` (a gRPC request: Trailers-Only, grpc-status 13), or, once
  the handler runs (a body longer or shorter than its content-length), the stream is
  reset with PROTOCOL_ERROR. `h2`'s own header validation is off because it makes every
  malformed request a connection error, which would fail the other streams of the
  connection; the checks are here instead (`parse_request`). A `content-length` that is
  not a number is still refused by `h2` itself, as a connection error.
- Graceful shutdown: `goaway()` sends GOAWAY(NO_ERROR) with the last stream taken and
  lets those streams finish; the connection closes when the last one ends. The frame is
  written around `h2`, whose state machine would otherwise refuse to send on open streams
  after a GOAWAY (python-hyper/h2 #1181); a GOAWAY from the app is handled the same way.

Request trailers are read and dropped (the seam has no place for them; gRPC never sends
them). Server push is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import errors
from sidecar import grpc as grpcwire
from sidecar.config.model import Http2Config
from sidecar.h2frames import (
    FLAG_ACK,
    FLAG_END_STREAM,
    PREFACE,
    FrameError,
    FrameReader,
    FrameType,
    RawFrame,
    goaway_bytes,
)
from sidecar.http.base import Fields, HttpVersion, Inbound, Responder
from sidecar.tasks import TaskOwner
from sidecar.vocab import Reason

log = logging.getLogger("sidecar.h2")

Handler = Callable[[Inbound, Responder], Awaitable[None]]

MAX_FRAME_SIZE: Final = 16384  # we never raise SETTINGS_MAX_FRAME_SIZE
WRITE_HIGH_WATER: Final = 64 * 1024  # socket write buffer past which writers wait
CLOSE_GRACE: Final = 1.0  # after a GOAWAY, how long the socket may take to flush
PING_ANSWER: Final = 9 + 8
SETTINGS_ANSWER: Final = 9

_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_RESPONSE_DROPPED: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)
# RFC 9110 token characters, lower case only: anything else in a name is malformed.
_BAD_NAME: Final = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]")


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """What one connection may send within `window` seconds before it is closed."""

    window: float = 10.0
    resets: int = 1000
    pings: int = 1000
    settings: int = 1000
    unread_answers: int = 64 * 1024  # PING/SETTINGS answers queued while the app reads none


class StreamReset(ConnectionResetError):
    """The stream or its connection is gone: nothing more can be sent or read."""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    authority: str | None
    scheme: str
    fields: list[tuple[str, str]]  # regular fields, `host` first when there is one
    content_length: int | None
    grpc: bool


@dataclass(frozen=True, slots=True)
class Malformed:
    detail: str
    status: int = 400
    grpc: bool = False


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _bad_value(value: bytes) -> bool:
    if _BAD_VALUE.search(value) is not None:
        return True
    return bool(value) and (value[0] in b" \t" or value[-1] in b" \t")


def parse_request(
    raw: Iterable[tuple[bytes, bytes]], *, ended: bool, max_list_size: int
) -> RequestHead | Malformed:
    """Check one request header block (RFC 9113 §8.2, §8.3) and split it."""
    method = scheme = path = authority = host = None
    content_length: int | None = None
    regular = False
    size = 0
    fields: list[tuple[str, str]] = []
    problem: str | None = None
    grpc = False
    for name, value in raw:
        size += len(name) + len(value) + 32
        if problem is not None:
            continue
        if not name:
            problem = "empty header name"
        elif name[0] == 0x3A:  # ":"
            if regular:
                problem = "pseudo-header after a regular header"
            elif _bad_value(value):
                problem = f"invalid character in {_text(name)}"
            elif name == b":method":
                problem = "duplicate :method" if method is not None else None
                method = value
            elif name == b":scheme":
                problem = "duplicate :scheme" if scheme is not None else None
                scheme = value
            elif name == b":path":
                problem = "duplicate :path" if path is not None else None
                path = value
            elif name == b":authority":
                problem = "duplicate :authority" if authority is not None else None
                authority = value
            else:
                problem = f"pseudo-header {_text(name)!r} is not allowed in a request"
        else:
            regular = True
            if _BAD_NAME.search(name) is not None:
                problem = f"invalid header name {_text(name)!r}"
            elif _bad_value(value):
                problem = f"invalid character in the value of {_text(name)!r}"
            elif name in _CONNECTION_SPECIFIC:
                problem = f"connection-specific header {_text(name)!r}"
            elif name == b"te" and value.lower() != b"trailers":
                problem = "te other than trailers"
            elif name == b"host":
                if host is not None and host != value:
                    problem = "more than one host"
                host = value
            elif name == b"content-length":
                # h2 has already refused a non-numeric or conflicting value.
                content_length = int(value)
            elif name == b"content-type":
                grpc = grpcwire.is_grpc(_text(value))
            if problem is None and name != b"host":
                fields.append((_text(name), _text(value)))
    if problem is not None:
        return Malformed(problem, grpc=grpc)
    if size > max_list_size:
        return Malformed(f"header list of {size} bytes, limit {max_list_size}", 431, grpc)
    if method is None or scheme is None or path is None:
        if method == b"CONNECT":
            return Malformed("CONNECT is not supported", grpc=grpc)
        return Malformed("missing :method, :scheme or :path", grpc=grpc)
    if method == b"CONNECT":
        return Malformed("CONNECT is not supported", grpc=grpc)
    if not path.startswith(b"/"):
        return Malformed(":path does not start with /", grpc=grpc)
    if authority is not None and host is not None and authority != host:
        return Malformed("host and :authority differ", grpc=grpc)
    if ended and content_length:
        return Malformed(f"content-length {content_length} but no body", grpc=grpc)
    if method == b"HEAD":
        content_length = None  # describes the GET answer's body, not this request
    host_value = authority if authority is not None else host
    if host_value is not None:
        fields.insert(0, ("host", _text(host_value)))
    return RequestHead(
        method=_text(method),
        path=_text(path),
        authority=None if authority is None else _text(authority),
        scheme=_text(scheme),
        fields=fields,
        content_length=content_length,
        grpc=grpc,
    )


def _encode_fields(headers: Fields, drop_length: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_DROPPED or (drop_length and lname == "content-length"):
            continue
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"response header {name!r} contains CR, LF or NUL")
        out.append(
            (lname.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        )
    return out


# --------------------------------------------------------------------------- streams


class _Stream:
    """One request stream's state, shared by its Inbound and Responder."""

    __slots__ = (
        "chunks",
        "conn",
        "data_event",
        "error",
        "expected",
        "id",
        "local_ended",
        "received",
        "remote_ended",
        "reset",
        "started",
        "task",
        "window_event",
    )

    def __init__(self, conn: H2ServerProtocol, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.task: asyncio.Task[Any] | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.data_event = asyncio.Event()
        self.window_event = asyncio.Event()
        self.error: StreamReset | None = None
        self.expected: int | None = None
        self.received = 0
        self.remote_ended = False
        self.local_ended = False
        self.started = False
        self.reset = False

    def wake(self) -> None:
        self.data_event.set()
        self.window_event.set()


class H2Inbound:
    """The request of one stream (`sidecar.http.base.Inbound`)."""

    __slots__ = (
        "_ended",
        "_stream",
        "content_length",
        "headers",
        "method",
        "remote",
        "target",
        "version",
    )

    def __init__(self, stream: _Stream, head: RequestHead, remote: str | None) -> None:
        self._stream = stream
        self.method = head.method
        self.target = head.path
        self.headers = CIMultiDictProxy(CIMultiDict(head.fields))
        self.version: HttpVersion = "2"
        self.remote = remote
        self.content_length = head.content_length
        self._ended = stream.remote_ended  # END_STREAM on the HEADERS frame

    @property
    def has_body(self) -> bool:
        return not self._ended and self.content_length != 0

    async def read_chunk(self) -> bytes:
        stream = self._stream
        conn = stream.conn
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.chunks:
                data, flow = stream.chunks.popleft()
                conn.ack(stream, flow)
                if data:
                    return data
                continue
            if stream.remote_ended:
                return b""
            stream.data_event.clear()
            await stream.data_event.wait()


class H2Responder:
    """The way back for one stream (`sidecar.http.base.Responder`)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def send_interim(self, status: int, headers: Fields) -> None:
        # Written at once: HEADERS are not flow-controlled, and the seam wants no wait.
        if not 100 <= status < 200 or status == 101:
            raise ValueError(f"{status} is not an interim status")
        self._stream.conn.send_interim(self._stream, status, headers)

    async def send_whole(
        self, status: int, reason: str | None, headers: Fields, body: bytes, *, bodyless: bool
    ) -> None:
        stream = self._stream
        conn = stream.conn
        keep_length = bodyless and status != 204
        if bodyless or not body:
            await conn.send_head(stream, status, headers, end=True, length=keep_length)
            return
        await conn.send_head(stream, status, headers, end=False, length=False)
        await conn.send_data(stream, body, end=True)

    async def start(self, status: int, reason: str | None, headers: Fields) -> None:
        await self._stream.conn.send_head(self._stream, status, headers, end=False, length=True)

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._stream.conn.send_data(self._stream, chunk, end=False)

    async def finish(self, trailers: Fields | None = None) -> None:
        stream = self._stream
        fields = _encode_fields(trailers, drop_length=True) if trailers is not None else []
        if fields:
            await stream.conn.send_trailers(stream, fields)
        else:
            await stream.conn.send_data(stream, b"", end=True)

    def abort(self) -> None:
        self._stream.conn.reset(self._stream, ErrorCodes.INTERNAL_ERROR)


# --------------------------------------------------------------------------- connection


class _Counter:
    """Events within a sliding window of `window` seconds, up to `limit` + 1 kept."""

    __slots__ = ("limit", "times", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def hit(self, now: float) -> bool:
        """Count one; True when more than `limit` fell within the window."""
        times = self.times
        times.append(now)
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) > self.limit


class H2ServerProtocol(asyncio.Protocol):
    """One app connection speaking HTTP/2."""

    def __init__(self, server: H2Server) -> None:
        self._server = server
        self._config = server.config
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._conn: h2.connection.H2Connection | None = None
        self.streams: dict[int, _Stream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._write_paused = False
        self.closed = False
        self.goaway_sent = False
        self._peer_goaway = False
        self._last_stream_id = 0
        self._close_timer: asyncio.TimerHandle | None = None
        limits = server.limits
        self._resets = _Counter(limits.resets, limits.window)
        self._pings = _Counter(limits.pings, limits.window)
        self._settings = _Counter(limits.settings, limits.window)
        self._unread = 0
        self.reader = FrameReader(
            expect_preface=True,
            max_header_block=2 * self._config.max_header_list_size,
            max_frame_size=MAX_FRAME_SIZE,
            judge=self._judge,
        )

    @property
    def highest_stream_id(self) -> int:
        """The highest stream id the app has opened on this connection."""
        return 0 if self._conn is None else self._conn.highest_inbound_stream_id

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) and peer else None
        self._server.connections.add(self)

        cfg = self._config
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,  # parse_request does it, as stream errors
                normalize_inbound_headers=False,
                validate_outbound_headers=True,
                normalize_outbound_headers=True,
            )
        )
        codes = h2.settings.SettingCodes
        advertised = {
            codes.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
            codes.INITIAL_WINDOW_SIZE: cfg.stream_window,
            codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            codes.ENABLE_PUSH: 0,
        }
        conn.local_settings = h2.settings.Settings(client=False, initial_values=advertised)
        conn.initiate_connection()
        # h2 turns a stream past its own limit into a connection error; it gets a higher
        # one, so that streams past the advertised limit are refused one by one here.
        enforced = dict(advertised)
        enforced[codes.MAX_CONCURRENT_STREAMS] = 2 * cfg.max_concurrent_streams + 100
        conn.local_settings = h2.settings.Settings(client=False, initial_values=enforced)
        # Header lists between the limit and twice it are decoded and answered 431.
        conn.decoder.max_header_list_size = 2 * cfg.max_header_list_size
        if cfg.connection_window > 65535:
            conn.increment_flow_control_window(cfg.connection_window - 65535)
        # FrameReader checks the app's preface and keeps it; h2 wants to see one too.
        conn.receive_data(PREFACE)
        self._conn = conn
        self._flush()
        if self._server.draining:
            self.goaway()  # accepted after the drain began

    def data_received(self, data: bytes) -> None:
        if self.closed or self._conn is None:
            return
        try:
            for frame in self.reader.feed(data):
                if not self._frame(frame):
                    return
        except FrameError as exc:
            self._fail(exc.code, str(exc))
            return
        except h2.exceptions.ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s", self._remote, exc)
            self._flush()  # h2 has queued its GOAWAY
            self._close(abort=False)
            return
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._unread = 0
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._can_write.set()
        for stream in list(self.streams.values()):
            stream.error = StreamReset("the connection closed")
            stream.reset = True
            stream.wake()
        self.streams.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- frames in ----------------------------------------------------------------------

    def _judge(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        now = self._loop.time()
        limits = self._server.limits
        if ftype == FrameType.RST_STREAM:
            if self._resets.hit(now):
                raise FrameError(ErrorCodes.ENHANCE_YOUR_CALM, "RST_STREAM flood")
        elif ftype == FrameType.PING and not flags & FLAG_ACK:
            if self._pings.hit(now):
                raise FrameError(ErrorCodes.ENHANCE_YOUR_CALM, "PING flood")
            self._count_unread(PING_ANSWER, limits)
        elif ftype == FrameType.SETTINGS and not flags & FLAG_ACK:
            if self._settings.hit(now):
                raise FrameError(ErrorCodes.ENHANCE_YOUR_CALM, "SETTINGS flood")
            self._count_unread(SETTINGS_ANSWER, limits)

    def _count_unread(self, size: int, limits: FloodLimits) -> None:
        if not self._write_paused:
            return
        self._unread += size
        if self._unread > limits.unread_answers:
            raise FrameError(ErrorCodes.ENHANCE_YOUR_CALM, "answers to PING/SETTINGS left unread")

    def _frame(self, frame: RawFrame) -> bool:
        """Handle one frame; False once the connection is closed."""
        conn = self._conn
        assert conn is not None
        if frame.type == FrameType.GOAWAY:
            self._peer_goaway = True
            self._maybe_close()
            return not self.closed
        if frame.type == FrameType.DATA:
            self._check_data_length(frame)
        for event in conn.receive_data(frame.data):
            self._event(event)
        return not self.closed

    def _check_data_length(self, frame: RawFrame) -> None:
        """A body longer or shorter than its content-length: h2 would make it a
        connection error; it is a stream error (RFC 9113 §8.1.1)."""
        stream = self.streams.get(frame.stream_id)
        if stream is None or stream.expected is None or stream.reset:
            return
        total = stream.received + frame.data_length()
        ended = bool(frame.flags & FLAG_END_STREAM)
        if total > stream.expected or (ended and total != stream.expected):
            detail = f"body of {total}+ bytes, content-length {stream.expected}"
            self._malformed_body(stream, detail)
            return
        stream.received = total

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.reset:
                stream.chunks.append((event.data, event.flow_controlled_length))
                stream.data_event.set()
            elif event.flow_controlled_length:
                self.ack_id(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._remote_ended(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                for stream in self.streams.values():
                    stream.window_event.set()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_event.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset = True
                stream.error = StreamReset("the app reset the stream")
                self._forget(stream)
                if stream.task is not None:
                    stream.task.cancel()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                problem = _check_trailers(event.headers or [])
                if problem is not None:
                    self._malformed_body(stream, problem)
        elif (
            isinstance(event, h2.events.RemoteSettingsChanged)
            and h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings
        ):
            for stream in self.streams.values():
                stream.window_event.set()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        ended = event.stream_ended is not None
        if self.goaway_sent and stream_id > self._last_stream_id:
            self._refuse(stream_id)
            return
        if (
            self._peer_goaway
            or self._server.closed
            or len(self.streams) >= self._config.max_concurrent_streams
        ):
            self._refuse(stream_id)
            return
        stream = _Stream(self, stream_id)
        stream.remote_ended = ended
        self.streams[stream_id] = stream
        head = parse_request(
            event.headers or [], ended=ended, max_list_size=self._config.max_header_list_size
        )
        if isinstance(head, Malformed):
            log.info("refused a malformed HTTP/2 request from %s: %s", self._remote, head.detail)
            coro = self._answer_malformed(stream, head)
        else:
            stream.expected = head.content_length
            inbound = H2Inbound(stream, head, self._remote)
            coro = self._run(stream, inbound, H2Responder(stream))
        task = self._server.spawn(coro, f"stream-{stream_id}")
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, stream_id: int) -> None:
        conn = self._conn
        assert conn is not None
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def _remote_ended(self, stream: _Stream) -> None:
        stream.remote_ended = True
        if stream.expected is not None and stream.received != stream.expected and not stream.reset:
            self._malformed_body(
                stream, f"body of {stream.received} bytes, content-length {stream.expected}"
            )
            return
        stream.data_event.set()
        if stream.local_ended:
            self._forget(stream)

    def _malformed_body(self, stream: _Stream, detail: str) -> None:
        log.info("reset a malformed HTTP/2 request from %s: %s", self._remote, detail)
        self.reset(stream, ErrorCodes.PROTOCOL_ERROR)
        stream.error = StreamReset(f"malformed request: {detail}")
        if stream.task is not None:
            stream.task.cancel()

    # -- stream tasks -------------------------------------------------------------------

    async def _run(self, stream: _Stream, inbound: H2Inbound, responder: H2Responder) -> None:
        try:
            await self._server.handler(inbound, responder)
        except StreamReset:
            pass
        except Exception:
            log.exception("HTTP/2 handler failed on stream %d", stream.id)
        self._settle(stream)

    async def _answer_malformed(self, stream: _Stream, problem: Malformed) -> None:
        responder = H2Responder(stream)
        try:
            if problem.grpc:
                fields = grpcwire.error_trailers(
                    Reason.BAD_REQUEST, problem.detail, extra=[("x-sidecar-attempts", "0")]
                )
                await responder.send_whole(200, None, fields, b"", bodyless=False)
            else:
                body = errors.error_body(Reason.BAD_REQUEST, None, None, problem.detail)
                fields = [
                    ("content-type", "application/json"),
                    ("x-sidecar-error", Reason.BAD_REQUEST),
                    ("x-sidecar-attempts", "0"),
                ]
                await responder.send_whole(problem.status, None, fields, body, bodyless=False)
        except StreamReset:
            pass
        self._settle(stream)

    def _settle(self, stream: _Stream) -> None:
        """The handler is done: an unfinished answer is reset, an unfinished upload is
        stopped (RFC 9113 §8.1: RST_STREAM NO_ERROR after a complete response)."""
        if stream.reset or self.closed:
            return
        if not stream.local_ended:
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
        elif not stream.remote_ended:
            self.reset(stream, ErrorCodes.NO_ERROR)
        self._flush()

    # -- frames out ---------------------------------------------------------------------

    def _flush(self) -> None:
        conn = self._conn
        transport = self.transport
        if conn is None or transport is None or self.closed:
            return
        data = conn.data_to_send()
        if data:
            transport.write(data)

    def ack(self, stream: _Stream, size: int) -> None:
        if size and not self.closed:
            self.ack_id(stream.id, size)
            self._flush()

    def ack_id(self, stream_id: int, size: int) -> None:
        conn = self._conn
        assert conn is not None
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.acknowledge_received_data(size, stream_id)

    async def _writable(self, stream: _Stream, need_window: bool) -> int:
        """Wait until the stream may send; the bytes its windows allow now."""
        conn = self._conn
        assert conn is not None
        while True:
            if stream.reset or self.closed:
                raise stream.error or StreamReset("the stream was reset")
            if self._write_paused:
                await self._can_write.wait()
                continue
            if not need_window:
                return 0
            try:
                window = conn.local_flow_control_window(stream.id)
            except h2.exceptions.ProtocolError:
                raise StreamReset("the stream is closed") from None
            if window > 0:
                return min(window, conn.max_outbound_frame_size)
            stream.window_event.clear()
            await stream.window_event.wait()

    async def send_head(
        self, stream: _Stream, status: int, headers: Fields, *, end: bool, length: bool
    ) -> None:
        fields = _encode_fields(headers, drop_length=not length)
        await self._writable(stream, need_window=False)
        conn = self._conn
        assert conn is not None
        final = status >= 200
        if final:
            if stream.started:
                raise RuntimeError("the response head was already sent")
            stream.started = True
        block = [(b":status", b"%d" % status), *fields]
        try:
            conn.send_headers(stream.id, block, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise StreamReset(f"cannot send the response head: {exc}") from None
        if end:
            self._local_ended(stream)
        self._flush()

    def send_interim(self, stream: _Stream, status: int, headers: Fields) -> None:
        conn = self._conn
        if stream.reset or self.closed or stream.started or conn is None:
            return  # nothing to tell an app that is gone, or after the final head
        block = [(b":status", b"%d" % status), *_encode_fields(headers, drop_length=False)]
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.send_headers(stream.id, block)
        self._flush()

    async def send_data(self, stream: _Stream, data: bytes, *, end: bool) -> None:
        conn = self._conn
        assert conn is not None
        total = len(data)
        offset = 0
        while True:
            room = await self._writable(stream, need_window=offset < total)
            size = min(room, total - offset)
            last = offset + size >= total
            try:
                conn.send_data(stream.id, data[offset : offset + size], end_stream=end and last)
            except h2.exceptions.ProtocolError as exc:
                raise StreamReset(f"cannot send: {exc}") from None
            offset += size
            self._flush()
            if last:
                break
        if end:
            self._local_ended(stream)

    async def send_trailers(self, stream: _Stream, fields: list[tuple[bytes, bytes]]) -> None:
        await self._writable(stream, need_window=False)
        conn = self._conn
        assert conn is not None
        try:
            conn.send_headers(stream.id, fields, end_stream=True)
        except h2.exceptions.ProtocolError as exc:
            raise StreamReset(f"cannot send trailers: {exc}") from None
        self._local_ended(stream)
        self._flush()

    def _local_ended(self, stream: _Stream) -> None:
        stream.local_ended = True
        if stream.remote_ended:
            self._forget(stream)

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        if stream.reset or self.closed:
            return
        stream.reset = True
        if stream.error is None:
            stream.error = StreamReset(f"the stream was reset ({code.name})")
        conn = self._conn
        assert conn is not None
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.reset_stream(stream.id, code)
        self._forget(stream)
        self._flush()

    def _forget(self, stream: _Stream) -> None:
        """The stream is closed: hand back the window of what was never read."""
        if self.streams.pop(stream.id, None) is None:
            return
        unread = sum(flow for _, flow in stream.chunks)
        stream.chunks.clear()
        if unread:
            self.ack_id(stream.id, unread)
        stream.wake()
        self._maybe_close()

    # -- closing ------------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful shutdown: take no new stream, let the ones taken finish."""
        if self.goaway_sent or self.closed or self._conn is None or self.transport is None:
            return
        self.goaway_sent = True
        self._last_stream_id = self._conn.highest_inbound_stream_id
        self._flush()
        self.transport.write(goaway_bytes(self._last_stream_id, ErrorCodes.NO_ERROR))
        self._maybe_close()

    def _maybe_close(self) -> None:
        if (self.goaway_sent or self._peer_goaway) and not self.streams and not self.closed:
            if self._conn is not None and not self.goaway_sent:
                self.goaway_sent = True
                self._flush()
                assert self.transport is not None
                self.transport.write(
                    goaway_bytes(self._conn.highest_inbound_stream_id, ErrorCodes.NO_ERROR)
                )
            self._close(abort=False)

    def _fail(self, code: ErrorCodes, message: str) -> None:
        log.info("closed an HTTP/2 connection from %s: %s (%s)", self._remote, message, code.name)
        transport = self.transport
        conn = self._conn
        if transport is None or conn is None or self.closed:
            return
        self._flush()
        transport.write(goaway_bytes(conn.highest_inbound_stream_id, code, message))
        # An app that does not read would hold the socket open forever while we flush.
        self._close(abort=code == ErrorCodes.ENHANCE_YOUR_CALM and self._write_paused)

    def _close(self, *, abort: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        for stream in list(self.streams.values()):
            stream.reset = True
            stream.error = StreamReset("the connection closed")
            stream.wake()
            if stream.task is not None:
                stream.task.cancel()
        self.closed = True
        if abort:
            transport.abort()
            return
        transport.close()
        if self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_GRACE, transport.abort)

    def close_now(self) -> None:
        """Cut the connection (end of drain): in-flight streams fail."""
        if self.transport is not None and not self.closed:
            if self._conn is not None:
                self._flush()
                self.transport.write(
                    goaway_bytes(self._conn.highest_inbound_stream_id, ErrorCodes.NO_ERROR)
                )
            self._close(abort=False)

    async def wait_closed(self) -> None:
        """Wait until every stream task of this connection has finished."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))


def _check_trailers(raw: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in raw:
        if not name or name[0] == 0x3A:
            return "pseudo-header in trailers"
        if _BAD_NAME.search(name) is not None:
            return f"invalid trailer name {_text(name)!r}"
        if _bad_value(value):
            return f"invalid character in trailer {_text(name)!r}"
    return None


class H2Server:
    """The listener's HTTP/2 side: makes a protocol per connection, owns every stream
    task, and drains (`goaway`, `wait_idle`, `close`)."""

    def __init__(
        self,
        handler: Handler,
        config: Http2Config | None = None,
        *,
        limits: FloodLimits | None = None,
    ) -> None:
        self.handler = handler
        self.config = config or Http2Config()
        self.limits = limits or FloodLimits()
        self.connections: set[H2ServerProtocol] = set()
        self.tasks = TaskOwner("h2")
        self.draining = False
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    def __call__(self) -> H2ServerProtocol:
        return H2ServerProtocol(self)

    @property
    def in_flight(self) -> int:
        """Stream tasks still running, on every connection."""
        return len(self.tasks)

    def goaway(self) -> None:
        """Begin the drain: every connection gets GOAWAY and takes no new stream."""
        self.draining = True
        for connection in list(self.connections):
            connection.goaway()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[Any]:
        task = self.tasks.spawn(coro, name)
        self._idle.clear()
        task.add_done_callback(self._task_done)  # runs after the owner forgot the task
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not len(self.tasks):
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no stream task runs (callers bound it with a timeout)."""
        await self._idle.wait()

    async def close(self) -> None:
        """End of the drain: cut what is left, cancel and await every stream task."""
        self.draining = True
        self.closed = True
        for connection in list(self.connections):
            connection.close_now()
        await self.tasks.close()


if TYPE_CHECKING:

    def _implements_the_seam(inbound: H2Inbound, responder: H2Responder) -> None:
        # mypy checks here that both classes satisfy the app-facing seam's Protocols.
        request: Inbound = inbound
        answer: Responder = responder
        del request, answer
