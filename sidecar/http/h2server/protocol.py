"""One app connection's protocol (frames in) and the listener's HTTP/2 factory.

`H2ServerProtocol` is the `asyncio.Protocol`: it sets up `h2` with the advertised
SETTINGS, feeds it the frames `FrameReader` cut (judging floods and DATA lengths first),
turns its events into stream state, and runs each request's handler as a task of
`H2Server`, which makes a protocol per connection and drains them all. What it sends
and how it closes is `H2Output`, its base class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

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
    wake_writers,
)
from sidecar.http.base import Inbound, Responder
from sidecar.http.h2server.fields import Malformed, _check_trailers, parse_request
from sidecar.http.h2server.flood import PING_ANSWER, SETTINGS_ANSWER, FloodLimits, _Counter
from sidecar.http.h2server.output import H2Output
from sidecar.http.h2server.stream import H2Inbound, H2Responder, StreamReset, _Stream
from sidecar.tasks import TaskOwner
from sidecar.vocab import Reason

log = logging.getLogger("sidecar.h2")

Handler = Callable[[Inbound, Responder], Awaitable[None]]

MAX_FRAME_SIZE: Final = 16384  # we never raise SETTINGS_MAX_FRAME_SIZE
WRITE_HIGH_WATER: Final = 64 * 1024  # socket write buffer past which writers wait


class H2ServerProtocol(H2Output, asyncio.Protocol):
    """One app connection speaking HTTP/2."""

    def __init__(self, server: H2Server) -> None:
        super().__init__()
        self._server = server
        self._config = server.config
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
            wake_writers(self.streams, event.stream_id)
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
