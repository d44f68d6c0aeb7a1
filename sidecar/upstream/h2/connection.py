"""One h2c connection to an upstream endpoint, carrying many streams.

`_Connection` is the `asyncio.Protocol`: it sets up `h2` as a client, feeds it the frames
`FrameReader` cut (reading GOAWAY itself), turns `h2`'s events into stream state, sends
request bodies under the peer's windows and the socket's write buffer, and closes
itself when idle or draining. It knows its pool only as a `Home`, so this module
imports nothing of the pool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Final, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from multidict import CIMultiDictProxy

from sidecar.config.model import Http2Config
from sidecar.h2frames import (
    FrameError,
    FrameReader,
    FrameType,
    RawFrame,
    parse_goaway,
    wake_writers,
)
from sidecar.upstream.base import UpstreamBroken, UpstreamProtocolError
from sidecar.upstream.h2.stream import (
    H2Response,
    _fields,
    _Refused,
    _status,
    _Stream,
    _StreamGone,
)

log = logging.getLogger("sidecar.upstream.h2")

IDLE_TIMEOUT: Final = 30.0  # a connection without streams this long is closed
MAX_STREAMS_ASSUMED: Final = 100  # until the peer's SETTINGS say otherwise
WRITE_HIGH_WATER: Final = 64 * 1024


class Home(Protocol):
    """What a connection needs of its pool (`H2Pool`)."""

    @property
    def config(self) -> Http2Config: ...

    def notify(self, key: str) -> None: ...

    def retire(self, conn: _Connection) -> None: ...

    def remove(self, conn: _Connection) -> None: ...


class _Connection(asyncio.Protocol):
    """One TCP connection to an endpoint, carrying many streams."""

    def __init__(self, pool: Home, key: str) -> None:
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
            wake_writers(self.streams, event.stream_id)
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
