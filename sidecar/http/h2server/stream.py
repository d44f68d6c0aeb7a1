"""One request stream of the HTTP/2 server, and the two seam ends that share it.

`_Stream` is the state the connection and the handler both touch (received chunks,
flags, the events a blocked reader or writer waits on). `H2Inbound` and `H2Responder`
are the `Inbound` and `Responder` of `sidecar.http.base` over it; they do the sending
through the connection, which they know only as a `Carrier`, so this module imports
nothing of the connection's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.http.base import Fields, HttpVersion, Inbound, Responder
from sidecar.http.h2server.fields import RequestHead, _encode_fields


class StreamReset(ConnectionResetError):
    """The stream or its connection is gone: nothing more can be sent or read."""


class Carrier(Protocol):
    """What a stream's Inbound and Responder need of their connection (`H2ServerProtocol`)."""

    def ack(self, stream: _Stream, size: int) -> None: ...

    def send_interim(self, stream: _Stream, status: int, headers: Fields) -> None: ...

    async def send_head(
        self, stream: _Stream, status: int, headers: Fields, *, end: bool, length: bool
    ) -> None: ...

    async def send_data(self, stream: _Stream, data: bytes, *, end: bool) -> None: ...

    async def send_trailers(self, stream: _Stream, fields: list[tuple[bytes, bytes]]) -> None: ...

    def reset(self, stream: _Stream, code: ErrorCodes) -> None: ...


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

    def __init__(self, conn: Carrier, stream_id: int) -> None:
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


if TYPE_CHECKING:

    def _implements_the_seam(inbound: H2Inbound, responder: H2Responder) -> None:
        # mypy checks here that both classes satisfy the app-facing seam's Protocols.
        request: Inbound = inbound
        answer: Responder = responder
        del request, answer
