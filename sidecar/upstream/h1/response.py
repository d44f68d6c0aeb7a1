"""One HTTP/1.1 response as the seam's `UpstreamResponse`: the head, then its body.

The connection's parser pushes body bytes in (`feed`), then the end (`feed_eof`, with
`trailers` set first when the upstream sent any) or an error (`feed_error`). Reading
pauses the socket above `READ_HIGH_WATER` buffered bytes, so memory does not follow the
body. `release()` hands the connection back to its pool, which reuses it only if this
response ended cleanly and nothing else arrived (see `H1Connection.reusable`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.upstream.base import UpstreamError

READ_HIGH_WATER: Final = 256 * 1024  # buffered response bytes before we pause the socket
READ_LOW_WATER: Final = 64 * 1024


class Carrier(Protocol):
    """What a response needs of the connection it arrived on (`H1Connection`)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def release(self) -> None:
        """The response is done with: pool the connection again, or close it."""
        ...


class H1Response:
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
        self, conn: Carrier, status: int, reason: str | None, headers: CIMultiDict[str]
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        # llhttp has checked it: digits only, and never beside Transfer-Encoding.
        self.content_length = int(length) if length is not None else None
        self.until_eof = (
            self.content_length is None
            and "Transfer-Encoding" not in headers
            and status not in (204, 304)
        )
        self.keep_alive = False
        self.complete = False
        self.trailers: CIMultiDictProxy[str] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | TimeoutError | None = None
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

    def feed_error(self, exc: UpstreamError | TimeoutError) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `idle_timeout` bounds the silence between them.

        Raises `UpstreamBroken` when the body breaks (the connection closed or reset
        early, or the rest of the response is not valid HTTP)."""
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
        self._chunks.clear()
        if self._paused:  # a pooled connection must keep reading, to see EOF or stray bytes
            self._paused = False
            transport = self._conn.transport
            if transport is not None:
                transport.resume_reading()
        self._conn.release()
