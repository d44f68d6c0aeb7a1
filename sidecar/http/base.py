"""The app-facing seam: one request from the app and the way back, whatever the wire.

The proxy (`sidecar.proxy`) serves an `Inbound` request through a `Responder`. The
HTTP/1.1 side (aiohttp's low-level server) and the HTTP/2 side (`sidecar.http.h2server`)
each adapt their wire to these two, so routing, admission, the attempt loop and the
metrics are one code path for both protocols.

Header names in an `Inbound` are as received (HTTP/2: lower-case, pseudo-headers removed,
`:authority` given as `host`). A responder writes what it is given; it adds only what its
own framing needs (HTTP/1.1: Content-Length or chunked, Date, Connection; HTTP/2: nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

from multidict import CIMultiDictProxy

HttpVersion = Literal["1.0", "1.1", "2"]
Fields = Iterable[tuple[str, str]]


class Inbound(Protocol):
    """One request from the app."""

    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str:
        """The request target as sent (HTTP/2: `:path`)."""
        ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def version(self) -> HttpVersion: ...

    @property
    def remote(self) -> str | None:
        """The app's IP address."""
        ...

    @property
    def has_body(self) -> bool:
        """False when the request certainly has no body (no length, or length 0, no DATA)."""
        ...

    @property
    def content_length(self) -> int | None: ...

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. Flow control: reading is what opens
        the app's window (HTTP/2) or resumes the socket (HTTP/1.1)."""
        ...


class Responder(Protocol):
    """The way back to the app for one request. Exactly one of `send_whole` or
    `start` (then `write`s and `finish`) is called, or `abort`."""

    def send_interim(self, status: int, headers: Fields) -> None:
        """A 1xx head (103 Early Hints) before the final answer; written at once,
        without waiting (the upstream client calls it from its parser callback)."""
        ...

    async def send_whole(
        self, status: int, reason: str | None, headers: Fields, body: bytes, *, bodyless: bool
    ) -> None:
        """A complete answer. `bodyless`: a HEAD answer or 204/304, whose headers are kept
        as given. HTTP/2 with an empty body: one HEADERS frame that ends the stream (what
        gRPC calls Trailers-Only)."""
        ...

    async def start(self, status: int, reason: str | None, headers: Fields) -> None:
        """The head of a streamed answer."""
        ...

    async def write(self, chunk: bytes) -> None:
        """One body chunk; returns when the app's flow control lets more be sent."""
        ...

    async def finish(self, trailers: Fields | None = None) -> None:
        """The end of a streamed answer, with trailers (HTTP/2) when given."""
        ...

    def abort(self) -> None:
        """The answer cannot be completed honestly: reset the stream (HTTP/2) or cut the
        connection (HTTP/1.1), so the app cannot take a truncated body for a whole one."""
        ...
