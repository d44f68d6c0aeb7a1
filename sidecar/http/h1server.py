"""The HTTP/1.1 side: aiohttp's low-level server adapted to `Inbound` and `Responder`.

aiohttp parses the request (strictly: RFC 9112 framing, header limits) and calls
`H1Handler` once per request; the handler wraps the request in an `H1Inbound`, serves it
through the proxy with an `H1Responder`, and hands aiohttp the response object the
responder made: a `WholeResponse` (written in one go after the handler returns) or a
`StreamResponse` it already streamed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import errors
from sidecar.http.base import Fields, HttpVersion, Inbound, Responder
from sidecar.http.compat import send_continue
from sidecar.http.response import WholeResponse

Serve = Callable[[Inbound, Responder], Awaitable[None]]


class H1Inbound:
    """One aiohttp request as an `Inbound`.

    What the proxy reads of every request is copied into slots once: plain attribute
    reads on the request path instead of two properties deep into aiohttp's request.
    """

    __slots__ = ("_continue", "_request", "headers", "method", "target", "version")

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self.method: str = request.method
        self.target: str = request.raw_path
        self.headers: CIMultiDictProxy[str] = request.headers
        version = request.version
        self.version: HttpVersion = "1.0" if version == HttpVersion10 else "1.1"
        # `Expect: 100-continue` is answered when the body is first read: the app waits
        # for it before sending the body, and a request refused before that never asks.
        self._continue = version == HttpVersion11 and "Expect" in self.headers

    @property
    def remote(self) -> str | None:
        return self._request.remote

    @property
    def has_body(self) -> bool:
        return self._request.body_exists

    @property
    def content_length(self) -> int | None:
        return self._request.content_length

    async def read_chunk(self) -> bytes:
        if self._continue:
            self._continue = False
            if self._request.headers["Expect"].strip().lower() == "100-continue":
                await send_continue(self._request)
        return await self._request.content.readany()


class H1Responder:
    """The way back over HTTP/1.1; `response` is what aiohttp gets from the handler."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    def send_interim(self, status: int, headers: Fields) -> None:
        # RFC 9110 15.2: a 1xx goes only to an HTTP/1.1 client.
        transport = self._request.transport
        if self._request.version != HttpVersion11 or transport is None or self.response:
            return
        # The SP after the code is required even without a reason phrase (RFC 9112 4).
        lines = [f"HTTP/1.1 {status} Early Hints" if status == 103 else f"HTTP/1.1 {status} "]
        lines.extend(f"{name}: {value}" for name, value in headers)
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))

    async def send_whole(
        self, status: int, reason: str | None, headers: Fields, body: bytes, *, bodyless: bool
    ) -> None:
        self.response = WholeResponse(status, headers, body, reason=reason, bodyless=bodyless)

    async def start(self, status: int, reason: str | None, headers: Fields) -> None:
        response = web.StreamResponse(status=status, reason=reason, headers=CIMultiDict(headers))
        self.response = response
        await response.prepare(self._request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def finish(self, trailers: Fields | None = None) -> None:
        # HTTP/1.1 answers to the app carry no trailers (aiohttp's server cannot send
        # them, and no HTTP/1.1 client we serve asks for them with `TE: trailers`).
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


class H1Handler:
    """The function aiohttp's server calls per request."""

    __slots__ = ("_draining", "_serve")

    def __init__(self, serve: Serve, draining: Callable[[], bool]) -> None:
        self._serve = serve
        self._draining = draining

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version == HttpVersion10 and "Transfer-Encoding" in request.headers:
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (a
            # 1.0 peer cannot mean chunked); what follows it on the connection cannot be
            # trusted either, so answer 400 and close.
            refused = errors.error_response(
                errors.BAD_REQUEST, detail="Transfer-Encoding in an HTTP/1.0 request"
            )
            refused.force_close()
            return refused
        responder = H1Responder(request)
        await self._serve(H1Inbound(request), responder)
        response = responder.response
        if response is None:  # the proxy always answers; this is a bug, not a request
            raise RuntimeError("the proxy finished without an answer")
        if self._draining():
            # Tell keep-alive clients to reconnect elsewhere: this process is leaving.
            response.force_close()
        return response
