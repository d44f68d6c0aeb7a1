"""Every use of aiohttp's private API, in one place, with a version guard.

The sidecar serves HTTP/1.1 with aiohttp's low-level server and needs a few things its
public API does not offer. Each is listed here with why; nothing else in the sidecar
touches a private name of aiohttp (ruff's SLF rule enforces that outside this module):

- `ProxyRequestHandler`: the connection handler, subclassed to close a connection whose
  request head does not arrive in time (`_messages`, `_request_in_progress`, `_loop`
  tell whether a head is pending) and to answer unparsable requests in the sidecar's
  error format (`handle_error`).
- `ProxyServer`: the server factory building that handler (`_loop`, `_kwargs`).
- `PreparedResponse`: a `StreamResponse` whose bytes the sidecar writes itself; it is
  built without a header multidict (`_real_headers`) and tells aiohttp's keep-alive
  logic what it decided (`_keep_alive`, `_eof_sent`).
- `send_continue`: `100 Continue` written before the body is read, as aiohttp's own
  `_default_expect_handler` does for `web.Application` (the low-level server has none),
  resetting the writer's byte count so the real response is still "not started".
- `set_shutdown_timeout`: the runner's remaining drain time, recomputed after the
  sidecar's own drain wait (`_shutdown_timeout`).

The guard below refuses an aiohttp whose minor version these were not checked against,
with a message saying where to look, instead of failing somewhere in the request path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from multidict import CIMultiDict

CHECKED_VERSION: Final = "3.14"
if not aiohttp.__version__.startswith(CHECKED_VERSION + "."):  # pragma: no cover
    raise ImportError(
        f"sidecar.http.compat uses private parts of aiohttp checked against "
        f"{CHECKED_VERSION}.x; found aiohttp {aiohttp.__version__}. Check each use "
        "listed in sidecar/http/compat.py against the new version, then update the guard."
    )

log = logging.getLogger("sidecar.server")

_NO_HEADERS: Final = CIMultiDict[str]()


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a request-head timeout and our error format.

    `head_timeout`: a request head must arrive whole within this long of its first byte,
    as with nginx's client_header_timeout; otherwise a client trickling a head
    (slowloris) holds its connection, and a file descriptor, for the keep-alive timeout.
    `error_response(status, detail)` builds the answer to an unparsable request.
    """

    _head_timer: asyncio.TimerHandle | None = None
    head_timeout: float = 60.0
    error_response: Callable[[int, str], StreamResponse] | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._cancel_head_timer()  # a whole head arrived, or a request is running
        elif data and self._head_timer is None:
            # Bytes in, yet no request queued or running: the start of a head.
            self._head_timer = self._loop.call_later(self.head_timeout, self._head_timed_out)

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        # Body bytes can land between a head being taken and its handler starting, and
        # look like the start of a head: every finished request clears the slate.
        self._cancel_head_timer()
        return await super().finish_response(request, resp, start_time)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._messages or self._request_in_progress or transport is None:
            return
        log.info(
            "closed a connection from %s: request head not complete within %gs",
            transport.get_extra_info("peername"),
            self.head_timeout,
        )
        self.force_close()  # closes the transport too

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if status >= 500 or self.error_response is None:
            return super().handle_error(request, status, exc, message)
        # Hostile or broken input is routine for a proxy: one line, no traceback.
        log.info("refused a malformed request from %s: %s", request.remote, message or exc)
        # aiohttp's parser messages carry a caret diagram of the raw input: keep line one.
        detail = (message or str(exc) or "malformed request").strip().splitlines()[0][:200]
        response = self.error_response(status, detail)
        response.force_close()
        return response


class ProxyServer(web.Server):
    """The low-level server, building `ProxyRequestHandler`s."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], object],
        *,
        head_timeout: float,
        error_response: Callable[[int, str], StreamResponse],
        **kwargs: object,
    ) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]  # aiohttp's kwargs
        self.head_timeout = head_timeout
        self.error_response = error_response

    def __call__(self) -> RequestHandler:
        handler = ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout = self.head_timeout
        handler.error_response = self.error_response
        return handler


class PreparedResponse(web.StreamResponse):
    """A response the sidecar serialises itself (see `sidecar.http.response`)."""

    def __init__(self, status: int, reason: str | None) -> None:
        super().__init__(status=status, reason=reason, _real_headers=_NO_HEADERS)

    def decide_keep_alive(self, request: BaseRequest) -> bool:
        """Whether the connection stays open after this response; aiohttp reads it."""
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        self._keep_alive = keep_alive
        return keep_alive

    async def write_eof(self, data: bytes = b"") -> None:
        # The bytes went out in prepare(); tell aiohttp the response is complete.
        self._eof_sent = True


async def send_continue(request: BaseRequest) -> None:
    """Write `100 Continue` before the body is read (the app waits for it)."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the real response has not started


def set_shutdown_timeout(runner: web.BaseRunner, seconds: float) -> None:
    """What is left of the drain window; never 0, which aiohttp reads as "no limit"."""
    runner._shutdown_timeout = max(0.05, seconds)
