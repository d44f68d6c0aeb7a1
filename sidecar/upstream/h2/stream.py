"""One exchange on an h2c upstream connection, and the response the caller reads.

`_Stream` is the state the connection's events fill in (the head future, received
chunks, trailers, flags) and the pool's request waits on; `H2Response` is the seam's
`UpstreamResponse` over it, acknowledging body bytes only as they are taken. Both know
their connection only as a `Carrier`, so this module imports nothing of the
connection's. `_Refused` and `_StreamGone` are how a stream's end reaches the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.upstream.base import UpstreamProtocolError


class _Refused(Exception):
    """The upstream did not process the stream: it may be sent again elsewhere."""

    def __init__(self, message: str, *, body_started: bool = False) -> None:
        super().__init__(message)
        self.body_started = body_started


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _fields(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    return CIMultiDict((_text(n), _text(v)) for n, v in raw if not n.startswith(b":"))


class Carrier(Protocol):
    """What a stream and its response need of their connection (`_Connection`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def ack(self, stream_id: int, size: int) -> None: ...

    def finish(self, stream: _Stream) -> None: ...


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

    def __init__(self, conn: Carrier, stream_id: int) -> None:
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


class _StreamGone(Exception):
    """The stream closed while its body was being sent; the response side reports why."""


def _status(raw: list[tuple[bytes, bytes]]) -> int:
    for name, value in raw:
        if name == b":status":
            return int(value)
    raise UpstreamProtocolError("response without :status")
