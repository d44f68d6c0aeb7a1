"""The sending side of one app connection, and its closing.

`H2Output` writes what `h2` queues (`_flush`), sends each stream's head, data and
trailers when the stream's and the connection's windows and the socket's write buffer
allow (`_writable`), resets streams, and closes the connection: gracefully after a
GOAWAY (`goaway`, `_maybe_close`), at once at the end of a drain (`close_now`), or on a
protocol error (`_fail`). `H2ServerProtocol` adds the receiving side on top; the split
follows the connection's two directions, so each can be read alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes

from sidecar.h2frames import goaway_bytes
from sidecar.http.base import Fields
from sidecar.http.h2server.fields import _encode_fields
from sidecar.http.h2server.stream import StreamReset, _Stream

log = logging.getLogger("sidecar.h2")

CLOSE_GRACE: Final = 1.0  # after a GOAWAY, how long the socket may take to flush


class H2Output:
    """What one app connection sends, and how it closes; the state both sides share."""

    def __init__(self) -> None:
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
