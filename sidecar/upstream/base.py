"""The upstream client seam: what the attempt loop needs from a wire client.

The attempt loop (`sidecar.attempts`) sends one request to one endpoint through an
`UpstreamClient` and gets back an `UpstreamResponse` (the head, then the body as chunks,
then trailers), or one of the errors below. Two wire clients implement it: HTTP/1.1
(`sidecar.upstream.h1`) and h2c (`sidecar.upstream.h2`); an aiohttp-based reference
client (`sidecar.upstream.reference`) exists so both can be held to one conformance suite,
and tests drive the loop with a scripted fake.

The errors are the whole vocabulary a client may raise besides `TimeoutError` (the
deadline passed) and `asyncio.CancelledError` (never caught here):

    ConnectFailed   no connection could be made; nothing of the request left
    ConnectTimeout  ... because the connect did not finish in `connect_timeout`
    NameNotResolved ... because the host name did not resolve
    UpstreamBroken  the exchange broke after connecting (`sent` says whether any byte of
                    the request was handed over)
    UpstreamProtocolError  ... because the upstream's bytes are not valid HTTP

A client resends a request by itself only where the upstream cannot have processed it
(docs/contract.md#resends, "A request is sent twice only when the policy allows it"): a pooled
HTTP/1.1 connection found closed before any byte of the request was handed to it, an
HTTP/2 stream refused (REFUSED_STREAM) or above a GOAWAY's last stream id. Each at most
once per attempt. Every other failure goes back to the loop, which decides as policy says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDictProxy

from sidecar.endpoint import Endpoint

Body = bytes | AsyncIterator[bytes] | None
# Called for each interim (1xx but 100 and 101) response head before the final one,
# with its status and headers.
InterimSink = Callable[[int, Iterable[tuple[str, str]]], None]


class UpstreamError(ConnectionError):
    """Base of the errors an upstream client raises."""


class ConnectFailed(UpstreamError):
    """No connection could be made; nothing was sent."""


class ConnectTimeout(ConnectFailed):
    """The connection was not made within its time."""


class NameNotResolved(ConnectFailed):
    """The endpoint's host name did not resolve: no connection could be attempted."""


class UpstreamBroken(UpstreamError):
    """The connection broke, or the upstream sent something that is not valid HTTP."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent  # False: not one byte of the request was handed to the connection


class UpstreamProtocolError(UpstreamBroken):
    """The upstream's bytes are not valid HTTP (or break a limit): the connection is
    dropped because of what the upstream sent, not because it went away."""


@dataclass(slots=True)
class UpstreamRequest:
    """One attempt's request, independent of the wire.

    `headers` are end-to-end fields only (hop-by-hop ones were dropped by the caller);
    `authority` becomes `Host` (HTTP/1.1) or `:authority` (HTTP/2). A body given as bytes
    can be sent more than once; an iterator only once, unless `replay` gives the client
    a fresh one for a resend of the same attempt (None when the body can no longer be
    sent whole).
    """

    method: str
    target: str  # origin-form: path and query
    authority: str
    headers: list[tuple[str, str]]
    body: Body = None
    content_length: int | None = None  # of an iterator body, when the app declared one
    on_interim: InterimSink | None = None
    # The service's idle_timeout: how long the connection may then wait idle in a pool
    # (an upstream's Keep-Alive: timeout=N may lower it). None: the client's default.
    idle_timeout: float | None = None
    replay: Callable[[], AsyncIterator[bytes] | None] | None = None


class UpstreamResponse(Protocol):
    """A response head, with its body to stream (`iter_chunks`) or read whole (`read`).

    `trailers` is set once the body has ended, when the upstream sent any. `release()`
    must be called exactly once when the caller is done (also after an error): the client
    then reuses or closes the connection (HTTP/1.1) or stream (HTTP/2).
    """

    status: int
    reason: str | None  # None: none sent, or not relayable as text; the app gets the default
    headers: CIMultiDictProxy[str]
    content_length: int | None
    trailers: CIMultiDictProxy[str] | None

    def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `idle_timeout` bounds the silence between them.

        Raises `UpstreamBroken` when the body breaks, `TimeoutError` on silence."""
        ...

    async def read(self, idle_timeout: float | None = None) -> bytes:
        """The whole body (callers use this only below a size they chose)."""
        ...

    def release(self) -> None: ...


class UpstreamClient(Protocol):
    """Sends one request to one endpoint; returns once the final response head is in."""

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> UpstreamResponse:
        """`deadline` (event-loop time) bounds connecting, sending and the wait for the
        head: past it, `TimeoutError`, and the connection (or stream) is discarded."""
        ...

    def forget(self, endpoint: Endpoint) -> None:
        """Discovery removed `endpoint`: close its idle connections."""
        ...

    async def close(self) -> None:
        """Close every connection; in-flight exchanges fail."""
        ...
